//! Dirty logging: enable, disable (zap of what can be huge again), get,
//! the per-word clear, and the protect pass.

use std::sync::atomic::{AtomicU64, Ordering};

use mmu_cache::alloc::NoAllocSection;

use crate::addr::Gfn;
use crate::ept::{DIRTY, Entry, Level};
use crate::memslot::{ClearedWord, LogMode, Memslot, MemslotError};
use crate::tdp::{MmuError, TdpMmu};

use super::stats::Count;
use super::walk::{entries, load, protect_leaf};

impl TdpMmu {
    /// Starts dirty logging on slot `id`.
    ///
    /// Classic mode: huge leaves are split now (eager) and every leaf's dirty
    /// bit is cleared; with eager splitting off, huge leaves are
    /// write-protected instead and split by later write faults. Manual mode
    /// with "initially set": every bit of the log starts set, and nothing is
    /// split or protected until [`clear_dirty_log`](Self::clear_dirty_log).
    ///
    /// Eager splitting is best effort, as the kernel's
    /// `kvm_mmu_slot_try_split_huge_pages` is: when the split caches cannot
    /// be filled (or the hooks refuse), the huge leaves left are
    /// write-protected whole, the first write to each splits it
    /// ([`fault`](Self::fault)), and [`MmuCounters::split_fallbacks`]
    /// counts them. So this never fails for lack of memory, and the log
    /// keeps 4 KiB precision.
    pub fn enable_dirty_logging(&self, id: u32, mode: LogMode) -> Result<(), MmuError> {
        let slot = self.slot(id)?;
        slot.start_logging(mode);
        if mode == LogMode::Classic {
            self.try_split_huge_pages(slot.base_gfn().0, slot.end_gfn().0);
            self.protect_range(slot.base_gfn().0, slot.end_gfn().0, None);
        }
        Ok(())
    }

    /// Stops dirty logging on slot `id`, then zaps only what can be mapped
    /// huge again (the kernel's `kvm_mmu_zap_collapsible_sptes`): each table
    /// at the 2M or 1G level whose range the slot allows as one leaf goes,
    /// so that later faults map it huge; tables over ranges that can only
    /// be mapped 4K (the slot's unaligned edges, host frames not aligned
    /// like the guest's) stay mapped.
    pub fn disable_dirty_logging(&self, id: u32) -> Result<(), MmuError> {
        let slot = self.slot(id)?;
        slot.stop_logging();
        let mut collapsible = Vec::new();
        {
            let _guard = self.read_lock();
            self.find_collapsible(
                self.root_addr(),
                self.top_level(),
                0,
                &slot,
                &mut collapsible,
            );
        }
        for range in collapsible {
            self.zap_range(Gfn(range.start), Gfn(range.end))?;
        }
        Ok(())
    }

    /// Collects the ranges of tables under `table_hpa` (level `level`,
    /// mapping from `table_gfn`) that `slot` would map with one huge leaf.
    fn find_collapsible(
        &self,
        table_hpa: u64,
        level: Level,
        table_gfn: u64,
        slot: &Memslot,
        out: &mut Vec<std::ops::Range<u64>>,
    ) {
        // SAFETY: the caller holds the lock; the table is linked.
        let table = unsafe { entries(table_hpa) };
        let pages = level.entry_pages();
        let first = (slot.base_gfn().0.saturating_sub(table_gfn) / pages).min(512) as usize;
        for index in first..512 {
            let gfn = table_gfn + index as u64 * pages;
            if gfn >= slot.end_gfn().0 {
                break;
            }
            let entry = load(table, index);
            if !entry.is_present() || entry.is_leaf(level) {
                continue;
            }
            if level.can_be_leaf() && slot.contains(Gfn(gfn)) && slot.max_level(Gfn(gfn)) >= level {
                out.push(gfn..gfn + pages);
                continue;
            }
            if let Some(below) = level.below()
                && below > Level::L4K
            {
                self.find_collapsible(entry.addr(level), below, gfn, slot, out);
            }
        }
    }

    /// [`split_huge_pages`](Self::split_huge_pages) to 4K over a range for
    /// dirty logging, when eager splitting is on: best effort, so a failure
    /// only leaves huge leaves for the protect pass to write-protect whole.
    fn try_split_huge_pages(&self, start: u64, end: u64) {
        if !self.config.eager_split {
            return;
        }
        if let Err(err) = self.split_huge_pages(Gfn(start), Gfn(end), Level::L4K) {
            tracing::debug!(
                start,
                end,
                %err,
                "eager split fell back to write-protecting huge leaves"
            );
        }
    }

