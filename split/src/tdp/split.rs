//! Huge-page splits: eager, boundary and the shared split step.

use std::sync::atomic::Ordering;

use mmu_cache::alloc::NoAllocSection;

use crate::addr::{Gfn, Hpa};
use crate::ept::{self, Entry, Level};
use crate::hooks::{HookError, TableRef, Topup};
use crate::lock::{ReadGuard, SPLITS_PER_YIELD, WriteGuard};
use crate::tdp::{MmuError, TableHeader, TdpMmu, VcpuCaches};

use super::FROZEN;
use super::stats::Count;
use super::walk::{Next, Tree, WalkStep, cas};

impl TdpMmu {
    /// Splits every huge leaf overlapping `[start_gfn, end_gfn)` down to
    /// `target` (pre-order: 1G to 2M to 4K). Never allocates under the lock:
    /// when the split caches run dry the lock is dropped, the caches are
    /// topped up, and the walk resumes where it stopped.
    pub fn split_huge_pages(
        &self,
        start_gfn: Gfn,
        end_gfn: Gfn,
        target: Level,
    ) -> Result<u64, MmuError> {
        self.split_where(start_gfn.0, end_gfn.0, target, |_, _| true)
    }

    /// Splits only the huge leaves that straddle `start_gfn` or `end_gfn`, as
    /// far as needed for the boundary to fall between leaves (needed before
    /// converting part of a huge page). Returns the number of splits.
    pub fn split_cross_boundary(&self, start_gfn: Gfn, end_gfn: Gfn) -> Result<u64, MmuError> {
        let (start_gfn, end_gfn) = (start_gfn.0, end_gfn.0);
        let mut splits =
            self.split_where(start_gfn, start_gfn + 1, Level::L4K, |leaf_gfn, _| {
                leaf_gfn < start_gfn
            })?;
        if end_gfn > start_gfn {
            splits += self.split_where(end_gfn - 1, end_gfn, Level::L4K, |leaf_gfn, pages| {
                leaf_gfn + pages > end_gfn
            })?;
        }
        Ok(splits)
    }

    /// The split walk behind every split: finds each huge leaf above
    /// `target` in `[start, end)` that `should_split(leaf_gfn, pages)` picks
    /// and splits it, pre-order. Tables come from the split caches, topped
    /// up with no lock held; when they run dry (or every
    /// [`SPLITS_PER_YIELD`] splits) the lock is dropped and the walk resumes
    /// at the same cursor. Without external tables the walk holds the lock
    /// for read and links with compare-and-exchange, as the kernel's eager
    /// split does, so vCPU faults go on meanwhile; external tables (a TDX
    /// demote) need it for write.
    fn split_where(
        &self,
        start: u64,
        end: u64,
        target: Level,
        should_split: impl Fn(u64, u64) -> bool,
    ) -> Result<u64, MmuError> {
        let mut caches = self.split_caches.lock().unwrap_or_else(|p| p.into_inner());
        let capacity = self.config.split_cache_capacity;
        let exclusive = self.external_tables;
        let mut cursor = start;
        let mut splits = 0;
        while cursor < end {
            caches.tables.topup_with_capacity(capacity, 1)?;
            caches.headers.topup_with_capacity(capacity, 1)?;
            if self.external_tables {
                caches.external.topup_with_capacity(capacity, 1)?;
            }
            self.hooks.topup(Topup::Split { splits: capacity }, None)?;
            let budget = self.hooks.split_budget();
            self.reserve_tables(caches.tables.nr_free());
            let guard = if exclusive {
                SplitGuard::Exclusive(self.write_lock())
            } else {
                SplitGuard::Shared(self.read_lock())
            };
            let no_alloc = NoAllocSection::enter();
            let mut since_yield = 0;
            while cursor < end {
                if caches.tables.nr_free() == 0
                    || caches.headers.nr_free() == 0
                    || (self.external_tables && caches.external.nr_free() == 0)
                    || since_yield == SPLITS_PER_YIELD
                    || since_yield as usize >= budget
                {
                    break;
                }
                match self.split_step(&mut caches, cursor, target, &should_split, exclusive)? {
                    Step::Split => {
                        splits += 1;
                        since_yield += 1;
                        self.counters.add(Count::Splits, 1);
                    }
                    Step::Skip(next) => cursor = next,
                    Step::Raced => {
                        self.counters.add(Count::Retries, 1);
                        break;
                    }
                }
            }
            drop(no_alloc);
            drop(guard);
            if cursor < end {
                self.counters.add(Count::LockDrops, 1);
                std::thread::yield_now();
            }
        }
        Ok(splits)
    }

