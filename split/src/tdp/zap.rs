//! Zaps and teardown: leaves and tables taken back through the hooks.

use std::ops::Range;
use std::sync::atomic::Ordering;

use mmu_cache::alloc::NoAllocSection;

use crate::addr::{Gfn, Hpa};
use crate::ept::{self, DIRTY, Entry, Level};
use crate::hooks::TableRef;
use crate::tdp::{MmuError, TdpMmu};

use super::stats::Count;
use super::walk::{TableAt, Tree, entries, load};

/// What [`TdpMmu::teardown`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TeardownReport {
    /// Leaves taken back.
    pub leaves: u64,
    /// Leaves whose hook failed (cleared from the tree all the same).
    pub leaf_errors: u64,
    /// Tables freed.
    pub tables: u64,
    /// External pages leaked because the hooks could not take them back.
    pub external_leaked: u64,
}

impl TdpMmu {
    /// Unmaps every leaf that overlaps `[start_gfn, end_gfn)` (a huge leaf
    /// that overlaps only partly goes whole) and frees tables left empty
    /// inside the range.
    ///
    /// A TD's shared tree is zapped as well as its main one.
    pub fn zap_range(&self, start_gfn: Gfn, end_gfn: Gfn) -> Result<(), MmuError> {
        let _guard = self.write_lock();
        let _no_alloc = NoAllocSection::enter();
        for tree in self.trees() {
            self.zap_tree(tree, start_gfn, end_gfn)?;
        }
        Ok(())
    }

    /// Zaps `[start_gfn, end_gfn)` in `tree`; the caller holds the write
    /// lock. Returns the leaves zapped.
    pub(super) fn zap_tree(
        &self,
        tree: Tree,
        start_gfn: Gfn,
        end_gfn: Gfn,
    ) -> Result<u64, MmuError> {
        let mut zapped = 0;
        self.zap_table(
            TableAt::root(self, tree),
            start_gfn.0..end_gfn.0,
            &mut zapped,
        )?;
        Ok(zapped)
    }

    /// Zaps the leaves of `at` and below that overlap `range` (frames),
    /// counting them in `zapped`; frees the tables left empty inside it.
    fn zap_table(&self, at: TableAt, range: Range<u64>, zapped: &mut u64) -> Result<(), MmuError> {
        let (start, end, level) = (range.start, range.end, at.level);
        let hooks = self.hooks_of(at.tree);
        // SAFETY: the write lock is held and the table is linked.
        let table = unsafe { entries(at.hpa) };
        let pages = level.entry_pages();
        for index in 0..512 {
            let gfn = at.entry_gfn(index);
            if gfn + pages <= start || gfn >= end {
                continue;
            }
            let entry = load(table, index);
            if !entry.is_present() {
                continue;
            }
            if entry.is_leaf(level) {
                hooks.remove_leaf(Gfn(gfn), level, entry)?;
                *zapped += 1;
                let old = Entry::from_bits(table[index].swap(ept::NON_PRESENT, Ordering::AcqRel));
                self.counters.sub_leaves(level, 1);
                // A write the log has not seen yet must not vanish with the leaf.
                if old.has(DIRTY) {
                    self.log_zapped_dirty(gfn, level);
                }
                continue;
            }
            let child_at = at.child(index, entry);
            let (below, child) = (child_at.level, child_at.hpa);
            self.zap_table(child_at, range.clone(), zapped)?;
            if gfn >= start && gfn + pages <= end {
                let table_ref = self.table_map().get(&child).map_or(
                    TableRef {
                        hpa: Hpa(child),
                        external: None,
                    },
                    |h| h.table_ref(),
                );
                hooks.free_table(Gfn(gfn), below, table_ref)?;
                table[index].store(ept::NON_PRESENT, Ordering::Release);
                self.table_generation.fetch_add(1, Ordering::Relaxed);
                self.free_table(child);
            }
        }
        Ok(())
    }

    /// Tears the MMU down for a VM that is going away: the hooks are told
    /// first ([`ExternalPageTable::teardown`]), then every leaf and table is
    /// taken back through them. A table whose external page the hooks
    /// cannot take back keeps that page out of the allocator (leaked and
    /// counted) rather than let the host reuse memory the external side
    /// may still own. Afterwards only the root is left. A second call does
    /// nothing.
    pub fn teardown(&self) -> Result<TeardownReport, MmuError> {
        let _guard = self.write_lock();
        let _no_alloc = NoAllocSection::enter();
        if self.torn_down.load(Ordering::Acquire) {
            return Ok(TeardownReport::default());
        }
        self.hooks.teardown()?;
        self.torn_down.store(true, Ordering::Release);
        let mut report = TeardownReport::default();
        for tree in self.trees() {
            self.teardown_table(TableAt::root(self, tree), &mut report);
        }
        Ok(report)
    }

    fn teardown_table(&self, at: TableAt, report: &mut TeardownReport) {
        let level = at.level;
        let hooks = self.hooks_of(at.tree);
        // SAFETY: the write lock is held and the table is linked.
        let table = unsafe { entries(at.hpa) };
        for index in 0..512 {
            let entry = load(table, index);
            if !entry.is_present() {
                continue;
            }
            let gfn = at.entry_gfn(index);
            if entry.is_leaf(level) {
                match hooks.remove_leaf(Gfn(gfn), level, entry) {
                    Ok(()) => report.leaves += 1,
                    Err(_) => report.leaf_errors += 1,
                }
                table[index].store(ept::NON_PRESENT, Ordering::Release);
                self.counters.sub_leaves(level, 1);
                continue;
            }
            let child_at = at.child(index, entry);
            let (below, child) = (child_at.level, child_at.hpa);
            self.teardown_table(child_at, report);
            table[index].store(ept::NON_PRESENT, Ordering::Release);
            self.table_generation.fetch_add(1, Ordering::Relaxed);
            let Some(mut header) = self.remove_table(child) else {
                continue;
            };
            if hooks
                .free_table(Gfn(gfn), below, header.table_ref())
                .is_err()
                && let Some(external) = header.external.take()
            {
                // The external side may still own it: never back to the host.
                let _ = external.into_raw();
                report.external_leaked += 1;
                self.counters.add(Count::ExternalLeaked, 1);
            }
            drop(header);
            report.tables += 1;
            self.counters.add(Count::TablesFreed, 1);
        }
    }

    fn log_zapped_dirty(&self, gfn: u64, level: Level) {
        let Some(slot) = self.slot_for_gfn(Gfn(gfn)) else {
            return;
        };
        if !slot.logging() {
            return;
        }
        let first = Gfn(gfn).max(slot.base_gfn());
        let last = (Gfn(gfn) + level.entry_pages()).min(slot.end_gfn());
        for page in first.until(last) {
            slot.mark_dirty(Gfn(page));
        }
    }

    pub(super) fn free_table(&self, hpa: u64) {
        let header = self.remove_table(hpa);
        debug_assert!(header.is_some(), "table {hpa:#x} has no header");
        drop(header);
        self.counters.add(Count::TablesFreed, 1);
    }
}
