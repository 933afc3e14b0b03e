//! Faults: a walk from the root under the shared lock, tables and leaves
//! installed with compare-and-exchange, lazy splits of write-protected huge
//! leaves.

use std::sync::atomic::Ordering;

use mmu_cache::Page;
use mmu_cache::alloc::NoAllocSection;

use crate::addr::{Gfn, Gpa, Hpa, Pfn};
use crate::attributes::MemoryAttribute;
use crate::ept::{self, ACCESSED, AccessKind, DIRTY, Entry, Level, WRITE};
use crate::hooks::{ExternalTablePage, HookError, HookVcpuState, TableRef, Topup};
use crate::memslot::Memslot;
use crate::tdp::{MmuError, TableHeader, TdpMmu, VcpuCaches, VmType};
use crate::translation::Translation;

use super::FROZEN;
use super::stats::Count;
use super::walk::{FrameSource, Next, Tree, WalkStep, cas};

impl TdpMmu {
    /// Handles a fault at `gpa`: tops up `caches` (outside the lock), then
    /// maps the frame under the shared lock, with the largest leaf the slot
    /// (and, for private memory, its page and the memory attributes)
    /// allows unless dirty logging forbids huge ones.
    ///
    /// Whether the fault is private follows the VM's type: a TD's accesses
    /// without the shared bit are; on a software-protected VM the frame's
    /// attribute says (as the kernel does); a default VM has no private
    /// memory. See [`fault_as`](Self::fault_as) to give the kind yourself.
    pub fn fault(
        &self,
        caches: &mut VcpuCaches,
        gpa: Gpa,
        access: AccessKind,
    ) -> Result<Translation, MmuError> {
        let attribute = match self.config.vm_type {
            VmType::Default => MemoryAttribute::Shared,
            VmType::SoftwareProtected => self.memory_attribute(gpa.gfn()),
            VmType::Td { shared_bit } if gpa.0 & (1 << shared_bit) == 0 => MemoryAttribute::Private,
            VmType::Td { .. } => MemoryAttribute::Shared,
        };
        self.fault_as(caches, gpa, access, attribute)
    }

    /// A fault whose kind the hardware flagged (`PFERR_PRIVATE_ACCESS`):
    /// `attribute` (the kind of the access) must match the frame's memory
    /// attribute, or the fault is a [`MmuError::MemoryFault`] for the VMM
    /// to convert the range and retry. A private fault takes its frame from
    /// the slot's private memory.
    pub fn fault_as(
        &self,
        caches: &mut VcpuCaches,
        gpa: Gpa,
        access: AccessKind,
        attribute: MemoryAttribute,
    ) -> Result<Translation, MmuError> {
        let private = attribute == MemoryAttribute::Private;
        let write = access == AccessKind::Write;
        let (tree, gfn) = self.place(gpa);
        if gfn.gpa().0 >> (self.top_level().shift() + 9) != 0 {
            return Err(MmuError::AddressTooWide {
                gpa,
                levels: self.config.levels,
            });
        }
        if private && !self.config.vm_type.has_private_memory() {
            return Err(MmuError::NoPrivateMemory {
                what: "a private fault",
            });
        }
        if private && tree == Tree::Shared {
            return Err(MmuError::PrivateWithSharedBit { gpa });
        }
        // The slot list, loaded without a lock or a shared write; the guard
        // keeps it for the whole fault.
        let slots = self.slots.load();
        let Some(slot) = slots.iter().find(|slot| slot.contains(gfn)) else {
            return Err(self.noslot_fault(gpa, gfn, private));
        };
        self.counters.add(Count::Faults, 1);
        let capacity = self.config.vcpu_cache_capacity;
        loop {
            let seq = self.invalidate_seq.load(Ordering::SeqCst);
            let (source, attribute_cap) = self.fault_frame(slot, gpa, gfn, private)?;
            caches.topup_for_fault(
                capacity,
                self.external_of(tree).then_some(self.config.levels),
            )?;
            self.hooks_of(tree).topup(
                Topup::Fault {
                    levels: self.config.levels,
                },
                caches.hook_state(),
            )?;
            self.reserve_tables(self.config.levels as usize);
            let guard = self.read_lock();
            // An attribute change began or ended since the frame was looked
            // up: what it found may be stale (the kernel's
            // `mmu_invalidate_retry_gfn`). Go round again.
            if self.invalidations.load(Ordering::SeqCst) != 0
                || self.invalidate_seq.load(Ordering::SeqCst) != seq
            {
                drop(guard);
                self.counters.add(Count::Retries, 1);
                std::thread::yield_now();
                continue;
            }
            let _no_alloc = NoAllocSection::enter();
            let frame = FaultFrame {
                source,
                attribute_cap,
            };
            match self.map(tree, caches, slot, gfn.0, write, frame)? {
                Some(translation) => {
                    return Ok(Translation {
                        hpa: Hpa(translation.hpa.0 | gpa.page_offset()),
                        ..translation
                    });
                }
                None => {
                    self.counters.add(Count::Retries, 1);
                }
            }
        }
    }

