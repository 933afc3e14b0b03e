//! # mmukit-private
//!
//! Guest memory files as the private memory of the MMUs. `split` knows
//! nothing of files and `gmem` nothing of MMUs; this crate joins them the
//! way KVM joins `guest_memfd` to its memslots:
//!
//! - [`FilePrivateMemory`] is a [`split::PrivateMemory`] over a range of a
//!   [`gmem::GuestMemFile`]: the frame of a page (through a guest view of
//!   the file, whose addresses survive huge-page splits and merges) and the
//!   order of the page behind it (`kvm_gmem_get_pfn`).
//! - [`PrivateMemoryVm`] binds files to the slots of a [`split::TdpMmu`]
//!   and converts ranges in the kernel's order: the MMU holds faults off
//!   and zaps (a TD's private huge leaf split first), the file converts
//!   (splitting or merging its HugeTLB pages), then the attributes are
//!   recorded and faults go on.
//!
//! ```
//! use std::sync::Arc;
//! use gmem::{Backend, GmemConfig, GuestMemFile};
//! use gmem::consts::GUEST_MEMFD_FLAG_MMAP;
//! use mmu_cache::{PagePool, alloc::ChunkAllocator};
//! use mmukit_private::PrivateMemoryVm;
//! use split::{AccessKind, Gfn, Gpa, MemoryAttribute, Memslot, MmuConfig, Pfn, TdpMmu, VmType};
//!
//! let config = MmuConfig { vm_type: VmType::SoftwareProtected, ..MmuConfig::default() };
//! let mmu = Arc::new(TdpMmu::new(PagePool::new(ChunkAllocator::anonymous()), config)?);
//! let file = GuestMemFile::create(&Backend::Memfd, GmemConfig {
//!     size: 4 << 20, flags: GUEST_MEMFD_FLAG_MMAP, huge_page_size_log2: 0,
//! })?;
//! let mut vm = PrivateMemoryVm::new(mmu.clone());
//! // 4 MiB at gpa 0: shared frames from 0x10_0000, private ones from the file.
//! vm.bind(Memslot::new(0, Gfn(0), 1024, Pfn(0x10_0000))?, &file, 0)?;
//! vm.convert(Gfn(0), Gfn(1024), MemoryAttribute::Private)?;
//! let mut vcpu = mmu.new_vcpu_caches();
//! let t = mmu.fault(&mut vcpu, Gpa(0x3000), AccessKind::Write)?;
//! assert_eq!(Some(t.hpa.pfn().0), vm.binding(0).unwrap().private_memory().frame(3));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::sync::Arc;

use gmem::{Attribute, FileMetrics, GmemError, GuestMemFile, View};
use split::{
    AttributeChange, Gfn, Level, MemoryAttribute, Memslot, MemslotError, MmuError, Pfn,
    PrivateMemory, PrivateMemoryError, PrivatePage, TdpMmu,
};

/// Errors of binding files and converting memory.
#[derive(Debug, thiserror::Error)]
pub enum PrivateError {
    /// The guest memory file refused (a mapping, a conversion).
    #[error("guest memory file: {0}")]
    File(#[from] GmemError),
    /// The MMU refused (a slot, an attribute change).
    #[error(transparent)]
    Mmu(#[from] MmuError),
    /// The slot does not fit the file from the offset.
    #[error(
        "slot {slot}: {pages} pages from file offset {offset:#x} pass the file's end ({size:#x})"
    )]
    PastFile {
        /// The slot.
        slot: u32,
        /// The slot's pages.
        pages: u64,
        /// The file offset.
        offset: u64,
        /// The file's size.
        size: u64,
    },
    /// The file offset is not page aligned.
    #[error("file offset {0:#x} is not page aligned")]
    Unaligned(u64),
}

/// The largest leaf that may map `file`'s memory in a slot's shared
/// faults: the host's page size over it ([`GuestMemFile::host_page_size`])
/// as a level, for [`Memslot::with_host_page_level`].
pub fn host_page_level(file: &GuestMemFile) -> Level {
    Level::of_page_size(file.host_page_size()).expect("host pages are 4 KiB, 2 MiB or 1 GiB")
}

/// Memslot `id` of the guest frames from `base_gfn` over all of `view`, a
/// view of `file`: its host frames are the view's, and its leaves are no
/// larger than the host's pages over the file ([`host_page_level`]), as a
/// KVM slot maps its `userspace_addr`.
pub fn slot_over_view(
    id: u32,
    base_gfn: Gfn,
    file: &GuestMemFile,
    view: &View,
) -> Result<Memslot, MemslotError> {
    Ok(Memslot::new(
        id,
        base_gfn,
        view.len() / 4096,
        Pfn(view.as_ptr() as u64 >> 12),
    )?
    .with_host_page_level(host_page_level(file)))
}

/// The private memory of one slot: pages `[offset, offset + pages * 4096)`
/// of a guest memory file, reached through a guest view of that range.
#[derive(Debug)]
pub struct FilePrivateMemory {
    file: GuestMemFile,
    view: View,
    offset: u64,
    pages: u64,
}

impl FilePrivateMemory {
    /// `pages` pages of `file` from `offset`, mapped through a guest view.
    pub fn new(file: &GuestMemFile, offset: u64, pages: u64) -> Result<Self, GmemError> {
        let view = file.map_guest(offset, pages * 4096)?;
        Ok(Self {
            file: file.clone(),
            view,
            offset,
            pages,
        })
    }

    /// The host frame of slot page `slot_page`, if the range has it.
    pub fn frame(&self, slot_page: u64) -> Option<u64> {
        (slot_page < self.pages)
            .then(|| self.view.host_frame(self.offset + slot_page * 4096))
            .flatten()
    }

