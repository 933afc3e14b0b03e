//! The errors of the KVM binding, one variant per cause, each with the
//! errno the kernel gives in the same case ([`KvmError::errno`]).

mod missing;
mod refusal;
mod slot;

use std::io;
use std::path::PathBuf;

use crate::file::GmemError;

pub use missing::MissingCapability;
pub use refusal::MemoryRefusal;
pub use slot::SlotError;

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