    /// A fault whose `gfn` no memslot holds. On a VM with private memory
    /// the private/shared check comes first (`kvm_mmu_faultin_pfn()` tests
    /// `fault->is_private != kvm_mem_is_private()` before it looks at the
    /// slot), and `kvm_handle_noslot_fault()` turns a private fault into a
    /// memory-fault exit: so a private fault, or a shared one to a frame
    /// whose attribute is private, exits to the VMM with the private flag
    /// as the access had it (the selftest `private_mem_kvm_exits_test`'s
    /// `test_private_access_memslot_deleted`). Any other is
    /// [`MmuError::NoSlot`] (emulated MMIO).
    fn noslot_fault(&self, gpa: Gpa, gfn: Gfn, private: bool) -> MmuError {
        if self.config.vm_type.has_private_memory() {
            let attribute = self
                .attributes
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(gfn);
            if private || attribute == MemoryAttribute::Private {
                return self.memory_fault_exit(gfn, private);
            }
        }
        MmuError::NoSlot { gpa }
    }

    /// The memory-fault exit of a fault at `gfn`, counted: the page, as
    /// `kvm_mmu_prepare_memory_fault_exit()` reports it
    /// (`gfn_to_gpa(fault->gfn)` and `PAGE_SIZE`), so page-aligned and, on
    /// a TD, without the shared bit (the fault's gfn has it stripped).
    fn memory_fault_exit(&self, gfn: Gfn, private: bool) -> MmuError {
        self.counters.add(Count::MemoryFaults, 1);
        MmuError::MemoryFault {
            gpa: gfn.gpa(),
            size: PAGE_BYTES,
            private,
        }
    }

    /// Where the frame of a fault at `gfn` comes from, and the largest leaf
    /// the memory attributes allow there; checked before the lock, as the
    /// kernel's `kvm_mmu_faultin_pfn` does.
    fn fault_frame(
        &self,
        slot: &Memslot,
        gpa: Gpa,
        gfn: Gfn,
        private: bool,
    ) -> Result<(FrameSource, Level), MmuError> {
        if !self.config.vm_type.has_private_memory() {
            return Ok((FrameSource::Slot, Level::L1G));
        }
        let (attribute, cap) = {
            let attributes = self.attributes.read().unwrap_or_else(|p| p.into_inner());
            (attributes.get(gfn), attributes.max_level(gfn))
        };
        let memory_fault = || self.memory_fault_exit(gfn, private);
        if (attribute == MemoryAttribute::Private) != private {
            return Err(memory_fault());
        }
        if !private {
            return Ok((FrameSource::Slot, cap));
        }
        let Some(memory) = slot.private_memory() else {
            return Err(memory_fault());
        };
        let page = memory
            .get_pfn(gfn - slot.base_gfn())
            .map_err(|source| MmuError::PrivateMemory { gpa, source })?;
        Ok((
            FrameSource::Private {
                pfn: page.pfn,
                max_level: private_max_level(slot, gfn, page),
            },
            cap,
        ))
    }

