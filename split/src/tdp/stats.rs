//! The MMU's work counters and leaf counts.

use crate::ept::{Entry, Level};
use crate::shard::ShardedCounters;
use crate::tdp::TdpMmu;
use crate::translation::{PageStats, stat_index};

use super::walk::{entries, load};

/// Counters of MMU work.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmuCounters {
    /// Faults handled.
    pub faults: u64,
    /// Walks retried after losing a race.
    pub retries: u64,
    /// Huge leaves split (eagerly or for a boundary).
    pub splits: u64,
    /// Huge leaves split by a write fault (lazy mode, or a huge leaf an
    /// eager split could not split).
    pub lazy_splits: u64,
    /// Huge leaves that an eager split under dirty logging could not split
    /// (split caches not filled, hooks refusing) and that were
    /// write-protected whole instead, counted at each protect pass.
    pub split_fallbacks: u64,
    /// Times a splitter dropped the lock to top up or to yield.
    pub lock_drops: u64,
    /// Tables linked.
    pub tables_linked: u64,
    /// Tables freed.
    pub tables_freed: u64,
    /// External pages kept out of the allocator because the hooks could
    /// not take them back (they may still belong to the external side).
    pub external_leaked: u64,
    /// Faults that exited to the VMM with a memory fault (a private access
    /// to shared memory or the other way round).
    pub memory_faults: u64,
    /// Calls of [`TdpMmu::set_memory_attributes`] that changed frames.
    pub conversions: u64,
    /// Tables a fault replaced with a huge leaf at its goal level (a range
    /// uniform again, on a tree that merges).
    pub merges: u64,
}

/// The MMU's counters, each a slot of [`Counters`].
#[derive(Clone, Copy, Debug)]
pub(super) enum Count {
    Faults,
    Retries,
    Splits,
    LazySplits,
    SplitFallbacks,
    LockDrops,
    TablesLinked,
    TablesFreed,
    ExternalLeaked,
    MemoryFaults,
    Conversions,
    Merges,
}

/// Leaf counts come after the work counters.
const LEAVES: usize = Count::Merges as usize + 1;

/// Work counters and leaf counts, sharded per thread: a fault bumps its own
/// thread's cache line, never one that every vCPU writes.
#[derive(Default)]
pub(super) struct Counters(ShardedCounters<{ LEAVES + 3 }>);

impl Counters {
    pub(super) fn add(&self, count: Count, value: u64) {
        self.0.add(count as usize, value);
    }

    pub(super) fn get(&self, count: Count) -> u64 {
        self.0.get(count as usize)
    }

    /// `value` more leaves of `level`.
    pub(super) fn add_leaves(&self, level: Level, value: u64) {
        self.0.add(LEAVES + stat_index(level), value);
    }

    /// `value` fewer leaves of `level`.
    pub(super) fn sub_leaves(&self, level: Level, value: u64) {
        self.0.sub(LEAVES + stat_index(level), value);
    }

    pub(super) fn leaves(&self, level: Level) -> u64 {
        self.0.get(LEAVES + stat_index(level))
    }
}

impl TdpMmu {
    /// Leaf counts kept incrementally.
    pub fn page_stats(&self) -> PageStats {
        PageStats {
            pages_4k: self.counters.leaves(Level::L4K),
            pages_2m: self.counters.leaves(Level::L2M),
            pages_1g: self.counters.leaves(Level::L1G),
        }
    }

    /// Leaf and table counts from a walk of the whole tree; the leaf counts
    /// must equal [`page_stats`](Self::page_stats).
    pub fn recount(&self) -> (PageStats, usize) {
        let _guard = self.write_lock();
        let mut stats = PageStats::default();
        let mut tables = 0;
        for tree in self.trees() {
            self.walk_all(
                self.tree_root(tree),
                self.top_level(),
                &mut |entry, level| {
                    if entry.is_leaf(level) {
                        match level.get() {
                            1 => stats.pages_4k += 1,
                            2 => stats.pages_2m += 1,
                            _ => stats.pages_1g += 1,
                        }
                    } else {
                        tables += 1;
                    }
                },
            );
        }
        (stats, tables)
    }

    fn walk_all(&self, table_hpa: u64, level: Level, visit: &mut impl FnMut(Entry, Level)) {
        // SAFETY: callers hold the lock; the table is linked.
        let table = unsafe { entries(table_hpa) };
        for index in 0..512 {
            let entry = load(table, index);
            if !entry.is_present() {
                continue;
            }
            visit(entry, level);
            if !entry.is_leaf(level) {
                self.walk_all(
                    entry.addr(level),
                    level.below().expect("tables above 4K"),
                    visit,
                );
            }
        }
    }

    /// Pages this MMU holds from its pool: the root, linked tables, the
    /// split caches and the header slab's pages (vCPU caches not included).
    pub fn pages_held(&self) -> usize {
        let split = self.split_caches.lock().unwrap_or_else(|p| p.into_inner());
        let roots = 1 + usize::from(self.shared_root.is_some());
        roots + self.live_tables() + split.tables.nr_free() + self.header_slab.pages()
    }

    /// Tables linked below the root.
    pub fn live_tables(&self) -> usize {
        self.table_map().len()
    }

    /// Work counters.
    pub fn counters(&self) -> MmuCounters {
        let c = &self.counters;
        MmuCounters {
            faults: c.get(Count::Faults),
            retries: c.get(Count::Retries),
            splits: c.get(Count::Splits),
            lazy_splits: c.get(Count::LazySplits),
            split_fallbacks: c.get(Count::SplitFallbacks),
            lock_drops: c.get(Count::LockDrops),
            tables_linked: c.get(Count::TablesLinked),
            tables_freed: c.get(Count::TablesFreed),
            external_leaked: c.get(Count::ExternalLeaked),
            memory_faults: c.get(Count::MemoryFaults),
            conversions: c.get(Count::Conversions),
            merges: c.get(Count::Merges),
        }
    }
}