    /// The file.
    pub fn file(&self) -> &GuestMemFile {
        &self.file
    }

    /// The file offset of slot page 0.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The guest view the frames come from.
    pub fn view(&self) -> &View {
        &self.view
    }
}

impl PrivateMemory for FilePrivateMemory {
    fn get_pfn(&self, slot_page: u64) -> Result<PrivatePage, PrivateMemoryError> {
        let pfn = self.frame(slot_page).ok_or_else(|| {
            format!(
                "slot page {slot_page:#x} is past the {} pages bound from the file",
                self.pages
            )
        })?;
        Ok(PrivatePage {
            pfn: Pfn(pfn),
            order: self.file.page_order(self.offset + slot_page * 4096),
        })
    }
}

/// A slot bound to a file.
#[derive(Debug)]
pub struct Binding {
    slot: Arc<Memslot>,
    private: Arc<FilePrivateMemory>,
}

impl Binding {
    /// The slot.
    pub fn slot(&self) -> &Arc<Memslot> {
        &self.slot
    }

    /// Its private memory.
    pub fn private_memory(&self) -> &FilePrivateMemory {
        &self.private
    }
}

/// What one [`PrivateMemoryVm::convert`] did, in the MMU and the files.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConversionReport {
    /// The MMU's side: frames changed, huge leaves split at the edges
    /// (a TD's DEMOTEs), leaves zapped.
    pub mmu: AttributeChange,
    /// Huge pages the files split.
    pub file_splits: u64,
    /// Huge pages the files merged back.
    pub file_merges: u64,
}

/// An MMU with guest memory files bound to its slots.
#[derive(Debug)]
pub struct PrivateMemoryVm {
    mmu: Arc<TdpMmu>,
    bindings: Vec<Binding>,
}

impl PrivateMemoryVm {
    /// No bindings yet.
    pub fn new(mmu: Arc<TdpMmu>) -> Self {
        Self {
            mmu,
            bindings: Vec::new(),
        }
    }

    /// The MMU.
    pub fn mmu(&self) -> &Arc<TdpMmu> {
        &self.mmu
    }

    /// Adds `slot` to the MMU with private memory from `file` at `offset`
    /// (`KVM_SET_USER_MEMORY_REGION2` with `guest_memfd` and
    /// `guest_memfd_offset`): shared faults keep using the slot's host
    /// frames, private ones take the file's.
    pub fn bind(
        &mut self,
        slot: Memslot,
        file: &GuestMemFile,
        offset: u64,
    ) -> Result<&Binding, PrivateError> {
        if !offset.is_multiple_of(4096) {
            return Err(PrivateError::Unaligned(offset));
        }
        let pages = slot.npages();
        if offset
            .checked_add(pages * 4096)
            .is_none_or(|end| end > file.size())
        {
            return Err(PrivateError::PastFile {
                slot: slot.id(),
                pages,
                offset,
                size: file.size(),
            });
        }
        let private = Arc::new(FilePrivateMemory::new(file, offset, pages)?);
        let slot = self
            .mmu
            .add_memslot(slot.with_private_memory(private.clone()))?;
        self.bindings.push(Binding { slot, private });
        Ok(self.bindings.last().expect("just pushed"))
    }

    /// The binding of slot `id`.
    pub fn binding(&self, id: u32) -> Option<&Binding> {
        self.bindings.iter().find(|b| b.slot.id() == id)
    }

    /// Every binding.
    pub fn bindings(&self) -> &[Binding] {
        &self.bindings
    }

    /// Converts `[start, end)` to `attribute` in the kernel's order: the
    /// MMU holds faults off and zaps the range's mappings of the old kind
    /// (on a TD, splitting a private huge leaf the range covers in part);
    /// each bound file converts its part of the range, splitting a
    /// HugeTLB page that becomes mixed and merging one that becomes
    /// uniform; then the attributes are recorded and faults go on.
    ///
    /// As for any conversion, the guest must stay off the huge pages being
    /// split or merged while this runs (a file copies their data).
    pub fn convert(
        &self,
        start: Gfn,
        end: Gfn,
        attribute: MemoryAttribute,
    ) -> Result<ConversionReport, PrivateError> {
        let before = self.file_metrics();
        let to = match attribute {
            MemoryAttribute::Private => Attribute::Private,
            MemoryAttribute::Shared => Attribute::Shared,
        };
        let mmu = self
            .mmu
            .set_memory_attributes_with(start, end, attribute, || {
                for binding in &self.bindings {
                    let slot = &binding.slot;
                    let (s, e) = (start.max(slot.base_gfn()), end.min(slot.end_gfn()));
                    if s >= e {
                        continue;
                    }
                    let private = &binding.private;
                    let offset = private.offset + (s - slot.base_gfn()) * 4096;
                    private.file.convert(offset, (e - s) * 4096, to)?;
                }
                Ok(())
            })?;
        let after = self.file_metrics();
        Ok(ConversionReport {
            mmu,
            file_splits: after.splits - before.splits,
            file_merges: after.merges - before.merges,
        })
    }

    /// File counters summed over the bound files (each file once).
    pub fn file_metrics(&self) -> FileMetrics {
        let mut seen: Vec<&GuestMemFile> = Vec::new();
        let mut sum = FileMetrics::default();
        for binding in &self.bindings {
            let file = &binding.private.file;
            if seen.iter().any(|f| f.is_same_file(file)) {
                continue;
            }
            seen.push(file);
            let m = file.metrics();
            sum.splits += m.splits;
            sum.merges += m.merges;
            sum.split_now += m.split_now;
            sum.split_time += m.split_time;
            sum.merge_time += m.merge_time;
            sum.copy_time += m.copy_time;
            sum.to_private += m.to_private;
            sum.to_shared += m.to_shared;
        }
        sum
    }
}