    /// Makes the next write to each page of `[start, end)` visible to dirty
    /// logging: clears the dirty bit of the 4K leaves (those of `cleared`
    /// only, when given) and write-protects every huge leaf over the range
    /// (whose dirty bit could not say which page was written). Runs under
    /// the read lock with compare-and-exchange, as the kernel's
    /// `clear_dirty_gfn_range` does. Huge leaves left after an eager split
    /// count as [`MmuCounters::split_fallbacks`].
    fn protect_range(&self, start: u64, end: u64, cleared: Option<(&Memslot, ClearedWord)>) {
        let _guard = self.read_lock();
        let _no_alloc = NoAllocSection::enter();
        let mut fallbacks = 0;
        self.for_each_leaf_gfn(start, end, |table, index, level, entry, gfn| {
            if level == Level::L4K
                && let Some((slot, word)) = cleared
                && !word.has(slot.base_gfn(), gfn)
            {
                return;
            }
            if level > Level::L4K && self.config.eager_split {
                fallbacks += 1;
            }
            protect_leaf(table, index, level, entry);
        });
        if fallbacks > 0 {
            self.counters.add(Count::SplitFallbacks, fallbacks);
        }
    }

    /// Returns the dirty log of slot `id`, one bit per page from the slot's
    /// first page. Classic mode: the log is cleared and the pages are
    /// protected again. Manual mode: the log is returned as is; use
    /// [`clear_dirty_log`](Self::clear_dirty_log).
    pub fn get_dirty_log(&self, id: u32) -> Result<Vec<u64>, MmuError> {
        let slot = self.slot(id)?;
        let mode = slot.log_mode().ok_or(MemslotError::NotLogging { id })?;
        self.harvest_into(&slot);
        Ok(match mode {
            LogMode::Classic => slot.take(),
            LogMode::ManualInitiallySet => slot.snapshot(),
        })
    }

    /// Manual mode: `KVM_CLEAR_DIRTY_LOG` for the bits of `mask` (bit i
    /// stands for page `first_page + i` of the slot; `first_page` a multiple
    /// of 64).
    ///
    /// As the kernel's `kvm_clear_dirty_log_protect` and
    /// `kvm_arch_mmu_enable_log_dirty_pt_masked` do, one 64-page word at a
    /// time: only the bits set both in the log and in the mask are cleared;
    /// then the pages from the first to the last bit actually cleared in
    /// that word are split (when eager, best effort), the huge leaves over
    /// them write-protected, and the cleared 4K pages protected. So a mask
    /// of pages {0, 2047} splits two 2 MiB pages, not the four between, and
    /// a word with nothing to clear touches nothing.
    pub fn clear_dirty_log(&self, id: u32, first_page: u64, mask: &[u64]) -> Result<(), MmuError> {
        let slot = self.slot(id)?;
        slot.check_clear(first_page, mask)?;
        for word in slot.clear_words(first_page, mask) {
            let range = word.gfn_range(slot.base_gfn());
            self.try_split_huge_pages(range.start, range.end);
            self.protect_range(range.start, range.end, Some((&slot, word)));
        }
        Ok(())
    }

    /// Moves the dirty bits of the slot's leaves into its bitmap, clearing
    /// them in the leaves (what a PML buffer flush does).
    fn harvest_into(&self, slot: &Memslot) {
        let _guard = self.read_lock();
        self.for_each_leaf_gfn(
            slot.base_gfn().0,
            slot.end_gfn().0,
            |table, index, level, entry, gfn| {
                if !entry.has(DIRTY) {
                    return;
                }
                let old = Entry::from_bits(table[index].fetch_and(!DIRTY, Ordering::AcqRel));
                if old.has(DIRTY) {
                    let first = gfn.max(slot.base_gfn().0);
                    let last = (gfn + level.entry_pages()).min(slot.end_gfn().0);
                    for page in first..last {
                        slot.mark_dirty(Gfn(page));
                    }
                }
            },
        );
    }

    /// Visits every present leaf overlapping `[start, end)`; callers hold the lock.
    fn for_each_leaf_gfn(
        &self,
        start: u64,
        end: u64,
        mut visit: impl FnMut(&[AtomicU64; 512], usize, Level, Entry, u64),
    ) {
        fn walk(
            table_hpa: u64,
            level: Level,
            table_gfn: u64,
            start: u64,
            end: u64,
            visit: &mut LeafVisitor<'_>,
        ) {
            // SAFETY: the caller holds the MMU lock; the table is linked.
            let table = unsafe { entries(table_hpa) };
            let pages = level.entry_pages();
            let first = (start.saturating_sub(table_gfn) / pages).min(512) as usize;
            for index in first..512 {
                let gfn = table_gfn + index as u64 * pages;
                if gfn >= end {
                    break;
                }
                let entry = load(table, index);
                if !entry.is_present() {
                    continue;
                }
                if entry.is_leaf(level) {
                    visit(table, index, level, entry, gfn);
                } else {
                    walk(
                        entry.addr(level),
                        level.below().expect("tables above 4K"),
                        gfn,
                        start,
                        end,
                        visit,
                    );
                }
            }
        }
        walk(
            self.root_addr(),
            self.top_level(),
            0,
            start,
            end,
            &mut visit,
        );
    }
}

/// A callback over leaves: table, index, level, entry, first gfn.
type LeafVisitor<'a> = dyn FnMut(&[AtomicU64; 512], usize, Level, Entry, u64) + 'a;
