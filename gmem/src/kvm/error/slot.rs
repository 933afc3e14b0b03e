//! Memslots KVM would refuse, checked in the kernel's order.

/// Why `KVM_SET_USER_MEMORY_REGION2` would refuse a memslot, checked in
/// the kernel's order (`kvm_set_memory_region`, `kvm_set_memslot`).
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    /// The slot id is beyond the VM's memslots.
    #[error("memslot id {id} is beyond this VM's {slots} memslots")]
    IdBeyond {
        /// The id.
        id: u64,
        /// `KVM_CAP_NR_MEMSLOTS`.
        slots: u64,
    },
    /// Flags the slot may not have (a guest_memfd slot takes neither
    /// dirty logging nor read-only).
    #[error("memslot flags {flags:#x}: {} are not allowed here", if *.guest_memfd { "dirty logging and read-only" } else { "these bits" })]
    Flags {
        /// The flags given.
        flags: u32,
        /// Whether the slot is a guest_memfd slot.
        guest_memfd: bool,
    },
    /// A size that is not page aligned.
    #[error("memslot size {size:#x} is not page aligned")]
    Size {
        /// The size given.
        size: u64,
    },
    /// A guest address that is not page aligned.
    #[error("guest address {addr:#x} is not page aligned")]
    GuestAddress {
        /// The address given.
        addr: u64,
    },
    /// A userspace range that is not aligned user memory.
    #[error("userspace address {addr:#x} (+{size:#x}) is not page aligned user memory")]
    UserspaceAddress {
        /// The address given.
        addr: u64,
        /// The size given.
        size: u64,
    },
    /// A guest_memfd offset that is not page aligned.
    #[error("guest_memfd offset {offset:#x} is not page aligned")]
    GuestMemfdOffset {
        /// The offset given.
        offset: u64,
    },
    /// An address space the VM does not have.
    #[error("memslot address space {as_id} does not exist")]
    AddressSpace {
        /// The address space given.
        as_id: u64,
    },
    /// A guest range that wraps.
    #[error("guest range {addr:#x}+{size:#x} wraps")]
    Wraps {
        /// The address given.
        addr: u64,
        /// The size given.
        size: u64,
    },
    /// More pages than one memslot holds.
    #[error("{pages} pages are more than one memslot holds")]
    TooLarge {
        /// The pages asked for.
        pages: u64,
    },
    /// Deleting a slot that does not exist.
    #[error("memslot {slot} does not exist")]
    NoSuchSlot {
        /// The slot.
        slot: u32,
    },
    /// Changing a guest_memfd slot other than by deleting it.
    #[error("memslot {slot} is bound; a guest_memfd slot cannot be changed, only deleted")]
    GuestMemfdSlotChange {
        /// The slot.
        slot: u32,
    },
    /// Changing a slot's userspace address, size or read-only flag.
    #[error(
        "memslot {slot} is bound: its userspace address, size and read-only flag cannot change"
    )]
    FixedFields {
        /// The slot.
        slot: u32,
    },
    /// A guest range that overlaps another slot (EEXIST).
    #[error("guest range {addr:#x}+{size:#x} overlaps memslot {other}")]
    Overlap {
        /// The address given.
        addr: u64,
        /// The size given.
        size: u64,
        /// The slot it overlaps.
        other: u32,
    },
    /// `KVM_MEM_GUEST_MEMFD` without a guest_memfd.
    #[error("KVM_MEM_GUEST_MEMFD without a guest_memfd")]
    NoGuestMemfd,
    /// A guest_memfd slot over memory of another backend.
    #[error("{backend} memory is not a guest_memfd")]
    NotGuestMemfd {
        /// The backend's name.
        backend: &'static str,
    },
    /// A guest_memfd of another VM.
    #[error("the guest_memfd belongs to another VM")]
    OtherVm,
    /// A guest_memfd range past the file's end.
    #[error("guest_memfd range {offset:#x}+{size:#x} passes the file's end {file_size:#x}")]
    PastFileEnd {
        /// The offset given.
        offset: u64,
        /// The size given.
        size: u64,
        /// The file's size.
        file_size: u64,
    },
    /// A guest_memfd range another slot binds.
    #[error("guest_memfd range {offset:#x}+{size:#x} is bound to memslot {other} already")]
    GuestMemfdTaken {
        /// The offset given.
        offset: u64,
        /// The size given.
        size: u64,
        /// The slot that binds it.
        other: u32,
    },
}

impl SlotError {
    /// The errno KVM gives: EEXIST for an overlap, EINVAL otherwise.
    pub fn errno(&self) -> i32 {
        match self {
            Self::Overlap { .. } => libc::EEXIST,
            _ => libc::EINVAL,
        }
    }
}
