//! The errors of guest memory files, with the kernel's errno for each.

use std::io;

/// Errors of guest memory files. Each maps to the errno the kernel's
/// guest_memfd gives in the same case ([`GmemError::errno`]).
#[derive(Debug, thiserror::Error)]
pub enum GmemError {
    /// An invalid argument (EINVAL).
    #[error("invalid argument: {0}")]
    Invalid(#[from] InvalidArgument),
    /// An operation or mode the file does not support (EOPNOTSUPP).
    #[error("not supported: {0}")]
    NotSupported(#[from] Unsupported),
    /// The file was created without the MMAP flag (ENODEV).
    #[error("the file was created without GUEST_MEMFD_FLAG_MMAP and cannot be mapped")]
    NoMmap,
    /// An access to a private page or past the end through a host view (EFAULT).
    #[error("host access at file offset {offset:#x} faults: {why}")]
    Fault {
        /// The file offset.
        offset: u64,
        /// Private, or past the end.
        why: &'static str,
    },
    /// `offset + len` of a fallocate passes the largest file offset (EFBIG).
    #[error("fallocate range {offset:#x}+{len:#x} passes the largest file offset")]
    TooBig {
        /// The offset asked for.
        offset: u64,
        /// The length asked for.
        len: u64,
    },
    /// The HugeTLB pool cannot back the file (ENOMEM).
    #[error(
        "HugeTLB pool {pool}: the file needs {needed} pages and {free} are free; {}",
        mmukit_sys::hugetlb::reserve_hint(pool)
    )]
    HugetlbShortfall {
        /// The pool's sysfs name.
        pool: String,
        /// Pages the file needs.
        needed: u64,
        /// Pages free in the pool.
        free: u64,
    },
    /// The backend is not available on this host (ENOSYS).
    #[error("backend {backend} is not available here: {why}")]
    Unavailable {
        /// The backend.
        backend: &'static str,
        /// Why.
        why: &'static str,
    },
    /// A system call failed; its errno is kept.
    #[error("{op}: {source}")]
    Os {
        /// The operation.
        op: &'static str,
        /// The kernel's error.
        source: io::Error,
    },
}

impl GmemError {
    pub(super) fn os(op: &'static str) -> impl FnOnce(io::Error) -> Self {
        move |source| Self::Os { op, source }
    }

