//! Merges: a fault whose goal is a huge leaf where a table of smaller
//! leaves lies (left by a conversion, or by dirty logging) puts the leaf
//! over the table, as `kvm_tdp_mmu_map()` does when it reaches the goal
//! level, and the table goes: its entries are frozen one by one (waiting
//! out any other fault that holds one frozen, as `handle_removed_pt()`
//! does), and its page is retired, to be freed when the write lock is next
//! taken. A TD's mirror tree never merges: its S-EPT would need a PROMOTE,
//! and the TDX huge-page work disallows merging on the mirror root.

use std::sync::atomic::Ordering;

use crate::addr::Gfn;
use crate::ept::{ADDR_MASK, Entry};
use crate::hooks::{HookError, HookVcpuState, TableRef};
use crate::memslot::Memslot;
use crate::tdp::{MmuError, TdpMmu, VmType};
use crate::translation::Translation;

use super::FROZEN;
use super::stats::Count;
use super::walk::{FrameSource, TableAt, Tree, WalkStep, cas, entries};

impl TdpMmu {
    /// Whether a fault on `tree` puts a huge leaf over a table: every tree
    /// but a mirror (a TD's main tree, or one whose hooks mirror it).
    pub(super) fn merges_tables(&self, tree: Tree) -> bool {
        tree == Tree::Shared || !(self.mirrored || matches!(self.config.vm_type, VmType::Td { .. }))
    }

    /// Replaces the table at the walk's entry with a leaf of the entry's
    /// level mapping `source`; `None` on a lost race. Runs under the shared
    /// lock with the vCPU's caches already topped up: it allocates nothing.
    pub(super) fn merge_table(
        &self,
        step: WalkStep<'_>,
        slot: &Memslot,
        source: FrameSource,
        write: bool,
        vcpu: Option<&mut dyn HookVcpuState>,
    ) -> Result<Option<Translation>, MmuError> {
        let WalkStep {
            tree,
            table,
            index,
            level,
            entry,
            gfn,
        } = step;
        let base_gfn = step.base_gfn();
        let leaf = self.new_leaf(slot, source, level, gfn, base_gfn, write)?;
        if !cas(table, index, entry, Entry::from_bits(FROZEN)) {
            return Ok(None);
        }
        let child = TableAt {
            tree,
            hpa: entry.addr(level),
            level: level.below().expect("tables live above 4K"),
            gfn: base_gfn,
        };
        self.detach_table(child);
        self.table_generation.fetch_add(1, Ordering::Relaxed);
        self.counters.add(Count::Merges, 1);
        let hooks = self.hooks_of(tree);
        if let Err(err) = hooks.set_leaf(Gfn(base_gfn), level, leaf, vcpu) {
            // The old mappings are gone; the next fault maps again.
            table[index].store(Entry::NON_PRESENT.bits(), Ordering::Release);
            return match err {
                HookError::Busy { .. } => Ok(None),
                refused => Err(refused.into()),
            };
        }
        table[index].store(leaf.bits(), Ordering::Release);
        self.counters.add_leaves(level, 1);
        Ok(Some(self.translation(leaf, level, gfn)))
    }

    /// Takes every entry of the unlinked table `at` (and of the tables
    /// below it): each is frozen, so that a fault still walking there fails
    /// its exchange and starts again from the root; its leaves are counted
    /// out and its tables retired.
    fn detach_table(&self, at: TableAt) {
        let hooks = self.hooks_of(at.tree);
        // SAFETY: the table was linked when the caller froze its entry, and
        // a retired table stays allocated until the write lock is taken,
        // which the caller's shared lock excludes.
        let table = unsafe { entries(at.hpa) };
        for (index, slot) in table.iter().enumerate() {
            let old = loop {
                let old = Entry::from_bits(slot.swap(FROZEN, Ordering::AcqRel));
                if old.bits() != FROZEN {
                    break old;
                }
                // Another fault holds this entry frozen while its hook
                // runs; it stores its result shortly.
                std::hint::spin_loop();
            };
            if !old.is_present() {
                continue;
            }
            let gfn = at.entry_gfn(index);
            if old.is_leaf(at.level) {
                // The hooks of a tree that merges take leaves back without
                // fail (they mirror nothing).
                let _ = hooks.remove_leaf(Gfn(gfn), at.level, old);
                self.counters.sub_leaves(at.level, 1);
            } else {
                self.detach_table(at.child(index, old));
            }
        }
        let table_ref = self.table_map().get(&at.hpa).map_or(
            TableRef {
                hpa: crate::addr::Hpa(at.hpa),
                external: None,
            },
            |header| header.table_ref(),
        );
        let _ = hooks.free_table(Gfn(at.gfn), at.level, table_ref);
        self.retire_table(at.hpa);
    }

    /// Pushes the unlinked table at `hpa` on the retired stack; its first
    /// entry links the next one (frozen bits with the next address: never
    /// present, never the value an exchange expects).
    fn retire_table(&self, hpa: u64) {
        // SAFETY: the table is unlinked and every entry frozen; it stays
        // allocated until `free_retired_tables`.
        let table = unsafe { entries(hpa) };
        let mut head = self.retired.load(Ordering::Acquire);
        loop {
            table[0].store(FROZEN | head, Ordering::Release);
            match self
                .retired
                .compare_exchange(head, hpa, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return,
                Err(now) => head = now,
            }
        }
    }

    /// Frees the retired tables; the caller holds the write lock, so no
    /// walker is inside one.
    pub(super) fn free_retired_tables(&self) {
        let mut hpa = self.retired.swap(0, Ordering::AcqRel);
        while hpa != 0 {
            // SAFETY: a retired table, still allocated; the write lock
            // keeps every walker out.
            let next = unsafe { entries(hpa) }[0].load(Ordering::Acquire) & ADDR_MASK;
            self.free_table(hpa);
            hpa = next;
        }
    }
}
