//! Operations and modes guest memory does not support (EOPNOTSUPP).

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
    /// A private page in private anonymous memory, whose single mapping
    /// cannot show a page to the guest and hide it from the host.
    #[error(
        "{what} on private anonymous memory: its pages stay shared; create the file on \
         Backend::Anonymous (shared anonymous memory), whose views can differ"
    )]
    PrivatePageOnPrivateAnonymous {
        /// What was asked: a conversion to private, or a file created private.
        what: &'static str,
    },
    /// A view of private anonymous memory that passes the file's end.
    #[error(
        "mapping {offset:#x}+{len:#x} passes the end {size:#x} of private anonymous memory, whose \
         views are windows of one mapping"
    )]
    ViewPastEndOfPrivateAnonymous {
        /// The offset asked for.
        offset: u64,
        /// The length asked for.
        len: u64,
        /// The file's size.
        size: u64,
    },
}