    /// The errno the kernel would give.
    pub fn errno(&self) -> i32 {
        match self {
            Self::Invalid(_) => libc::EINVAL,
            Self::NotSupported(_) => libc::EOPNOTSUPP,
            Self::NoMmap => libc::ENODEV,
            Self::TooBig { .. } => libc::EFBIG,
            Self::Fault { .. } => libc::EFAULT,
            Self::HugetlbShortfall { .. } => libc::ENOMEM,
            Self::Unavailable { .. } => libc::ENOSYS,
            Self::Os { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

impl From<GmemError> for io::Error {
    fn from(err: GmemError) -> Self {
        io::Error::from_raw_os_error(err.errno())
    }
}

impl From<crate::prefault::PrefaultError> for GmemError {
    fn from(err: crate::prefault::PrefaultError) -> Self {
        match err {
            crate::prefault::PrefaultError::NoThreads => InvalidArgument::NoThreads.into(),
            crate::prefault::PrefaultError::Populate(source) => Self::Os {
                op: "madvise(MADV_POPULATE_WRITE)",
                source,
            },
        }
    }
}

/// The invalid arguments a guest memory file refuses, each with what was
/// given (all EINVAL).
#[derive(Debug, thiserror::Error)]
pub enum InvalidArgument {
    /// A HugeTLB page size other than 2 MiB or 1 GiB.
    #[error("huge_page_size_log2 {log2}: HugeTLB files need 21 (2 MiB) or 30 (1 GiB)")]
    HugePageSize {
        /// The log2 given.
        log2: u8,
    },
    /// A huge page size on a backend without huge pages.
    #[error("huge_page_size_log2 {log2} on the {backend} backend, which has no huge pages")]
    NoHugePages {
        /// The log2 given.
        log2: u8,
        /// The backend's name.
        backend: &'static str,
    },
    /// A size that is zero or not a multiple of the page size.
    #[error("size {size:#x} is not a non-zero multiple of {granule:#x}")]
    Size {
        /// The size given.
        size: u64,
        /// The backend's page size.
        granule: u64,
    },
    /// Creation flags the backend does not know.
    #[error("flags {flags:#x} are not supported by the {backend} backend")]
    Flags {
        /// The unknown flags.
        flags: u64,
        /// The backend's name.
        backend: &'static str,
    },
    /// `read(2)` or `write(2)` on a file gmem answers for.
    #[error("guest memory files cannot be {done}")]
    FileIo {
        /// "read" or "written".
        done: &'static str,
    },
    /// `ftruncate(2)` on a file gmem answers for.
    #[error("the size of a guest memory file is fixed")]
    FixedSize,
    /// A range that is not page aligned or passes the end of the file.
    #[error("{op} range {offset:#x}+{len:#x} is not page aligned inside the file")]
    Range {
        /// The operation: conversion, prefault, region.
        op: &'static str,
        /// The offset given.
        offset: u64,
        /// The length given.
        len: u64,
    },
    /// A prefault on no threads.
    #[error("prefault needs at least one thread")]
    NoThreads,
    /// A copy that passes the end of the view.
    #[error("access {at:#x}+{len:#x} passes the end of the view")]
    OutsideView {
        /// The offset in the view.
        at: u64,
        /// The length.
        len: u64,
    },
    /// `MAP_PRIVATE` on guest memory.
    #[error("guest memory can only be mapped shared")]
    PrivateMapping,
    /// An empty mapping, or one at an offset that is not page aligned.
    #[error(
        "mapping {offset:#x}+{len:#x}: the length must be non-zero and the offset page aligned"
    )]
    Mapping {
        /// The offset given.
        offset: u64,
        /// The length given.
        len: u64,
    },
    /// A HugeTLB mapping that is not whole huge pages.
    #[error("mapping {offset:#x}+{len:#x} is not whole {granule:#x}-byte pages")]
    MappingPages {
        /// The offset given.
        offset: u64,
        /// The length given.
        len: u64,
        /// The huge page size.
        granule: u64,
    },
    /// mmap flags without a map type.
    #[error("mmap flags {flags:#x} name no map type")]
    MapType {
        /// The flags given.
        flags: i32,
    },
    /// A negative fallocate offset or length, or an empty one.
    #[error(
        "fallocate offset {offset:#x} and length {len:#x} must be non-negative, and the length non-zero"
    )]
    FallocateArguments {
        /// The offset given.
        offset: u64,
        /// The length given.
        len: u64,
    },
    /// An fallocate range that is not page aligned.
    #[error("fallocate range {offset:#x}+{len:#x} is not page aligned")]
    FallocateAlignment {
        /// The offset given.
        offset: u64,
        /// The length given.
        len: u64,
    },
    /// An allocation past the end of the file, whose size is fixed.
    #[error("allocation {offset:#x}..{end:#x} passes the end {size:#x}")]
    AllocationPastEnd {
        /// The start of the range.
        offset: u64,
        /// The end of the range.
        end: u64,
        /// The file's size.
        size: u64,
    },
    /// A guest region that passes the end of its file.
    #[error("region {offset:#x}+{len:#x} passes the file's end {size:#x}")]
    RegionPastEnd {
        /// The file offset of the region.
        offset: u64,
        /// The region's size.
        len: u64,
        /// The file's size.
        size: u64,
    },
}

/// Operations and modes a guest memory file does not support, as
/// guest_memfd refuses them (all EOPNOTSUPP).
#[derive(Debug, thiserror::Error)]
pub enum Unsupported {
    /// `MAP_SHARED_VALIDATE` with a flag the kernel does not know.
    #[error("mmap flags {flags:#x} with MAP_SHARED_VALIDATE")]
    ValidatedMapFlags {
        /// The flags given.
        flags: i32,
    },
    /// fallocate mode bits the kernel does not know.
    #[error("fallocate mode {mode:#x} has unknown bits")]
    UnknownFallocateBits {
        /// The mode given.
        mode: i32,
    },
    /// A punch without `FALLOC_FL_KEEP_SIZE`.
    #[error("punching a hole needs FALLOC_FL_KEEP_SIZE")]
    PunchWithoutKeepSize,
    /// A collapse, insert or zero-range-like mode with KEEP_SIZE.
    #[error("fallocate mode {mode:#x} cannot keep the size")]
    ModeCannotKeepSize {
        /// The mode given.
        mode: i32,
    },
    /// More than one fallocate mode at once.
    #[error("fallocate mode {mode:#x} combines modes")]
    CombinedModes {
        /// The mode given.
        mode: i32,
    },
    /// An fallocate that would change the size.
    #[error("fallocate without FALLOC_FL_KEEP_SIZE: the file size is fixed")]
    SizeChange,
    /// A valid fallocate mode that guest memory does not take.
    #[error("fallocate mode {mode:#x} on guest memory")]
    FallocateMode {
        /// The mode given.
        mode: i32,
    },
    /// Converting part of a private-only guest_memfd to shared.
    #[error(
        "converting {offset:#x}+{len:#x} to shared: this guest_memfd was created private and the \
         kernel cannot convert it in place (no memory attributes on the guest_memfd); map shared \
         memory separately (SlotBinding with a shared mapping)"
    )]
    SharedConversionOfPrivateFile {
        /// The offset of the range.
        offset: u64,
        /// The length of the range.
        len: u64,
    },
}