    /// One attempt at mapping `gfn` in `tree`; `None` means a race was
    /// lost: retry.
    pub(super) fn map(
        &self,
        tree: Tree,
        caches: &mut VcpuCaches,
        slot: &Memslot,
        gfn: u64,
        write: bool,
        frame: FaultFrame,
    ) -> Result<Option<Translation>, MmuError> {
        let goal = if slot.logging() {
            Level::L4K
        } else {
            let by_frame = match frame.source {
                FrameSource::Slot => slot.max_level(Gfn(gfn)),
                FrameSource::Private { max_level, .. } => max_level,
            };
            by_frame
                .min(frame.attribute_cap)
                .min(self.max_leaf_of(tree))
        };
        self.walk(tree, gfn, |step| {
            let WalkStep {
                table: _,
                index: _,
                level,
                entry,
                ..
            } = step;
            if entry.bits() == FROZEN {
                return Next::Stop(Ok(None));
            }
            let at_goal = level <= goal;
            // A leaf that already allows the access makes the fault spurious:
            // keep it. Only a write to a write-protected huge leaf above the
            // goal replaces it (the lazy split).
            let usable = !write || entry.has(WRITE);
            if entry.is_leaf(level) && (at_goal || !entry.is_huge_leaf(level) || usable) {
                return Next::Stop(Ok(self.touch_leaf(step, write)));
            }
            if entry.is_present() && !entry.is_leaf(level) {
                // A table where the huge leaf of the goal goes (left by a
                // conversion or by dirty logging): `kvm_tdp_mmu_map()`
                // stops at the goal level and puts the leaf over it, on
                // every tree but a TD's mirror, which keeps its tables.
                if at_goal && self.merges_tables(tree) {
                    return Next::Stop(self.merge_table(
                        step,
                        slot,
                        frame.source,
                        write,
                        caches.hook_state(),
                    ));
                }
                // A table above the goal: map inside it.
                return Next::Descend(entry.addr(level));
            }
            if at_goal {
                return Next::Stop(self.install_leaf(
                    step,
                    slot,
                    frame.source,
                    write,
                    caches.hook_state(),
                ));
            }
            // Above the goal: descend, installing a table where needed. A
            // write-protected huge leaf in the way is split into a full table
            // of its 512 children (the kernel's `tdp_mmu_split_huge_page` in
            // `kvm_tdp_mmu_map`), so its other mappings stay.
            let linked = if entry.is_huge_leaf(level) {
                let split = self.split_leaf(caches, step, false);
                if matches!(split, Ok(Some(_))) {
                    self.counters.add(Count::LazySplits, 1);
                }
                split
            } else {
                self.link_new_table(caches, step)
            };
            match linked {
                Ok(Some(new_hpa)) => Next::Descend(new_hpa),
                Ok(None) => Next::Stop(Ok(None)),
                Err(err) => Next::Stop(Err(err)),
            }
        })
    }

    /// A present leaf was found: mark it accessed (and dirty on write), or
    /// make a write-protected one writable. Returns the translation.
    fn touch_leaf(&self, step: WalkStep<'_>, write: bool) -> Option<Translation> {
        let WalkStep {
            table,
            index,
            level,
            entry,
            gfn,
            ..
        } = step;
        let wanted = if write {
            entry.with(WRITE | ACCESSED | DIRTY)
        } else {
            entry.with(ACCESSED)
        };
        if wanted != entry && !cas(table, index, entry, wanted) {
            return None;
        }
        Some(self.translation(wanted, level, gfn))
    }

    pub(super) fn translation(&self, leaf: Entry, level: Level, gfn: u64) -> Translation {
        let offset_pages = gfn & (level.entry_pages() - 1);
        Translation {
            hpa: Hpa(leaf.addr(level) + (offset_pages << 12)),
            perms: leaf.perms(),
            memtype: leaf.memtype_bits(),
            level,
            entry: leaf,
        }
    }

