//! Software vCPU accesses: the hardware walker with the vCPU's walk cache,
//! and translation without side effects.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::addr::{Gpa, Hpa};
use crate::ept::{ACCESSED, AccessKind, DIRTY, Entry, Level, WRITE};
use crate::tdp::{MmuError, TdpMmu, VcpuCaches};
use crate::translation::Access;

use super::vcpu::WalkCache;
use super::walk::{Next, Tree, entries, load};

impl TdpMmu {
    /// What the hardware walker does for a guest access: under the shared
    /// lock, find the leaf and set its accessed (and on write dirty) bit;
    /// a missing leaf or a write-protected one is a miss, to be handled by
    /// [`fault`](Self::fault). `vcpu` is the accessing vCPU: its walk cache
    /// remembers the leaf table of its last access.
    pub fn access(&self, vcpu: &mut VcpuCaches, gpa: Gpa, kind: AccessKind) -> Access {
        let write = kind == AccessKind::Write;
        let (tree, gfn) = self.place(gpa);
        let _guard = self.read_lock();
        let Some((table, index, level, entry)) = self.find_leaf_cached(&mut vcpu.walk, tree, gfn.0)
        else {
            return Access::Miss;
        };
        if write && !entry.has(WRITE) {
            return Access::Miss;
        }
        let bits = if write { ACCESSED | DIRTY } else { ACCESSED };
        if !entry.has(bits) {
            table[index].fetch_or(bits, Ordering::AcqRel);
        }
        let page = self.translation(entry, level, gfn.0).hpa;
        Access::Hit(Hpa(page.0 | gpa.page_offset()))
    }

    /// [`find_leaf`](Self::find_leaf) through a vCPU's walk cache: an
    /// access in the same 2 MiB region as the vCPU's last one reads the
    /// leaf table directly instead of walking from the root. Callers hold
    /// the lock.
    fn find_leaf_cached(
        &self,
        walk: &mut WalkCache,
        tree: Tree,
        gfn: u64,
    ) -> Option<(&[AtomicU64; 512], usize, Level, Entry)> {
        let shared = tree == Tree::Shared;
        // A fault that merges may move it under the shared lock too; the
        // table it unlinks stays allocated until the write lock.
        let generation = self.table_generation.load(Ordering::Relaxed);
        let cached = *walk;
        if cached.mmu == self.id
            && cached.generation == generation
            && cached.region == gfn >> 9
            && cached.shared == shared
        {
            // SAFETY: the table was linked for this region of this MMU when
            // it was cached, and no table had been unlinked since when the
            // generation was read. A merge may unlink it now, under the
            // shared lock, but it is only retired (its entries frozen, read
            // as not present) and freed under the write lock, which the
            // caller's lock excludes.
            let table = unsafe { entries(cached.table_hpa) };
            let index = Level::L4K.index(gfn);
            let entry = load(table, index);
            return entry
                .is_present()
                .then_some((table, index, Level::L4K, entry));
        }
        let found = self.find_leaf(tree, gfn)?;
        if found.2 == Level::L4K {
            *walk = WalkCache {
                mmu: self.id,
                generation,
                region: gfn >> 9,
                shared,
                table_hpa: found.0.as_ptr() as u64,
            };
        }
        Some(found)
    }

    /// Walks to the present leaf that maps `gfn`; callers hold the lock.
    pub(super) fn find_leaf(
        &self,
        tree: Tree,
        gfn: u64,
    ) -> Option<(&[AtomicU64; 512], usize, Level, Entry)> {
        self.walk(tree, gfn, |step| {
            if !step.entry.is_present() {
                Next::Stop(None)
            } else if step.entry.is_leaf(step.level) {
                Next::Stop(Some((step.table, step.index, step.level, step.entry)))
            } else {
                Next::Descend(step.entry.addr(step.level))
            }
        })
    }

    /// A guest write: [`access`](Self::access), faulting on a miss.
    pub fn write(&self, caches: &mut VcpuCaches, gpa: Gpa) -> Result<Hpa, MmuError> {
        match self.access(caches, gpa, AccessKind::Write) {
            Access::Hit(hpa) => Ok(hpa),
            Access::Miss => self.fault(caches, gpa, AccessKind::Write).map(|t| t.hpa),
        }
    }

    /// A guest read: [`access`](Self::access), faulting on a miss.
    pub fn read(&self, caches: &mut VcpuCaches, gpa: Gpa) -> Result<Hpa, MmuError> {
        match self.access(caches, gpa, AccessKind::Read) {
            Access::Hit(hpa) => Ok(hpa),
            Access::Miss => self.fault(caches, gpa, AccessKind::Read).map(|t| t.hpa),
        }
    }
}
