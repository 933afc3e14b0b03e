//! Guest regions: a guest view of a file placed at a guest address, owned
//! together with the file, and seen by rust-vmm code as vm-memory regions.

use std::num::NonZeroUsize;
use std::sync::Arc;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::file::{GmemError, GuestMemFile, InvalidArgument, PAGE_SIZE, View};

/// The bitmap type of regions: dirty tracking when asked for.
pub type RegionBitmap = Option<AtomicBitmap>;

/// Whether a region keeps a dirty bitmap of the writes made through
/// vm-memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DirtyTracking {
    /// No bitmap.
    #[default]
    Off,
    /// A bitmap of 4 KiB pages written through vm-memory.
    Bitmap,
}

/// Errors of guest regions.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    /// The file refused the mapping.
    #[error(transparent)]
    File(#[from] GmemError),
    /// A guest address that is not page aligned.
    #[error("guest address {guest_addr:#x} is not page aligned")]
    GuestAddress {
        /// The address given.
        guest_addr: u64,
    },
    /// vm-memory refused the region's mapping.
    #[error("vm-memory: {0}")]
    Mapping(#[source] vm_memory::mmap::MmapRegionError),
    /// The region passes the end of the guest address space.
    #[error("a region of {size:#x} bytes at {guest_addr:#x} wraps the address space")]
    Wraps {
        /// The region's guest address.
        guest_addr: u64,
        /// The region's size.
        size: u64,
    },
    /// Regions overlap, or none was given.
    #[error("guest memory layout: {0}")]
    Layout(#[source] vm_memory::GuestRegionCollectionError),
}

/// A guest view of `[file_offset, file_offset + size)` placed at
/// `guest_addr`. It owns its mapping and keeps the file alive.
#[derive(Debug)]
pub struct GuestRegion {
    file: GuestMemFile,
    view: View,
    guest_addr: u64,
    region: Arc<GuestRegionMmap<RegionBitmap>>,
}

impl GuestRegion {
    /// Maps the range as a guest view and wraps it for vm-memory, with a
    /// dirty bitmap when `dirty` asks for one.
    pub fn new(
        file: &GuestMemFile,
        file_offset: u64,
        size: u64,
        guest_addr: u64,
        dirty: DirtyTracking,
    ) -> Result<Self, RegionError> {
        if !guest_addr.is_multiple_of(PAGE_SIZE) {
            return Err(RegionError::GuestAddress { guest_addr });
        }
        if file_offset
            .checked_add(size)
            .is_none_or(|end| end > file.size())
        {
            return Err(GmemError::from(InvalidArgument::RegionPastEnd {
                offset: file_offset,
                len: size,
                size: file.size(),
            })
            .into());
        }
        let view = file.map_guest(file_offset, size)?;
        let bitmap = (dirty == DirtyTracking::Bitmap).then(|| {
            AtomicBitmap::new(
                size as usize,
                NonZeroUsize::new(PAGE_SIZE as usize).expect("4096"),
            )
        });
        // SAFETY: the pointer and size are the view's own mapping, which this
        // region owns; it is unmapped only when no vm-memory clone of the
        // region is left (see Drop).
        let mapping = unsafe {
            MmapRegionBuilder::new_with_bitmap(size as usize, bitmap)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_SHARED)
                .with_raw_mmap_pointer(view.as_ptr())
        }
        .build()
        .map_err(RegionError::Mapping)?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(guest_addr))
            .ok_or(RegionError::Wraps { guest_addr, size })?;
        Ok(Self {
            file: file.clone(),
            view,
            guest_addr,
            region: Arc::new(region),
        })
    }

    /// The file.
    pub fn file(&self) -> &GuestMemFile {
        &self.file
    }

    /// The guest view.
    pub fn view(&self) -> &View {
        &self.view
    }

    /// The guest physical address of the first byte.
    pub fn guest_addr(&self) -> u64 {
        self.guest_addr
    }

    /// The size in bytes.
    pub fn size(&self) -> u64 {
        self.view.len()
    }

    /// The file offset of the first byte.
    pub fn file_offset(&self) -> u64 {
        self.view.offset()
    }

    /// The host address of the first byte (a memslot's userspace address).
    pub fn host_addr(&self) -> *mut u8 {
        self.view.as_ptr()
    }

    /// The vm-memory region.
    pub fn vm_memory_region(&self) -> &Arc<GuestRegionMmap<RegionBitmap>> {
        &self.region
    }
}

impl Drop for GuestRegion {
    fn drop(&mut self) {
        if Arc::strong_count(&self.region) > 1 {
            // Someone still holds the vm-memory region (a clone of a
            // GuestMemoryMmap): keep the memory mapped so that it stays valid.
            tracing::warn!(
                guest_addr = self.guest_addr,
                "guest region dropped while vm-memory still uses it; its mapping is kept"
            );
            self.view.leak_mapping();
        }
    }
}

/// Guest regions and the vm-memory view of all of them.
///
/// ```
/// use gmem::{Backend, DirtyTracking, GmemConfig, GuestMemFile, GuestRegion, GuestMemoryLayout};
/// use gmem::consts::{GUEST_MEMFD_FLAG_MMAP, GUEST_MEMFD_FLAG_INIT_SHARED};
/// use vm_memory::{Bytes, GuestAddress};
///
/// let file = GuestMemFile::create(&Backend::Memfd, GmemConfig {
///     size: 2 << 20,
///     flags: GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
///     huge_page_size_log2: 0,
/// })?;
/// let low = GuestRegion::new(&file, 0, 1 << 20, 0, DirtyTracking::Off)?;
/// let high = GuestRegion::new(&file, 1 << 20, 1 << 20, 1 << 32, DirtyTracking::Bitmap)?;
/// let layout = GuestMemoryLayout::new(vec![low, high])?;
/// layout.memory().write_obj(0x1234_5678u32, GuestAddress((1 << 32) + 8)).unwrap();
/// let mut back = [0u8; 4];
/// layout.regions()[1].view().read_at(8, &mut back)?;
/// assert_eq!(u32::from_le_bytes(back), 0x1234_5678);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct GuestMemoryLayout {
    // Declared first: dropped before the regions, so that they see their
    // own reference as the last one.
    memory: GuestMemoryMmap<RegionBitmap>,
    regions: Vec<GuestRegion>,
}

impl GuestMemoryLayout {
    /// Sorts `regions` by guest address and builds the vm-memory view.
    pub fn new(mut regions: Vec<GuestRegion>) -> Result<Self, RegionError> {
        regions.sort_by_key(|r| r.guest_addr);
        let memory =
            GuestMemoryMmap::from_arc_regions(regions.iter().map(|r| r.region.clone()).collect())
                .map_err(RegionError::Layout)?;
        Ok(Self { memory, regions })
    }

    /// The vm-memory view. Clones of it must not outlive this layout; if
    /// one does, the regions it uses stay mapped (and leak) instead of
    /// being unmapped under it.
    pub fn memory(&self) -> &GuestMemoryMmap<RegionBitmap> {
        &self.memory
    }

    /// The regions, sorted by guest address.
    pub fn regions(&self) -> &[GuestRegion] {
        &self.regions
    }
}
