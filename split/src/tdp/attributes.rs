//! Memory attributes: private and shared frames, and the conversions
//! between them (`KVM_SET_MEMORY_ATTRIBUTES`).

use std::sync::atomic::Ordering;

use mmu_cache::alloc::NoAllocSection;

use crate::addr::Gfn;
use crate::attributes::{MemoryAttribute, MemoryAttributes};
use crate::tdp::{MmuError, TdpMmu, VmType};

use super::stats::Count;
use super::walk::Tree;

/// What a [`TdpMmu::set_memory_attributes`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AttributeChange {
    /// Frames whose attribute changed.
    pub frames: u64,
    /// Huge leaves split so that the range's edges fall between leaves
    /// (a TD's private 2M leaves: BLOCK, TRACK and DEMOTE on the S-EPT).
    pub splits: u64,
    /// Leaves zapped over the range.
    pub zapped: u64,
}

/// An attribute change in progress: faults retry until it is dropped,
/// which bumps the sequence they check (the kernel's
/// `mmu_invalidate_begin` / `mmu_invalidate_end`).
struct Invalidation<'a> {
    mmu: &'a TdpMmu,
}

impl<'a> Invalidation<'a> {
    fn begin(mmu: &'a TdpMmu) -> Self {
        mmu.invalidations.fetch_add(1, Ordering::SeqCst);
        Self { mmu }
    }
}

impl Drop for Invalidation<'_> {
    fn drop(&mut self) {
        self.mmu.invalidate_seq.fetch_add(1, Ordering::SeqCst);
        self.mmu.invalidations.fetch_sub(1, Ordering::SeqCst);
    }
}

impl TdpMmu {
    /// The memory attribute of `gfn` (always shared on a default VM).
    pub fn memory_attribute(&self, gfn: Gfn) -> MemoryAttribute {
        self.attributes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(gfn)
    }

    /// A copy of the VM's memory attributes.
    pub fn memory_attributes(&self) -> MemoryAttributes {
        self.attributes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// `KVM_SET_MEMORY_ATTRIBUTES` of `[start, end)` to `attribute`, in the
    /// kernel's order: faults on the VM are held off (they retry) while the
    /// mappings of the range's old kind are zapped under the write lock;
    /// only then are the attributes recorded, with the mixed state of the huge-page ranges
    /// they touch, so that no later leaf spans both kinds.
    ///
    /// On a TD, converting private memory to shared first splits a private
    /// huge leaf that the range covers only partly
    /// ([`split_cross_boundary`](Self::split_cross_boundary), which the
    /// hooks turn into BLOCK, TRACK and DEMOTE), then removes only the
    /// range's leaves; converting to private zaps the range in the shared
    /// tree. A software-protected VM has one tree: a huge leaf over part of
    /// the range goes whole, and later faults may map huge again once the
    /// range is uniform.
    ///
    /// The VMM converts its guest memory file after this returns (the
    /// mappings are gone; the file may split or merge its huge pages).
    ///
    /// ```
    /// use mmu_cache::{PagePool, alloc::ChunkAllocator};
    /// use split::{
    ///     AccessKind, Gfn, Gpa, MemoryAttribute, Memslot, MmuConfig, MmuError, Pfn, TdpMmu, VmType,
    /// };
    ///
    /// let config = MmuConfig { vm_type: VmType::SoftwareProtected, ..MmuConfig::default() };
    /// let mmu = TdpMmu::new(PagePool::new(ChunkAllocator::anonymous()), config)?;
    /// mmu.add_memslot(Memslot::new(0, Gfn(0), 1024, Pfn(0x10_0000))?)?;
    /// let mut vcpu = mmu.new_vcpu_caches();
    /// mmu.fault(&mut vcpu, Gpa(0x1000), AccessKind::Write)?; // shared: the slot's frames
    /// mmu.set_memory_attributes(Gfn(1), Gfn(2), MemoryAttribute::Private)?;
    /// // A shared access to the page now exits to the VMM.
    /// assert!(matches!(
    ///     mmu.fault_as(&mut vcpu, Gpa(0x1000), AccessKind::Write, MemoryAttribute::Shared),
    ///     Err(MmuError::MemoryFault { private: false, .. })
    /// ));
    /// # Ok::<(), MmuError>(())
    /// ```
    pub fn set_memory_attributes(
        &self,
        start: Gfn,
        end: Gfn,
        attribute: MemoryAttribute,
    ) -> Result<AttributeChange, MmuError> {
        self.set_memory_attributes_with(start, end, attribute, || Ok(()))
    }

    /// [`set_memory_attributes`](Self::set_memory_attributes) with the
    /// VMM's own step between the zap and the recording of the attributes:
    /// `after_zap` runs with the range's old mappings gone and faults still
    /// held off, which is where a guest memory file converts (and splits or
    /// merges its huge pages). If it fails, the attributes stay as they
    /// were and its error is returned (the zapped mappings fault back in).
    pub fn set_memory_attributes_with(
        &self,
        start: Gfn,
        end: Gfn,
        attribute: MemoryAttribute,
        after_zap: impl FnOnce() -> Result<(), crate::memslot::PrivateMemoryError>,
    ) -> Result<AttributeChange, MmuError> {
        // The supported mask of a VM with no private memory is 0
        // (`kvm_supported_mem_attributes()`): only the private bit is
        // refused there (`attributes & ~supported`, EINVAL); shared, the
        // attributes 0, passes the check.
        if attribute == MemoryAttribute::Private && !self.config.vm_type.has_private_memory() {
            return Err(MmuError::NoPrivateMemory {
                what: "setting memory attributes",
            });
        }
        let width = match self.config.vm_type {
            VmType::Td { shared_bit } => u32::from(shared_bit),
            _ => self.top_level().shift() + 9,
        };
        if start >= end || end.0 > 1 << (width - 12) {
            return Err(MmuError::AttributeRange { start, end, width });
        }
        // Nothing to do where the whole range already has the attribute
        // (`kvm_vm_set_mem_attributes()` returns at once when
        // `kvm_range_has_memory_attributes()` holds): no zap, no split, no
        // VMM step, no conversion counted. A VM with no private memory has
        // every frame shared, so this is where its attributes 0 end.
        let already = self
            .attributes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .uniform(start, end)
            == Some(attribute);
        if already {
            return Ok(AttributeChange::default());
        }
        let _invalidation = Invalidation::begin(self);
        let mut change = AttributeChange::default();
        let tree = match (self.config.vm_type, attribute) {
            (VmType::Td { .. }, MemoryAttribute::Shared) => {
                change.splits = self.split_cross_boundary(start, end)?;
                Tree::Main
            }
            (VmType::Td { .. }, MemoryAttribute::Private) => Tree::Shared,
            _ => Tree::Main,
        };
        {
            let _guard = self.write_lock();
            let _no_alloc = NoAllocSection::enter();
            change.zapped = self.zap_tree(tree, start, end)?;
        }
        after_zap().map_err(|source| MmuError::PrivateMemory {
            gpa: start.gpa(),
            source,
        })?;
        // Outside the MMU lock (the run map may allocate): faults keep
        // retrying until the invalidation ends.
        change.frames = self
            .attributes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .set(start, end, attribute);
        if change.frames != 0 {
            self.counters.add(Count::Conversions, 1);
        }
        Ok(change)
    }
}