    /// Installs a leaf at the walk's non-present entry; `None` on a lost
    /// race.
    fn install_leaf(
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
            gfn,
            ..
        } = step;
        let base_gfn = step.base_gfn();
        let leaf = self.new_leaf(slot, source, level, gfn, base_gfn, write)?;
        let old = Entry::NON_PRESENT;
        if !cas(table, index, old, Entry::from_bits(FROZEN)) {
            return Ok(None);
        }
        if let Err(err) = self
            .hooks_of(tree)
            .set_leaf(Gfn(base_gfn), level, leaf, vcpu)
        {
            table[index].store(old.bits(), Ordering::Release);
            return match err {
                HookError::Busy { .. } => Ok(None),
                refused => Err(refused.into()),
            };
        }
        table[index].store(leaf.bits(), Ordering::Release);
        self.counters.add_leaves(level, 1);
        Ok(Some(self.translation(leaf, level, gfn)))
    }

    /// The leaf of `level` that maps `gfn` (its first frame `base_gfn`)
    /// from `source`, accessed, and dirty for a write.
    pub(super) fn new_leaf(
        &self,
        slot: &Memslot,
        source: FrameSource,
        level: Level,
        gfn: u64,
        base_gfn: u64,
        write: bool,
    ) -> Result<Entry, MmuError> {
        let base_pfn = match source {
            FrameSource::Slot => slot.host_pfn(Gfn(base_gfn)),
            FrameSource::Private { pfn, .. } => Pfn(pfn.0 - (gfn - base_gfn)),
        };
        let leaf =
            Entry::leaf(level, base_pfn.hpa().0, ept::RWX, self.config.memtype)?.with(ACCESSED);
        Ok(if write { leaf.with(DIRTY) } else { leaf })
    }

    /// Links a new empty table at the walk's non-present entry. Returns the
    /// new table's address, or `None` on a lost race.
    fn link_new_table(
        &self,
        caches: &mut VcpuCaches,
        step: WalkStep<'_>,
    ) -> Result<Option<u64>, MmuError> {
        let WalkStep {
            tree,
            table,
            index,
            level,
            ..
        } = step;
        let old = Entry::NON_PRESENT;
        let base_gfn = step.base_gfn();
        let below = level.below().expect("tables live above 4K");
        let page = caches.tables.alloc()?;
        let external = if self.external_of(tree) {
            Some(caches.external.alloc()?)
        } else {
            None
        };
        let hpa = page.addr() as u64;
        let table_ref = TableRef {
            hpa: Hpa(hpa),
            external: external.as_ref().map(|p| Hpa(p.addr() as u64)),
        };
        let give_back =
            |caches: &mut VcpuCaches, page, external: Option<Page<ExternalTablePage>>| {
                caches.tables.free(page);
                if let Some(external) = external {
                    caches.external.free(external);
                }
            };
        if !cas(table, index, old, Entry::from_bits(FROZEN)) {
            give_back(caches, page, external);
            return Ok(None);
        }
        if let Err(err) =
            self.hooks_of(tree)
                .link_table(Gfn(base_gfn), below, table_ref, caches.hook_state())
        {
            table[index].store(old.bits(), Ordering::Release);
            give_back(caches, page, external);
            return match err {
                HookError::Busy { .. } => Ok(None),
                refused => Err(refused.into()),
            };
        }
        let mut header = caches.headers.alloc()?;
        *header = TableHeader {
            gfn: Gfn(base_gfn),
            level: below.get(),
            page: Some(page),
            external,
        };
        self.insert_table(hpa, header);
        table[index].store(Entry::table(hpa).bits(), Ordering::Release);
        self.counters.add(Count::TablesLinked, 1);
        Ok(Some(hpa))
    }
}

use mmukit_sys::size::PAGE_4K as PAGE_BYTES;

/// What a fault maps: where the frame comes from, and the largest leaf the
/// memory attributes allow.
#[derive(Clone, Copy, Debug)]
pub(super) struct FaultFrame {
    pub(super) source: FrameSource,
    pub(super) attribute_cap: Level,
}

/// The largest leaf a private page allows at `gfn`: no bigger than the page
/// (its order), with guest and host frames aligned alike, and inside the
/// slot (the kernel's `kvm_max_private_mapping_level` with the slot's
/// `lpage_info` edges).
fn private_max_level(slot: &Memslot, gfn: Gfn, page: crate::memslot::PrivatePage) -> Level {
    for level in [Level::L1G, Level::L2M] {
        let pages = level.entry_pages();
        let start = gfn.align_down(pages);
        if u32::from(page.order) >= pages.trailing_zeros()
            && page.pfn.0.wrapping_sub(gfn.0).is_multiple_of(pages)
            && start >= slot.base_gfn()
            && start + pages <= slot.end_gfn()
        {
            return level;
        }
    }
    Level::L4K
}
