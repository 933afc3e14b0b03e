//! Eager splitting of huge shadow leaves without a vCPU.

use mmu_cache::alloc::NoAllocSection;

use crate::addr::Gfn;
use crate::ept::{self, Entry, Level};
use crate::lock::SPLITS_PER_YIELD;
use crate::translation::stat_index;

use super::{Role, ShadowCaches, ShadowError, ShadowMmu, State, guest_access};

impl ShadowMmu {
    /// Splits every huge leaf that maps L1 frames in `[start_gfn, end_gfn)`
    /// down to `target`, 1G leaves first: each becomes a direct shadow page
    /// of 512 children with the same bits (the page-size bit cleared only at
    /// 4K). No vCPU is involved. Uses the per-VM split caches; when they
    /// fall below what one split needs, the lock is dropped, they are
    /// topped up, and the walk resumes. Returns the number of splits.
    pub fn split_huge_pages(
        &self,
        start_gfn: Gfn,
        end_gfn: Gfn,
        target: Level,
    ) -> Result<u64, ShadowError> {
        let (start_gfn, end_gfn) = (start_gfn.0, end_gfn.0);
        let mut caches = self.split_cache_lock();
        let mut splits = 0;
        let mut state = self.lock();
        state.reserve_pages(SPLITS_PER_YIELD as usize);
        let mut since_yield = 0;
        for level in [Level::L1G, Level::L2M] {
            if level <= target {
                continue;
            }
            let pages = level.entry_pages();
            let mut gfn = start_gfn & !(pages - 1);
            while gfn < end_gfn {
                let Some(si) = state.slot_index(gfn.max(start_gfn)) else {
                    gfn = self.next_slot_gfn(&state, gfn, end_gfn, pages);
                    continue;
                };
                let at = gfn.max(state.slots[si].slot.base_gfn().0);
                let Some(addr) = state.slots[si].head(level, at).first() else {
                    gfn += pages;
                    continue;
                };
                if caches.split_needs_topup() || since_yield == SPLITS_PER_YIELD {
                    state.counters.lock_drops += 1;
                    drop(state);
                    std::thread::yield_now();
                    caches.topup_for_split()?;
                    state = self.lock();
                    state.reserve_pages(SPLITS_PER_YIELD as usize);
                    since_yield = 0;
                    continue;
                }
                let _no_alloc = NoAllocSection::enter();
                self.split_one(&mut state, &mut caches, addr, level)?;
                splits += 1;
                since_yield += 1;
            }
        }
        Ok(splits)
    }

    fn next_slot_gfn(&self, state: &State, gfn: u64, end: u64, pages: u64) -> u64 {
        state
            .slots
            .iter()
            .map(|r| r.slot.base_gfn().0)
            .filter(|&base| base > gfn)
            .min()
            .map_or(end, |base| base & !(pages - 1))
            .max(gfn + pages)
    }

    fn split_one(
        &self,
        state: &mut State,
        caches: &mut ShadowCaches,
        addr: u64,
        level: Level,
    ) -> Result<(), ShadowError> {
        let huge = state.spte(addr);
        let below = level.below().expect("huge leaves are above 4K");
        let gfn = state.leaf_gfn(huge, level);
        let role = Role::direct(below, guest_access(huge));
        let (child, created) = self.get_sp(state, caches, None, gfn, role)?;
        let si = state
            .slot_index(gfn)
            .expect("huge leaves lie inside a memslot");
        let State {
            pages,
            slots,
            stats,
            ..
        } = &mut *state;
        let words = pages
            .get_mut(&child)
            .and_then(|sp| sp.page.as_mut())
            .expect("a live shadow page")
            .words_mut();
        let rmaps = &mut slots[si];
        let mut added = 0;
        let mut result = Ok(());
        // Child i is child 0 with the frame advanced by i child pages: the
        // frame bits never carry into the others (as in the TDP split).
        let first_child = huge.split_child(level, 0).bits();
        let step = below.entry_bytes();
        if created && rmaps.run_is_empty(below, gfn) {
            // A new shadow page over frames no other entry maps, as in a
            // first split: its entries are one run of stores, and the run
            // of rmaps records the page instead of 512 lists.
            ept::fill_split_children(words, first_child, step);
            rmaps.imply_run(below, gfn, child);
            added = words.len() as u64;
        } else if created {
            // A new shadow page: every entry is free, and most rmap lists of
            // 4K frames are empty, which is one 8-byte store each.
            let lists = rmaps.run_lists(below, gfn);
            for index in 0..words.len() {
                let child_addr = child + index as u64 * 8;
                if let Err(err) = lists[index].add(child_addr, &mut caches.descriptors) {
                    // The page came unfilled from the split cache: what
                    // this split did not write becomes non-present.
                    words[index..].fill(ept::NON_PRESENT);
                    result = Err(err);
                    break;
                }
                words[index] = first_child + index as u64 * step;
                added += 1;
            }
        } else {
            let lists = rmaps.run_lists(below, gfn);
            for (index, (word, list)) in words.iter_mut().zip(lists).enumerate() {
                if Entry::from_bits(*word).is_present() {
                    continue;
                }
                let child_addr = child + index as u64 * 8;
                if let Err(err) = list.add(child_addr, &mut caches.descriptors) {
                    result = Err(err);
                    break;
                }
                *word = first_child + index as u64 * step;
                added += 1;
            }
        }
        // A new page holds exactly the huge leaf's children; a page found
        // again keeps the entries it had (write-protected ones among them,
        // as the kernel's split skips present entries), on the same frames.
        debug_assert!(
            result.is_err() || {
                let (last, child_511) =
                    (Entry::from_bits(words[511]), huge.split_child(level, 511));
                if created {
                    last == child_511
                } else {
                    last.addr(below) == child_511.addr(below)
                }
            }
        );
        stats[stat_index(below)] += added;
        result?;
        let removed = state.rmap(level, gfn).remove(addr);
        debug_assert!(removed, "huge leaf {addr:#x} was not in its rmap");
        state.stats[stat_index(level)] -= 1;
        self.link(state, &mut caches.descriptors, addr, child)?;
        state.counters.splits += 1;
        Ok(())
    }
}
