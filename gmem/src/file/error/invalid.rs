//! Invalid arguments (EINVAL), each with what was given.

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
