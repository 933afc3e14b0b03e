//! # gmem
//!
//! Guest memory files for a VMM, under one contract modelled on Linux
//! guest_memfd, over five backends: KVM guest_memfd, memfd, HugeTLB (2 MiB
//! or 1 GiB pages), memfd_secret (memory without a kernel direct map) and
//! shared anonymous memory.
//!
//! - [`GuestMemFile`]: created from `{ size, flags, huge_page_size_log2 }`;
//!   the kernel's rules and errno values for sizes, flags, fallocate, punch
//!   hole, mmap, read/write and resizing hold on every backend, checked in
//!   the kernel's order ([`check_fallocate`], [`check_mmap`]).
//! - Shared/private attributes per 4 KiB page ([`attrs::AttrMap`], a range
//!   map) with [`GuestMemFile::convert`].
//! - The signal contract: touching a private page through a host view, or
//!   a view past the end of the file, raises SIGBUS on every backend, as a
//!   guest_memfd does (VMMs install SIGBUS handlers for it); the safe
//!   accessors of a [`View`] return EFAULT instead, before touching a byte.
//!   On HugeTLB a huge page that becomes mixed is split into 4 KiB backing
//!   and merged back when it is uniform again, with its data kept and every
//!   view following; a 1 GiB page splits into 2 MiB pieces first, filled in
//!   one pass (`UFFDIO_COPY`) where the host has userfaultfd.
//! - [`GuestMemFile::prefault`]: parallel `MADV_POPULATE_WRITE`.
//! - [`GuestRegion`] and [`GuestMemoryLayout`]: owned mappings seen as
//!   vm-memory `GuestRegionMmap` / `GuestMemoryMmap` (optionally with a dirty
//!   bitmap).
//! - [`KvmVm`]: memslots through `KVM_SET_USER_MEMORY_REGION2`, with
//!   `KVM_MEM_GUEST_MEMFD` for guest_memfd files, in two forms: a
//!   guest_memfd with its own mapping ([`KvmVm::bind`]), or a guest_memfd the
//!   host cannot map beside separate shared memory ([`KvmVm::bind_private`],
//!   the confidential-VM layout); [`KvmVm::predict`] gives the kernel's
//!   verdict on a slot before it is made.
//! - [`HostCaps`]: what the host offers.
//!
//! ```
//! use gmem::{Backend, GmemConfig, GuestMemFile};
//! use gmem::consts::GUEST_MEMFD_FLAG_MMAP;
//!
//! // The kernel's answer to a size that is not a multiple of the page size.
//! let err = GuestMemFile::create(&Backend::Memfd, GmemConfig {
//!     size: 4095,
//!     flags: GUEST_MEMFD_FLAG_MMAP,
//!     huge_page_size_log2: 0,
//! }).unwrap_err();
//! assert_eq!(err.errno(), libc::EINVAL);
//!
//! let file = GuestMemFile::create(&Backend::Memfd, GmemConfig {
//!     size: 1 << 20,
//!     flags: 0,
//!     huge_page_size_log2: 0,
//! })?;
//! // Created without MMAP: it cannot be mapped.
//! assert_eq!(file.map(0, 1 << 20).unwrap_err().errno(), libc::ENODEV);
//! # Ok::<(), gmem::GmemError>(())
//! ```

pub mod attrs;
pub mod caps;
pub mod consts;
pub mod file;
pub mod kvm;
pub mod prefault;
pub mod region;
pub mod residency;
/// The system calls, from the workspace's one home for them.
use mmukit_sys as sys;

pub use attrs::Attribute;
pub use caps::{Capability, HostCaps, ThpModes};
pub use file::{
    Backend, BackendKind, FileMetrics, GmemConfig, GmemError, GuestMemFile, GuestMemfdVm,
    InvalidArgument, PAGE_SIZE, Protection, Unsupported, View, ViewKind, check_fallocate,
    check_mmap,
};
pub use kvm::{
    KvmError, KvmVm, MemoryAttributes, MemoryRefusal, MissingCapability, SlotBinding, SlotChange,
    SlotError, SlotRequest, check_memory, choose_backend, convert_guest_range,
};
pub use prefault::{PrefaultError, PrefaultReport};
pub use region::{DirtyTracking, GuestMemoryLayout, GuestRegion, RegionError};
pub use residency::Residency;