    /// One step of a split walk at `cursor`: split the first huge leaf met
    /// above `target`, or say where the walk continues, or that an entry on
    /// the way is changing under another thread.
    fn split_step(
        &self,
        caches: &mut VcpuCaches,
        cursor: u64,
        target: Level,
        should_split: &impl Fn(u64, u64) -> bool,
        exclusive: bool,
    ) -> Result<Step, MmuError> {
        self.walk(Tree::Main, cursor, |step| {
            let WalkStep { level, entry, .. } = step;
            let pages = level.entry_pages();
            let leaf_gfn = step.base_gfn();
            let next = leaf_gfn + pages;
            if entry.bits() == FROZEN {
                return Next::Stop(Ok(Step::Raced));
            }
            if !entry.is_present()
                || (entry.is_leaf(level) && (level <= target || !should_split(leaf_gfn, pages)))
            {
                return Next::Stop(Ok(Step::Skip(next)));
            }
            if entry.is_leaf(level) {
                return Next::Stop(self.split_leaf(caches, step, exclusive).map(
                    |linked| match linked {
                        Some(_) => Step::Split,
                        None => Step::Raced,
                    },
                ));
            }
            if level.below().is_none_or(|below| below <= target) {
                return Next::Stop(Ok(Step::Skip(next)));
            }
            Next::Descend(entry.addr(level))
        })
    }

    /// Replaces the huge leaf the walk stands on with a table filled with
    /// its 512 children, which
    /// map the same memory with the same bits (the kernel's
    /// `tdp_mmu_split_huge_page`). The children are written before the link
    /// is published, and the link is a compare-and-exchange from `leaf`, so
    /// this runs under the read lock as well as the write lock. `exclusive`
    /// says which one the caller holds; the hooks may refuse a split without
    /// it (a TDX demote needs the write lock).
    ///
    /// Returns the new table, or `None` when the entry changed under us or
    /// the hooks were busy: nothing changed, and the caller retries. A
    /// refusal of the hooks leaves both trees as they were and is an error.
    pub(super) fn split_leaf(
        &self,
        caches: &mut VcpuCaches,
        step: WalkStep<'_>,
        exclusive: bool,
    ) -> Result<Option<u64>, MmuError> {
        let WalkStep {
            tree,
            table,
            index,
            level,
            entry: leaf,
            ..
        } = step;
        let gfn = step.base_gfn();
        let below = level.below().expect("huge leaves are above 4K");
        let mut page = caches.tables.alloc()?;
        let hpa = page.addr() as u64;
        // The page is ours and not yet linked: plain stores.
        let first = leaf.split_child(level, 0).bits();
        ept::fill_split_children(page.words_mut(), first, below.entry_bytes());
        debug_assert_eq!(page.words()[511], leaf.split_child(level, 511).bits());
        let external = if self.external_of(tree) {
            Some(caches.external.alloc()?)
        } else {
            None
        };
        let header = caches.headers.alloc()?;
        let table_ref = TableRef {
            hpa: Hpa(hpa),
            external: external.as_ref().map(|p| Hpa(p.addr() as u64)),
        };
        // Given back, the page's fill is restored by the cache.
        let give_back = |caches: &mut VcpuCaches, page, external: Option<_>, header| {
            caches.tables.free(page);
            if let Some(external) = external {
                caches.external.free(external);
            }
            caches.headers.free(header);
        };
        if !cas(table, index, leaf, Entry::from_bits(FROZEN)) {
            give_back(caches, page, external, header);
            return Ok(None);
        }
        if let Err(err) =
            self.hooks_of(tree)
                .split_leaf(Gfn(gfn), level, leaf, table_ref, exclusive)
        {
            table[index].store(leaf.bits(), Ordering::Release);
            give_back(caches, page, external, header);
            return match err {
                HookError::Busy { .. } => Ok(None),
                refused => Err(refused.into()),
            };
        }
        let mut header = header;
        *header = TableHeader {
            gfn: Gfn(gfn),
            level: below.get(),
            page: Some(page),
            external,
        };
        self.insert_table(hpa, header);
        // Release: the filled children are visible before the link.
        table[index].store(Entry::table(hpa).bits(), Ordering::Release);
        self.counters.sub_leaves(level, 1);
        self.counters.add_leaves(below, 512);
        self.counters.add(Count::TablesLinked, 1);
        Ok(Some(hpa))
    }
}

enum Step {
    /// A huge leaf was split; the walk goes on at the same cursor.
    Split,
    /// Nothing (more) to split before this gfn.
    Skip(u64),
    /// An entry changed under the walk (another thread's fault, a harvest,
    /// a busy hook): retry at the same cursor after dropping the lock.
    Raced,
}

/// The lock a splitter holds: shared without external tables, exclusive
/// with them.
enum SplitGuard<'a> {
    Shared(#[expect(dead_code, reason = "held for its drop")] ReadGuard<'a>),
    Exclusive(#[expect(dead_code, reason = "held for its drop")] WriteGuard<'a>),
}
