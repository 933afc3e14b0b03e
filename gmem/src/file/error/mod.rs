//! The errors of guest memory files, with the kernel's errno for each.

mod invalid;
mod unsupported;

use std::io;

pub use invalid::InvalidArgument;
pub use unsupported::Unsupported;

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
