//! The errors of the KVM binding, one variant per cause, each with the
//! errno the kernel gives in the same case ([`KvmError::errno`]).

use std::io;
use std::path::PathBuf;

use crate::file::GmemError;

/// Errors of the KVM binding.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// `/dev/kvm` is missing or cannot be opened (ENODEV).
    #[error("KVM is not available: /dev/kvm: {0}")]
    NoKvm(#[source] io::Error),
    /// `MMUKIT_HIDE_CAPS` hides KVM (ENODEV).
    #[error(
        "KVM is not available: /dev/kvm is hidden by {}",
        mmukit_sys::host::HIDE_ENV
    )]
    KvmHidden,
    /// A memslot KVM would refuse (EINVAL, or EEXIST for an overlap).
    #[error("invalid memslot: {0}")]
    Slot(#[from] SlotError),
    /// Memory that cannot back a KVM guest (EINVAL).
    #[error("{0}")]
    Refused(#[from] MemoryRefusal),
    /// The host's KVM lacks a capability (EOPNOTSUPP).
    #[error("not supported by this host's KVM: {0}")]
    NotSupported(#[from] MissingCapability),
    /// A conversion range outside the region (EINVAL).
    #[error("range {gpa:#x}+{size:#x} is not inside the region at {region:#x}")]
    OutsideRegion {
        /// The range's guest address.
        gpa: u64,
        /// The range's size.
        size: u64,
        /// The region's guest address.
        region: u64,
    },
    /// The guest memory file refused a conversion (its errno).
    #[error("converting the guest memory: {0}")]
    File(#[source] GmemError),
    /// A VM descriptor could not be duplicated or inspected (EINVAL).
    #[error("{what} the VM descriptor: {source}")]
    VmDescriptor {
        /// What was done.
        what: &'static str,
        /// The kernel's error.
        source: io::Error,
    },
    /// A descriptor that is not a KVM VM (EINVAL).
    #[error("descriptor {fd} is not a KVM VM ({})", target.display())]
    NotAVm {
        /// The descriptor.
        fd: i32,
        /// What it names.
        target: PathBuf,
    },
    /// Private memory on a backend other than guest_memfd (EINVAL).
    #[error("private memory must be a guest_memfd, not {backend} memory")]
    PrivateNotGuestMemfd {
        /// The backend's name.
        backend: &'static str,
    },
    /// A memslot this binding did not bind (EINVAL).
    #[error("memslot {slot} is not bound")]
    NotBound {
        /// The slot.
        slot: u32,
    },
    /// A dirty bitmap too short for the pages it is said to cover (EINVAL).
    #[error("a bitmap of {words} words holds fewer than {pages} pages")]
    DirtyBitmap {
        /// The bitmap's length in 64-bit words.
        words: usize,
        /// The pages asked for.
        pages: u32,
    },
    /// An ioctl failed.
    #[error("{op}: {source}")]
    Ioctl {
        /// The ioctl.
        op: &'static str,
        /// The kernel's error.
        source: io::Error,
    },
}

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

/// Memory that cannot back a KVM guest.
#[derive(Debug, thiserror::Error)]
pub enum MemoryRefusal {
    /// memfd_secret memory has no direct map, which KVM needs.
    #[error("{}", if *.kernel_offers_no_direct_map {
        "memfd_secret memory cannot back a KVM memslot; this kernel offers \
         GUEST_MEMFD_FLAG_NO_DIRECT_MAP: use the guest_memfd backend with that flag"
    } else {
        "memfd_secret memory has no kernel direct map, and KVM can only map guest memory it \
         can reach through the direct map; this kernel has no GUEST_MEMFD_FLAG_NO_DIRECT_MAP, \
         so use another backend"
    })]
    SecretMemory {
        /// Whether the kernel offers `GUEST_MEMFD_FLAG_NO_DIRECT_MAP`.
        kernel_offers_no_direct_map: bool,
    },
    /// `GUEST_MEMFD_FLAG_NO_DIRECT_MAP` on a TDX VM.
    #[error(
        "GUEST_MEMFD_FLAG_NO_DIRECT_MAP with a TDX VM: TDX needs the direct map (the TDX \
         module's page conversions and cache flushes go through it)"
    )]
    NoDirectMapOnTdx,
}

/// A capability the host's KVM lacks.
#[derive(Debug, thiserror::Error)]
pub enum MissingCapability {
    /// `GUEST_MEMFD_FLAG_NO_DIRECT_MAP`.
    #[error("GUEST_MEMFD_FLAG_NO_DIRECT_MAP (the kernel does not offer it)")]
    NoDirectMap,
    /// `KVM_SET_MEMORY_ATTRIBUTES` with the private bit.
    #[error("KVM_SET_MEMORY_ATTRIBUTES (KVM_CAP_MEMORY_ATTRIBUTES has no private bit)")]
    PrivateAttribute,
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` with these flags.
    #[error("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 with flags {flags:#x} (KVM offers {offered:#x})")]
    ManualDirtyLogProtect {
        /// The flags asked for.
        flags: u64,
        /// The flags KVM offers.
        offered: u64,
    },
    /// A stand-in that refuses (tests and other VMMs' fakes).
    #[error("{0}")]
    Other(&'static str),
}

impl KvmError {
    /// The errno of this error.
    pub fn errno(&self) -> i32 {
        match self {
            Self::NoKvm(_) | Self::KvmHidden => libc::ENODEV,
            Self::Slot(slot) => slot.errno(),
            Self::NotSupported(_) => libc::EOPNOTSUPP,
            Self::File(err) => err.errno(),
            Self::Refused(_)
            | Self::OutsideRegion { .. }
            | Self::VmDescriptor { .. }
            | Self::NotAVm { .. }
            | Self::PrivateNotGuestMemfd { .. }
            | Self::NotBound { .. }
            | Self::DirtyBitmap { .. } => libc::EINVAL,
            Self::Ioctl { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        }
    }

    pub(super) fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Self {
        move |err| Self::Ioctl {
            op,
            source: io::Error::from_raw_os_error(err.errno()),
        }
    }
}
