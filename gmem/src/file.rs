//! Guest memory files: one guest_memfd contract over five backends.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_create_guest_memfd;

use crate::attrs::{AttrMap, Attribute};
use crate::caps::HugetlbPool;
use crate::consts::{
    GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
};
use crate::kvm::KvmVm;
use crate::sys::{self, Mapping};

/// The base page size.
pub const PAGE_SIZE: u64 = 4096;

/// Errors of guest memory files. Each maps to the errno the kernel's
/// guest_memfd gives in the same case ([`GmemError::errno`]).
#[derive(Debug, thiserror::Error)]
pub enum GmemError {
    /// An invalid argument (EINVAL).
    #[error("invalid argument: {what}")]
    Invalid {
        /// What is wrong.
        what: String,
    },
    /// An operation or mode the file does not support (EOPNOTSUPP).
    #[error("not supported: {what}")]
    NotSupported {
        /// What was asked.
        what: String,
    },
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
        "HugeTLB pool {pool}: the file needs {needed} pages and {free} are free; reserve more \
         with `echo N > /sys/kernel/mm/hugepages/{pool}/nr_hugepages` (as root)"
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
        why: String,
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
    fn invalid(what: impl Into<String>) -> Self {
        Self::Invalid { what: what.into() }
    }

    fn os(op: &'static str) -> impl FnOnce(io::Error) -> Self {
        move |source| Self::Os { op, source }
    }

    /// The errno the kernel would give.
    pub fn errno(&self) -> i32 {
        match self {
            Self::Invalid { .. } => libc::EINVAL,
            Self::NotSupported { .. } => libc::EOPNOTSUPP,
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

/// Where a file's memory comes from.
#[derive(Clone, Debug)]
pub enum Backend {
    /// KVM guest_memfd on this VM.
    Kvm(Arc<KvmVm>),
    /// A memfd (shmem).
    Memfd,
    /// A HugeTLB memfd; the page size is the config's `huge_page_size_log2`.
    Hugetlb,
    /// memfd_secret: pages are not in the kernel's direct map.
    Secret,
    /// Shared anonymous memory.
    Anonymous,
}

/// The kind of a backend, without its VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// KVM guest_memfd.
    Kvm,
    /// memfd.
    Memfd,
    /// HugeTLB memfd.
    Hugetlb,
    /// memfd_secret.
    Secret,
    /// Shared anonymous memory.
    Anonymous,
}

impl BackendKind {
    /// The name used in configurations.
    pub fn name(self) -> &'static str {
        match self {
            Self::Kvm => "guest_memfd",
            Self::Memfd => "memfd",
            Self::Hugetlb => "hugetlb",
            Self::Secret => "secret",
            Self::Anonymous => "anonymous",
        }
    }

    /// The flags gmem itself accepts for this backend (KVM's come from the
    /// kernel).
    pub fn supported_flags(self) -> u64 {
        let base = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
        match self {
            Self::Secret => base | GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
            _ => base,
        }
    }
}

impl Backend {
    /// The backend's kind.
    pub fn kind(&self) -> BackendKind {
        match self {
            Self::Kvm(_) => BackendKind::Kvm,
            Self::Memfd => BackendKind::Memfd,
            Self::Hugetlb => BackendKind::Hugetlb,
            Self::Secret => BackendKind::Secret,
            Self::Anonymous => BackendKind::Anonymous,
        }
    }
}

/// What to create: the create arguments of guest_memfd, with the huge page
/// size carried as a log2 (0: base pages).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GmemConfig {
    /// Size in bytes: a non-zero multiple of the page size.
    pub size: u64,
    /// `GUEST_MEMFD_FLAG_*` bits.
    pub flags: u64,
    /// HugeTLB page size as log2: 21 (2 MiB) or 30 (1 GiB); 0 otherwise.
    pub huge_page_size_log2: u8,
}

/// How a view treats private pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ViewKind {
    /// The host's view: private pages fault.
    Host,
    /// The guest's view (what a memslot maps): every page accessible; it
    /// follows huge-page splits and merges like every view.
    Guest,
}

/// Which protection a conversion put in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protection {
    /// Host views fault on private pages; KVM was not told (the VM has no
    /// memory attributes, or the file is not bound).
    HostViewOnly,
    /// Host views fault on private pages and KVM's memory attributes say
    /// the same.
    HostViewAndKvm,
}

/// Counters and latencies of a file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileMetrics {
    /// Huge pages split into 4 KiB backing.
    pub splits: u64,
    /// Huge pages merged back.
    pub merges: u64,
    /// Huge pages split right now.
    pub split_now: u64,
    /// Time spent splitting.
    pub split_time: Duration,
    /// Time spent merging.
    pub merge_time: Duration,
    /// Pages converted to private.
    pub to_private: u64,
    /// Pages converted to shared.
    pub to_shared: u64,
}

#[derive(Debug)]
struct ViewRecord {
    id: u64,
    addr: usize,
    offset: u64,
    len: u64,
    kind: ViewKind,
}

/// The 4 KiB backing that split huge pages move to: a sparse memfd the size
/// of the file, and an internal mapping of it.
#[derive(Debug)]
struct SplitBacking {
    fd: OwnedFd,
    map: Mapping,
}

#[derive(Debug)]
struct FileState {
    attrs: AttrMap,
    views: Vec<ViewRecord>,
    next_view: u64,
    split_backing: Option<SplitBacking>,
    split: BTreeSet<u64>,
    metrics: FileMetrics,
}

#[derive(Debug)]
pub(crate) struct Inner {
    kind: BackendKind,
    size: u64,
    flags: u64,
    granule: u64,
    fd: Option<OwnedFd>,
    /// An internal read-write mapping of the whole file (HugeTLB: holds the
    /// reservation; secret and anonymous: the way to their pages).
    master: Option<Mapping>,
    vm: Option<Arc<KvmVm>>,
    state: Mutex<FileState>,
}

/// A guest memory file.
///
/// ```
/// use gmem::{Backend, GmemConfig, GuestMemFile, Attribute};
/// use gmem::consts::{GUEST_MEMFD_FLAG_MMAP, GUEST_MEMFD_FLAG_INIT_SHARED};
///
/// let file = GuestMemFile::create(&Backend::Memfd, GmemConfig {
///     size: 1 << 20,
///     flags: GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
///     huge_page_size_log2: 0,
/// })?;
/// let view = file.map(0, 1 << 20)?;
/// view.write_at(0x1000, &[0xaa; 16])?;
/// file.convert(0x1000, 0x1000, Attribute::Private)?;
/// assert!(view.read_at(0x1000, &mut [0; 16]).is_err()); // private: faults
/// file.convert(0x1000, 0x1000, Attribute::Shared)?;
/// let mut back = [0; 16];
/// view.read_at(0x1000, &mut back)?;
/// assert_eq!(back, [0xaa; 16]);
/// # Ok::<(), gmem::GmemError>(())
/// ```
#[derive(Clone, Debug)]
pub struct GuestMemFile {
    inner: Arc<Inner>,
}

fn page_aligned(value: u64) -> bool {
    value.is_multiple_of(PAGE_SIZE)
}

/// `MAP_SHARED_VALIDATE`: shared, with every other flag checked.
const MAP_SHARED_VALIDATE: i32 = 0x03;
/// The map types (`MAP_TYPE`).
const MAP_TYPE: i32 = 0x0f;
/// The largest mapping length: x86-64's user address space with 4-level
/// paging, less a page (`TASK_SIZE`).
const TASK_SIZE: u64 = (1 << 47) - 4096;
/// The flags `MAP_SHARED_VALIDATE` accepts (`LEGACY_MAP_MASK`).
const LEGACY_MAP_MASK: i32 = libc::MAP_SHARED
    | libc::MAP_PRIVATE
    | libc::MAP_FIXED
    | libc::MAP_ANONYMOUS
    | libc::MAP_DENYWRITE
    | libc::MAP_EXECUTABLE
    | 0x4000000 // MAP_UNINITIALIZED
    | libc::MAP_GROWSDOWN
    | libc::MAP_LOCKED
    | libc::MAP_NORESERVE
    | libc::MAP_POPULATE
    | libc::MAP_NONBLOCK
    | libc::MAP_STACK
    | libc::MAP_HUGETLB;

/// Checks an `mmap(2)` of `len` bytes at `offset` of a guest memory file
/// created with `file_flags`, in the kernel's order, and returns the length
/// rounded up to whole pages (as `do_mmap` rounds it):
///
/// 1. `mmap` itself (`do_mmap`): a zero length, or an offset not page
///    aligned, is EINVAL; a length that wraps when rounded up, or that
///    passes the user address space, is ENOMEM; an offset plus length that
///    wraps in pages, or ends past the largest file offset, is EOVERFLOW;
///    a map type other than `MAP_SHARED`, `MAP_SHARED_VALIDATE` or
///    `MAP_PRIVATE` is EINVAL, and a flag `MAP_SHARED_VALIDATE` does not
///    know (or `MAP_SYNC`, which guest memory does not take) is EOPNOTSUPP.
/// 2. guest_memfd's `mmap` handler: a file without `GUEST_MEMFD_FLAG_MMAP`
///    is ENODEV; a private mapping is EINVAL; for HugeTLB memory an offset
///    or length that is not a whole number of huge pages (`granule`) is
///    EINVAL.
///
/// ```
/// use gmem::check_mmap;
/// use gmem::consts::GUEST_MEMFD_FLAG_MMAP;
/// // The offset is checked before the MMAP flag.
/// assert_eq!(check_mmap(1, 4096, libc::MAP_SHARED, 0, 4096).unwrap_err().errno(), libc::EINVAL);
/// assert_eq!(check_mmap(0, 4096, libc::MAP_SHARED, 0, 4096).unwrap_err().errno(), libc::ENODEV);
/// assert_eq!(check_mmap(0, 100, 0x03, GUEST_MEMFD_FLAG_MMAP, 4096).unwrap(), 4096);
/// ```
pub fn check_mmap(
    offset: u64,
    len: u64,
    map_flags: i32,
    file_flags: u64,
    granule: u64,
) -> Result<u64, GmemError> {
    let (len, shared) = check_mmap_generic(offset, len, map_flags)?;
    if file_flags & GUEST_MEMFD_FLAG_MMAP == 0 {
        return Err(GmemError::NoMmap);
    }
    if !shared {
        return Err(GmemError::invalid("guest memory can only be mapped shared"));
    }
    if !offset.is_multiple_of(granule) || !len.is_multiple_of(granule) {
        return Err(GmemError::invalid(format!(
            "mapping {offset:#x}+{len:#x} is not whole {granule:#x}-byte pages"
        )));
    }
    Ok(len)
}

/// See [`check_mmap`]: the checks the kernel's `mmap` makes for every file,
/// before the file's own handler runs. Returns the length rounded up to
/// whole pages and whether the mapping is shared.
fn check_mmap_generic(offset: u64, len: u64, map_flags: i32) -> Result<(u64, bool), GmemError> {
    let os = |errno: i32| GmemError::Os {
        op: "mmap",
        source: io::Error::from_raw_os_error(errno),
    };
    if len == 0 || !page_aligned(offset) {
        return Err(GmemError::invalid(format!(
            "mapping {offset:#x}+{len:#x}: the length must be non-zero and the offset page aligned"
        )));
    }
    let len = len
        .checked_next_multiple_of(PAGE_SIZE)
        .ok_or(os(libc::ENOMEM))?;
    let pgoff = offset / PAGE_SIZE;
    if pgoff.checked_add(len / PAGE_SIZE).is_none() {
        return Err(os(libc::EOVERFLOW));
    }
    if len > TASK_SIZE {
        return Err(os(libc::ENOMEM));
    }
    // `file_mmap_ok`: the mapping must end inside the largest file offset.
    if offset > MAX_FILE_OFFSET || len > MAX_FILE_OFFSET - offset {
        return Err(os(libc::EOVERFLOW));
    }
    let shared = match map_flags & MAP_TYPE {
        libc::MAP_SHARED => true,
        MAP_SHARED_VALIDATE => {
            if map_flags & !LEGACY_MAP_MASK != 0 {
                return Err(GmemError::NotSupported {
                    what: format!("mmap flags {map_flags:#x} with MAP_SHARED_VALIDATE"),
                });
            }
            true
        }
        libc::MAP_PRIVATE => false,
        _ => {
            return Err(GmemError::invalid(format!(
                "mmap flags {map_flags:#x} name no map type"
            )));
        }
    };
    Ok((len, shared))
}

/// An empty memfd: every page of a mapping of it lies past its end, so any
/// access raises SIGBUS. Host views map private pages, and the parts of
/// themselves past the end of the file, from it.
fn fault_source() -> Result<&'static OwnedFd, GmemError> {
    static SOURCE: std::sync::OnceLock<OwnedFd> = std::sync::OnceLock::new();
    if let Some(fd) = SOURCE.get() {
        return Ok(fd);
    }
    let fd = sys::memfd_create(c"mmukit-gmem-sigbus", libc::MFD_CLOEXEC)
        .map_err(GmemError::os("memfd_create"))?;
    Ok(SOURCE.get_or_init(|| fd))
}

/// Maps `[addr, addr + len)` from the fault source: touching it raises
/// SIGBUS.
///
/// # Safety
///
/// The range must lie inside a mapping owned by the caller, whose memory no
/// Rust reference points into.
unsafe fn map_fault_source(addr: *mut u8, len: u64) -> Result<(), GmemError> {
    let fd = fault_source()?;
    // SAFETY: guaranteed by the caller.
    unsafe {
        sys::map_fixed(
            addr,
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            fd,
            0,
        )
    }
    .map_err(GmemError::os("mmap(MAP_FIXED)"))
}

/// The modes `vfs_fallocate` knows (`FALLOC_FL_MODE_MASK`): punch hole,
/// collapse, zero, insert, unshare and write-zeroes ranges.
const FALLOC_MODE_MASK: i32 = 0x02 | 0x08 | 0x10 | 0x20 | 0x40 | 0x80;
/// The largest file offset (`MAX_LFS_FILESIZE`, the `s_maxbytes` of
/// guest_memfd's pseudo filesystem).
const MAX_FILE_OFFSET: u64 = i64::MAX as u64;

/// Checks a `fallocate(2)` on a guest memory file of `size` bytes as the
/// kernel does, in its order, and returns the range `[offset, offset +
/// len)`:
///
/// 1. `vfs_fallocate`: an offset or a length that is negative as a `loff_t`
///    (at or above 2^63), or a zero length, is EINVAL; a mode bit it does
///    not know, a combination of modes, a punch without `KEEP_SIZE`, or
///    collapse / insert / write-zeroes with it, is EOPNOTSUPP; `offset +
///    len` past the largest file offset is EFBIG.
/// 2. guest_memfd (`kvm_gmem_fallocate`): no `KEEP_SIZE`, or any mode but a
///    punch, is EOPNOTSUPP; an offset or length not page aligned is EINVAL;
///    an allocation past the end of the file is EINVAL.
///
/// Nothing is clamped before every check has passed, so a punch of
/// `(0, 1 << 63)` is EINVAL and never wipes a file.
///
/// ```
/// use gmem::check_fallocate;
/// let punch = libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE;
/// assert_eq!(check_fallocate(punch, 0, 1 << 63, 1 << 20).unwrap_err().errno(), libc::EINVAL);
/// assert_eq!(check_fallocate(punch, 4096, u64::MAX >> 1, 1 << 20).unwrap_err().errno(), libc::EFBIG);
/// assert_eq!(check_fallocate(0, 0, 0, 1 << 20).unwrap_err().errno(), libc::EINVAL);
/// assert_eq!(check_fallocate(punch, 1 << 20, 4096, 1 << 20).unwrap(), (1 << 20)..(1 << 20) + 4096);
/// ```
pub fn check_fallocate(
    mode: i32,
    offset: u64,
    len: u64,
    size: u64,
) -> Result<std::ops::Range<u64>, GmemError> {
    if offset > MAX_FILE_OFFSET || len > MAX_FILE_OFFSET || len == 0 {
        return Err(GmemError::invalid(format!(
            "fallocate offset {offset:#x} and length {len:#x} must be non-negative, and the \
             length non-zero"
        )));
    }
    let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
    let unsupported = |what: String| Err(GmemError::NotSupported { what });
    if mode & !(FALLOC_MODE_MASK | libc::FALLOC_FL_KEEP_SIZE) != 0 {
        return unsupported(format!("fallocate mode {mode:#x} has unknown bits"));
    }
    match mode & FALLOC_MODE_MASK {
        // Allocate, unshare and zero ranges take KEEP_SIZE or not.
        0 | 0x40 | 0x10 => {}
        libc::FALLOC_FL_PUNCH_HOLE if !keep_size => {
            return unsupported("punching a hole needs FALLOC_FL_KEEP_SIZE".into());
        }
        libc::FALLOC_FL_PUNCH_HOLE => {}
        0x08 | 0x20 | 0x80 if keep_size => {
            return unsupported(format!("fallocate mode {mode:#x} cannot keep the size"));
        }
        0x08 | 0x20 | 0x80 => {}
        _ => return unsupported(format!("fallocate mode {mode:#x} combines modes")),
    }
    let end = offset + len;
    if end > MAX_FILE_OFFSET {
        return Err(GmemError::TooBig { offset, len });
    }
    if !keep_size {
        return unsupported("fallocate without FALLOC_FL_KEEP_SIZE: the file size is fixed".into());
    }
    if mode & !(libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE) != 0 {
        return unsupported(format!("fallocate mode {mode:#x} on guest memory"));
    }
    if !page_aligned(offset) || !page_aligned(len) {
        return Err(GmemError::invalid(format!(
            "fallocate range {offset:#x}+{len:#x} is not page aligned"
        )));
    }
    if mode & libc::FALLOC_FL_PUNCH_HOLE == 0 && end > size {
        return Err(GmemError::invalid(format!(
            "allocation {offset:#x}..{end:#x} passes the end {size:#x}"
        )));
    }
    Ok(offset..end)
}

impl GuestMemFile {
    /// Creates a file on `backend`, checking `config` as guest_memfd does.
    pub fn create(backend: &Backend, config: GmemConfig) -> Result<Self, GmemError> {
        let kind = backend.kind();
        let granule = match (kind, config.huge_page_size_log2) {
            (BackendKind::Hugetlb, log2 @ (21 | 30)) => 1u64 << log2,
            (BackendKind::Hugetlb, log2) => {
                return Err(GmemError::invalid(format!(
                    "huge_page_size_log2 {log2}: HugeTLB files need 21 (2 MiB) or 30 (1 GiB)"
                )));
            }
            (_, 0) => PAGE_SIZE,
            (_, log2) => {
                return Err(GmemError::invalid(format!(
                    "huge_page_size_log2 {log2} on the {} backend, which has no huge pages",
                    kind.name()
                )));
            }
        };
        if kind != BackendKind::Kvm {
            if config.size == 0 || !config.size.is_multiple_of(granule) {
                return Err(GmemError::invalid(format!(
                    "size {:#x} is not a non-zero multiple of {granule:#x}",
                    config.size
                )));
            }
            let unknown = config.flags & !kind.supported_flags();
            if unknown != 0 {
                return Err(GmemError::invalid(format!(
                    "flags {unknown:#x} are not supported by the {} backend",
                    kind.name()
                )));
            }
        }
        let initial = if config.flags & GUEST_MEMFD_FLAG_INIT_SHARED != 0 {
            Attribute::Shared
        } else {
            Attribute::Private
        };
        let mut vm = None;
        let (fd, master) = match backend {
            Backend::Kvm(kvm) => {
                vm = Some(kvm.clone());
                (Some(Self::create_kvm(kvm, config)?), None)
            }
            Backend::Memfd => {
                let fd = sys::memfd_create(c"mmukit-gmem", libc::MFD_CLOEXEC)
                    .map_err(GmemError::os("memfd_create"))?;
                sys::ftruncate(&fd, config.size).map_err(GmemError::os("ftruncate"))?;
                (Some(fd), None)
            }
            Backend::Hugetlb => {
                let (fd, master) = Self::create_hugetlb(config, granule)?;
                (Some(fd), Some(master))
            }
            Backend::Secret => {
                let fd = sys::memfd_secret().map_err(|err| {
                    if err.raw_os_error() == Some(libc::ENOSYS) {
                        GmemError::Unavailable {
                            backend: "secret",
                            why: "the kernel has no memfd_secret (boot with secretmem.enable=1)"
                                .into(),
                        }
                    } else {
                        GmemError::os("memfd_secret")(err)
                    }
                })?;
                sys::ftruncate(&fd, config.size).map_err(GmemError::os("ftruncate"))?;
                let master = Self::map_master(&fd, config.size)?;
                (Some(fd), Some(master))
            }
            Backend::Anonymous => {
                // NORESERVE: like a guest_memfd, a large file is sparse and
                // takes memory only as it is used, so a 1 TiB file is created
                // whatever the commit limit says.
                let master = Mapping::new(
                    config.size as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    None,
                    0,
                )
                .map_err(GmemError::os("mmap"))?;
                (None, Some(master))
            }
        };
        let size = match &fd {
            Some(fd) => sys::file_size(fd).map_err(GmemError::os("fstat"))?,
            None => config.size,
        };
        Ok(Self {
            inner: Arc::new(Inner {
                kind,
                size,
                flags: config.flags,
                granule,
                fd,
                master,
                vm,
                state: Mutex::new(FileState {
                    attrs: AttrMap::new(size / PAGE_SIZE, initial),
                    views: Vec::new(),
                    next_view: 0,
                    split_backing: None,
                    split: BTreeSet::new(),
                    metrics: FileMetrics::default(),
                }),
            }),
        })
    }

    fn create_kvm(vm: &KvmVm, config: GmemConfig) -> Result<OwnedFd, GmemError> {
        let raw = vm
            .vm()
            .create_guest_memfd(kvm_create_guest_memfd {
                size: config.size,
                flags: config.flags,
                reserved: [0; 6],
            })
            .map_err(|err| GmemError::Os {
                op: "KVM_CREATE_GUEST_MEMFD",
                source: io::Error::from_raw_os_error(err.errno()),
            })?;
        // SAFETY: the kernel just returned this descriptor; it is owned here
        // from now on and closed when the file is dropped.
        Ok(unsafe { OwnedFd::from_raw_fd(raw) })
    }

    fn map_master(fd: &OwnedFd, size: u64) -> Result<Mapping, GmemError> {
        Mapping::new(
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            Some(fd),
            0,
        )
        .map_err(GmemError::os("mmap"))
    }

    fn create_hugetlb(config: GmemConfig, granule: u64) -> Result<(OwnedFd, Mapping), GmemError> {
        let needed = config.size / granule;
        let pool = HugetlbPool::read(granule);
        let shortfall = |pool: Option<HugetlbPool>| GmemError::HugetlbShortfall {
            pool: pool.as_ref().map_or_else(
                || format!("hugepages-{}kB", granule >> 10),
                |p| p.name.clone(),
            ),
            needed,
            free: pool.map_or(0, |p| p.available),
        };
        if pool.as_ref().is_none_or(|p| p.available < needed) {
            return Err(shortfall(pool));
        }
        let log2 = u32::from(config.huge_page_size_log2);
        let flags = libc::MFD_CLOEXEC | libc::MFD_HUGETLB | (log2 << libc::MFD_HUGE_SHIFT);
        let name = CString::new("mmukit-gmem-hugetlb").expect("no NUL");
        let fd = sys::memfd_create(&name, flags).map_err(GmemError::os("memfd_create"))?;
        sys::ftruncate(&fd, config.size).map_err(GmemError::os("ftruncate"))?;
        // A shared mapping without MAP_NORESERVE reserves every huge page of
        // the file now, so that no later fault can fail.
        let master = Self::map_master(&fd, config.size).map_err(|err| match err.errno() {
            libc::ENOMEM => shortfall(HugetlbPool::read(granule)),
            _ => err,
        })?;
        Ok((fd, master))
    }

    fn state(&self) -> MutexGuard<'_, FileState> {
        self.inner.state()
    }

    /// The backend kind.
    pub fn backend(&self) -> BackendKind {
        self.inner.kind
    }

    /// The size in bytes (fixed for the file's life).
    pub fn size(&self) -> u64 {
        self.inner.size
    }

    /// The size the kernel reports for the file (fstat), or the size for
    /// anonymous memory.
    pub fn stat_size(&self) -> Result<u64, GmemError> {
        match &self.inner.fd {
            Some(fd) => sys::file_size(fd).map_err(GmemError::os("fstat")),
            None => Ok(self.inner.size),
        }
    }

    /// The creation flags.
    pub fn flags(&self) -> u64 {
        self.inner.flags
    }

    /// The page size of the backing: 4 KiB, or the HugeTLB page size.
    pub fn granule(&self) -> u64 {
        self.inner.granule
    }

    /// The file descriptor (none for anonymous memory).
    pub fn fd(&self) -> Option<&OwnedFd> {
        self.inner.fd.as_ref()
    }

    /// Whether `other` is this same file (clones share one file).
    pub fn is_same_file(&self, other: &GuestMemFile) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// The VM of a KVM guest_memfd.
    pub fn vm(&self) -> Option<&Arc<KvmVm>> {
        self.inner.vm.as_ref()
    }

    /// Counters and latencies.
    pub fn metrics(&self) -> FileMetrics {
        self.state().metrics
    }

    /// The attribute of the page at `offset`.
    pub fn attribute(&self, offset: u64) -> Attribute {
        self.state().attrs.get(offset / PAGE_SIZE)
    }

    /// Attribute runs over `[offset, offset + len)`, in bytes.
    pub fn attribute_runs(&self, offset: u64, len: u64) -> Vec<(u64, u64, Attribute)> {
        self.state()
            .attrs
            .runs(
                offset / PAGE_SIZE,
                offset.saturating_add(len).div_ceil(PAGE_SIZE),
            )
            .into_iter()
            .map(|(s, e, a)| (s * PAGE_SIZE, e * PAGE_SIZE, a))
            .collect()
    }

    /// Huge pages currently split.
    pub fn split_huge_pages(&self) -> Vec<u64> {
        self.state().split.iter().copied().collect()
    }

    // ----- file operations --------------------------------------------------

    /// `read(2)` on the file: guest memory files are not readable.
    pub fn read(&self, buf: &mut [u8]) -> Result<usize, GmemError> {
        match &self.inner.fd {
            Some(fd) if self.inner.kind == BackendKind::Kvm => {
                // SAFETY: `buf` is valid for writes of its length.
                let ret = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if ret < 0 {
                    Err(GmemError::os("read")(io::Error::last_os_error()))
                } else {
                    Ok(ret as usize)
                }
            }
            _ => Err(GmemError::invalid("guest memory files cannot be read")),
        }
    }

    /// `write(2)` on the file: guest memory files are not writable.
    pub fn write(&self, buf: &[u8]) -> Result<usize, GmemError> {
        match &self.inner.fd {
            Some(fd) if self.inner.kind == BackendKind::Kvm => {
                // SAFETY: `buf` is valid for reads of its length.
                let ret = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
                if ret < 0 {
                    Err(GmemError::os("write")(io::Error::last_os_error()))
                } else {
                    Ok(ret as usize)
                }
            }
            _ => Err(GmemError::invalid("guest memory files cannot be written")),
        }
    }

    /// `ftruncate(2)`: the size of a guest memory file is fixed.
    pub fn set_len(&self, len: u64) -> Result<(), GmemError> {
        match &self.inner.fd {
            Some(fd) if self.inner.kind == BackendKind::Kvm => {
                sys::ftruncate(fd, len).map_err(GmemError::os("ftruncate"))
            }
            _ => Err(GmemError::invalid(
                "the size of a guest memory file is fixed",
            )),
        }
    }

    /// `fallocate(2)` with the kernel's rules, checked in the kernel's
    /// order before anything is touched (see [`check_fallocate`]): a punch
    /// may pass the end of the file, an allocation may not. On the KVM
    /// backend the kernel itself answers.
    pub fn fallocate(&self, mode: i32, offset: u64, len: u64) -> Result<(), GmemError> {
        if self.inner.kind == BackendKind::Kvm {
            let fd = self.inner.fd.as_ref().expect("KVM files have a descriptor");
            return sys::fallocate(fd, mode, offset, len).map_err(GmemError::os("fallocate"));
        }
        let range = check_fallocate(mode, offset, len, self.inner.size)?;
        if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 {
            // Only now, with every argument valid, is the range cut at the end.
            let end = range.end.min(self.inner.size);
            if range.start < end {
                self.punch(range.start, end)?;
            }
            Ok(())
        } else {
            self.allocate(range.start, range.end)
        }
    }

    /// Allocates (`FALLOC_FL_KEEP_SIZE`) `[offset, offset + len)`.
    pub fn allocate_range(&self, offset: u64, len: u64) -> Result<(), GmemError> {
        self.fallocate(libc::FALLOC_FL_KEEP_SIZE, offset, len)
    }

    /// Punches a hole in `[offset, offset + len)`: the pages read back as zero.
    pub fn punch_hole(&self, offset: u64, len: u64) -> Result<(), GmemError> {
        self.fallocate(
            libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE,
            offset,
            len,
        )
    }

    fn allocate(&self, start: u64, end: u64) -> Result<(), GmemError> {
        let inner = &self.inner;
        let state = self.state();
        match inner.kind {
            BackendKind::Memfd | BackendKind::Hugetlb => {
                let fd = inner.fd.as_ref().expect("file backends have a descriptor");
                sys::fallocate(fd, libc::FALLOC_FL_KEEP_SIZE, start, end - start)
                    .map_err(GmemError::os("fallocate"))?;
                if let Some(backing) = &state.split_backing {
                    for &huge in &state.split {
                        let (hs, he) = (huge * inner.granule, (huge + 1) * inner.granule);
                        let (s, e) = (start.max(hs), end.min(he));
                        if s < e {
                            sys::fallocate(&backing.fd, libc::FALLOC_FL_KEEP_SIZE, s, e - s)
                                .map_err(GmemError::os("fallocate"))?;
                        }
                    }
                }
                Ok(())
            }
            BackendKind::Secret => {
                let master = inner.master.as_ref().expect("secret memory is mapped");
                // memfd_secret takes no MADV_POPULATE_WRITE: fault each page in.
                crate::prefault::touch_pages(master.addr() as usize + start as usize, end - start);
                Ok(())
            }
            BackendKind::Anonymous => {
                let master = inner.master.as_ref().expect("has an internal mapping");
                // SAFETY: inside the internal mapping; populating does not
                // change contents.
                unsafe {
                    sys::madvise(
                        master.addr().add(start as usize),
                        (end - start) as usize,
                        libc::MADV_POPULATE_WRITE,
                    )
                }
                .map_err(GmemError::os("madvise(MADV_POPULATE_WRITE)"))
            }
            BackendKind::Kvm => unreachable!("handled by the kernel"),
        }
    }

    fn punch(&self, start: u64, end: u64) -> Result<(), GmemError> {
        let inner = &self.inner;
        let state = self.state();
        match inner.kind {
            BackendKind::Memfd => sys::fallocate(
                inner.fd.as_ref().expect("memfd"),
                libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE,
                start,
                end - start,
            )
            .map_err(GmemError::os("fallocate")),
            BackendKind::Anonymous => {
                let master = inner.master.as_ref().expect("anonymous memory is mapped");
                // SAFETY: inside the internal mapping; dropping the pages is
                // the point, and readers go through raw pointers only.
                unsafe {
                    sys::madvise(
                        master.addr().add(start as usize),
                        (end - start) as usize,
                        libc::MADV_REMOVE,
                    )
                }
                .map_err(GmemError::os("madvise(MADV_REMOVE)"))
            }
            BackendKind::Secret => {
                // memfd_secret has no hole punching: zero the range.
                let master = inner.master.as_ref().expect("secret memory is mapped");
                // SAFETY: inside the internal read-write mapping.
                unsafe {
                    std::ptr::write_bytes(
                        master.addr().add(start as usize),
                        0,
                        (end - start) as usize,
                    )
                };
                Ok(())
            }
            BackendKind::Hugetlb => {
                // Split huge pages: punch their 4 KiB backing. Whole huge
                // pages are zeroed in place, so that they stay reserved and
                // no later fault can fail.
                let master = inner.master.as_ref().expect("HugeTLB files are mapped");
                let mut at = start;
                while at < end {
                    let huge = at / inner.granule;
                    let next = ((huge + 1) * inner.granule).min(end);
                    match (&state.split_backing, state.split.contains(&huge)) {
                        (Some(backing), true) => sys::fallocate(
                            &backing.fd,
                            libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE,
                            at,
                            next - at,
                        )
                        .map_err(GmemError::os("fallocate"))?,
                        // SAFETY: inside the internal read-write mapping.
                        _ => unsafe {
                            std::ptr::write_bytes(
                                master.addr().add(at as usize),
                                0,
                                (next - at) as usize,
                            )
                        },
                    }
                    at = next;
                }
                Ok(())
            }
            BackendKind::Kvm => unreachable!("handled by the kernel"),
        }
    }

    // ----- views ------------------------------------------------------------

    /// Maps `[offset, offset + len)` shared as a host view (private pages
    /// fault). Needs the MMAP flag (ENODEV). The length may pass the end of
    /// the file; accesses there fault.
    pub fn map(&self, offset: u64, len: u64) -> Result<View, GmemError> {
        self.mmap(offset, len, libc::MAP_SHARED, ViewKind::Host)
    }

    /// Maps a guest view (every page accessible) of `[offset, offset + len)`.
    pub fn map_guest(&self, offset: u64, len: u64) -> Result<View, GmemError> {
        self.mmap(offset, len, libc::MAP_SHARED, ViewKind::Guest)
    }

    /// `mmap(2)` with guest_memfd's rules: MMAP flag (ENODEV), `MAP_SHARED`
    /// (EINVAL), aligned offset (EINVAL; the huge page size for HugeTLB,
    /// whose lengths are whole huge pages too).
    pub fn mmap(
        &self,
        offset: u64,
        len: u64,
        map_flags: i32,
        kind: ViewKind,
    ) -> Result<View, GmemError> {
        let inner = &self.inner;
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        // Views start on a 2 MiB boundary when they are that big (a huge
        // page boundary for HugeTLB), so huge mappings line up with them.
        let align = if inner.kind == BackendKind::Hugetlb {
            inner.granule
        } else if len >= 2 << 20 {
            2 << 20
        } else {
            PAGE_SIZE
        } as usize;
        // guest_memfd: the kernel itself applies these rules to the mmap.
        // guest_memfd: the kernel's generic checks come before our
        // reservation, and the kernel applies its own to the mapping.
        let len = if inner.kind == BackendKind::Kvm {
            check_mmap_generic(offset, len, map_flags)?.0
        } else {
            check_mmap(offset, len, map_flags, inner.flags, inner.granule)?
        };
        let mapping = match inner.kind {
            BackendKind::Kvm => {
                let fd = inner.fd.as_ref().expect("KVM files have a descriptor");
                let mapping =
                    Mapping::reserve_aligned(len as usize, align).map_err(GmemError::os("mmap"))?;
                // SAFETY: the whole of our fresh reservation; the kernel
                // applies guest_memfd's rules to the flags.
                unsafe {
                    sys::map_fixed_flags(mapping.addr(), len as usize, prot, map_flags, fd, offset)
                }
                .map_err(GmemError::os("mmap"))?;
                mapping
            }
            BackendKind::Anonymous => self.alias_master(offset, len, align)?,
            _ => {
                let reserve =
                    Mapping::reserve_aligned(len as usize, align).map_err(GmemError::os("mmap"))?;
                // hugetlbfs grows a file that is mapped past its end: map
                // only the part inside it, and leave the rest inaccessible.
                // Other files fault (SIGBUS) past their end, as guest_memfd.
                let mapped = if inner.kind == BackendKind::Hugetlb {
                    len.min(inner.size.saturating_sub(offset))
                } else {
                    len
                };
                if mapped > 0 {
                    // SAFETY: the start of our fresh reservation.
                    unsafe {
                        sys::map_fixed(
                            reserve.addr(),
                            mapped as usize,
                            prot,
                            inner.fd.as_ref().expect("file backends have a descriptor"),
                            offset,
                        )
                    }
                    .map_err(GmemError::os("mmap"))?;
                }
                reserve
            }
        };
        // The kernel maps whole pages (checked above for the others).
        let len = len.next_multiple_of(PAGE_SIZE);
        // Past the end of the file an access raises SIGBUS, as on a
        // guest_memfd: memfd and secret memory do that themselves; the parts
        // of anonymous and HugeTLB views past the end are mapped from the
        // fault source.
        let inside = len.min(inner.size.saturating_sub(offset));
        if matches!(inner.kind, BackendKind::Anonymous | BackendKind::Hugetlb) && inside < len {
            // SAFETY: the tail of the fresh mapping, which nothing uses yet.
            unsafe { map_fault_source(mapping.addr().add(inside as usize), len - inside) }?;
        }
        let view = self.register(mapping, offset, len, kind);
        {
            let mut state = self.state();
            // Split huge pages in the new view come from their 4 KiB backing.
            let split: Vec<u64> = state.split.iter().copied().collect();
            for huge in split {
                inner.remap_view_huge(&mut state, view.id, huge, true)?;
            }
            let end_page = offset
                .saturating_add(len)
                .min(inner.size)
                .div_ceil(PAGE_SIZE);
            inner.protect(&state, offset / PAGE_SIZE, end_page, Some(view.id))?;
        }
        Ok(view)
    }

    /// Anonymous memory: a second mapping of the same pages (mremap with an
    /// old size of 0), with any part past the end left inaccessible.
    fn alias_master(&self, offset: u64, len: u64, align: usize) -> Result<Mapping, GmemError> {
        let master = self
            .inner
            .master
            .as_ref()
            .expect("anonymous memory is mapped");
        let reserve =
            Mapping::reserve_aligned(len as usize, align).map_err(GmemError::os("mmap"))?;
        let inside = len.min(self.inner.size.saturating_sub(offset));
        if inside > 0 {
            // SAFETY: the source is the shared internal mapping; the target is
            // the start of our fresh reservation.
            unsafe {
                sys::mremap_alias(
                    master.addr().add(offset as usize),
                    inside as usize,
                    reserve.addr(),
                )
            }
            .map_err(GmemError::os("mremap"))?;
        }
        Ok(reserve)
    }

    fn register(&self, mapping: Mapping, offset: u64, len: u64, kind: ViewKind) -> View {
        let mut state = self.state();
        let id = state.next_view;
        state.next_view += 1;
        state.views.push(ViewRecord {
            id,
            addr: mapping.addr() as usize,
            offset,
            len,
            kind,
        });
        View {
            file: self.inner.clone(),
            id,
            addr: mapping.addr() as usize,
            mapping: Some(mapping),
            offset,
            len,
            kind,
        }
    }

    // ----- conversion -------------------------------------------------------

    /// Converts `[offset, offset + len)` (page aligned, inside the file) to
    /// `to`. Host views fault on private pages from now on. On HugeTLB, a
    /// huge page that becomes mixed is split into 4 KiB backing, and one
    /// that becomes uniform again is merged back; data is kept either way.
    ///
    /// The caller must not let the guest access the range while it is
    /// converted (as KVM requires of private/shared conversions).
    pub fn convert(&self, offset: u64, len: u64, to: Attribute) -> Result<Protection, GmemError> {
        let end = offset
            .checked_add(len)
            .filter(|&end| end <= self.inner.size);
        let Some(end) = end.filter(|_| len > 0 && page_aligned(offset) && page_aligned(len)) else {
            return Err(GmemError::invalid(format!(
                "conversion range {offset:#x}+{len:#x} is not page aligned inside the file"
            )));
        };
        let inner = &self.inner;
        if inner.kernel_private() && to == Attribute::Shared {
            return Err(GmemError::NotSupported {
                what: format!(
                    "converting {offset:#x}+{len:#x} to shared: this guest_memfd was created \
                     private and the kernel cannot convert it in place (no memory attributes \
                     on the guest_memfd); map shared memory separately (SlotBinding with a \
                     shared mapping)"
                ),
            });
        }
        let mut state = self.state();
        let (first, last) = (offset / PAGE_SIZE, end / PAGE_SIZE);
        let before = state.attrs.runs(first, last);
        state.attrs.set(first, last, to);
        match to {
            Attribute::Private => state.metrics.to_private += last - first,
            Attribute::Shared => state.metrics.to_shared += last - first,
        }
        let (mut protect_first, mut protect_last) = (first, last);
        if inner.kind == BackendKind::Hugetlb {
            let pages_per_huge = inner.granule / PAGE_SIZE;
            for huge in offset / inner.granule..end.div_ceil(inner.granule) {
                let (hs, he) = (huge * pages_per_huge, (huge + 1) * pages_per_huge);
                let mixed = state.attrs.uniform(hs, he).is_none();
                let split = state.split.contains(&huge);
                let changed = if mixed && !split {
                    inner.split(&mut state, huge)
                } else if !mixed && split {
                    inner.merge(&mut state, huge)
                } else {
                    Ok(())
                };
                if let Err(err) = changed {
                    // This huge page and those after it kept their layout:
                    // so do their attributes. The ones before are converted.
                    let kept = hs.max(first);
                    for (run_start, run_end, attr) in before {
                        if run_end > kept {
                            state.attrs.set(run_start.max(kept), run_end, attr);
                        }
                    }
                    if protect_first < kept {
                        inner.protect(&state, protect_first, kept, None)?;
                    }
                    return Err(err);
                }
                protect_first = protect_first.min(hs);
                protect_last = protect_last.max(he);
            }
        }
        inner.protect(&state, protect_first, protect_last, None)?;
        Ok(Protection::HostViewOnly)
    }

    /// Populates `[offset, offset + len)` with `MADV_POPULATE_WRITE` on
    /// `threads` threads, calling `progress(done, total)` as chunks finish.
    pub fn prefault(
        &self,
        offset: u64,
        len: u64,
        threads: usize,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<crate::prefault::PrefaultReport, GmemError> {
        if threads == 0 {
            return Err(GmemError::invalid("prefault needs at least one thread"));
        }
        let end = offset
            .checked_add(len)
            .filter(|&end| end <= self.inner.size);
        let Some(_) = end.filter(|_| page_aligned(offset) && page_aligned(len)) else {
            return Err(GmemError::invalid(format!(
                "prefault range {offset:#x}+{len:#x} is not page aligned inside the file"
            )));
        };
        let temporary;
        let base = match &self.inner.master {
            Some(master) => master.addr() as usize + offset as usize,
            None => {
                if self.inner.flags & GUEST_MEMFD_FLAG_MMAP == 0 {
                    return Err(GmemError::NoMmap);
                }
                temporary = Mapping::new(
                    len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    self.inner.fd.as_ref(),
                    offset,
                )
                .map_err(GmemError::os("mmap"))?;
                temporary.addr() as usize
            }
        };
        let by_touch = self.inner.kind == BackendKind::Secret;
        crate::prefault::populate(base, len, threads, by_touch, progress)
    }
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, FileState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies the attributes of pages `[first, last)` to the host views
    /// (or only to view `only`).
    /// Makes host views follow the attributes of pages `[first, last)`
    /// (only view `only`, when given): a private page is mapped from the
    /// fault source, so that touching it raises SIGBUS as guest_memfd's
    /// fault handler does; a shared page is mapped from its memory again.
    /// Guest views are never changed.
    fn protect(
        &self,
        state: &FileState,
        first: u64,
        last: u64,
        only: Option<u64>,
    ) -> Result<(), GmemError> {
        for view in &state.views {
            if view.kind != ViewKind::Host || only.is_some_and(|id| id != view.id) {
                continue;
            }
            let view_first = view.offset / PAGE_SIZE;
            let view_last = view.offset.saturating_add(view.len).min(self.size) / PAGE_SIZE;
            let (s, e) = (first.max(view_first), last.min(view_last));
            if s >= e {
                continue;
            }
            for (run_start, run_end, attr) in state.attrs.runs(s, e) {
                let addr = (view.addr + (run_start * PAGE_SIZE - view.offset) as usize) as *mut u8;
                let len = (run_end - run_start) * PAGE_SIZE;
                match attr {
                    // SAFETY: the range lies inside this view's mapping, which
                    // the view owns and which stays mapped while it is
                    // registered (we hold the state lock). Views hand out raw
                    // pointers only.
                    Attribute::Private => unsafe { map_fault_source(addr, len) }?,
                    Attribute::Shared => {
                        // SAFETY: as above.
                        unsafe { self.map_memory(state, addr, run_start * PAGE_SIZE, len) }?
                    }
                }
            }
        }
        Ok(())
    }

    /// Maps the file's memory for `[offset, offset + len)` at `addr`: the
    /// file, the split backing of a split huge page, or the anonymous
    /// memory.
    ///
    /// # Safety
    ///
    /// `[addr, addr + len)` must lie inside a view's mapping, under the
    /// state lock.
    unsafe fn map_memory(
        &self,
        state: &FileState,
        addr: *mut u8,
        offset: u64,
        len: u64,
    ) -> Result<(), GmemError> {
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        match self.kind {
            BackendKind::Memfd | BackendKind::Secret | BackendKind::Kvm => {
                let fd = self.fd.as_ref().expect("file backends have a descriptor");
                // SAFETY: guaranteed by the caller.
                unsafe { sys::map_fixed(addr, len as usize, rw, fd, offset) }
                    .map_err(GmemError::os("mmap(MAP_FIXED)"))
            }
            BackendKind::Anonymous => {
                let master = self.master.as_ref().expect("anonymous memory is mapped");
                // SAFETY: the source is the shared internal mapping; the
                // target is guaranteed by the caller.
                unsafe { sys::mremap_alias(master.addr().add(offset as usize), len as usize, addr) }
                    .map_err(GmemError::os("mremap"))
            }
            BackendKind::Hugetlb => {
                let mut at = offset;
                while at < offset + len {
                    let huge = at / self.granule;
                    let next = ((huge + 1) * self.granule).min(offset + len);
                    let target = addr.wrapping_add((at - offset) as usize);
                    let (fd, piece) = match (&state.split_backing, state.split.contains(&huge)) {
                        (Some(backing), true) => (&backing.fd, at..next),
                        // Pages of a huge page that is not split share its
                        // attribute, so the run covers it whole.
                        _ => {
                            debug_assert!(
                                at.is_multiple_of(self.granule) && next - at == self.granule
                            );
                            (
                                self.fd.as_ref().expect("HugeTLB files have a descriptor"),
                                at..next,
                            )
                        }
                    };
                    // SAFETY: inside the caller's range.
                    unsafe {
                        sys::map_fixed(
                            target,
                            (piece.end - piece.start) as usize,
                            rw,
                            fd,
                            piece.start,
                        )
                    }
                    .map_err(GmemError::os("mmap(MAP_FIXED)"))?;
                    at = next;
                }
                Ok(())
            }
        }
    }

    /// Whether the kernel holds this file's pages private and can convert
    /// none of them: a guest_memfd created without INIT_SHARED, on a kernel
    /// without in-place conversion. Any host access to them, from any view,
    /// raises SIGBUS.
    fn kernel_private(&self) -> bool {
        self.kind == BackendKind::Kvm && self.flags & GUEST_MEMFD_FLAG_INIT_SHARED == 0
    }

    /// Points huge page `huge` of view `id` at the 4 KiB backing
    /// (`to_split`) or back at the huge page.
    fn remap_view_huge(
        &self,
        state: &mut FileState,
        id: u64,
        huge: u64,
        to_split: bool,
    ) -> Result<(), GmemError> {
        let (hs, he) = (huge * self.granule, (huge + 1) * self.granule);
        let Some(view) = state.views.iter().find(|v| v.id == id) else {
            return Ok(());
        };
        if hs < view.offset || he > view.offset.saturating_add(view.len) {
            return Ok(());
        }
        let addr = (view.addr + (hs - view.offset) as usize) as *mut u8;
        #[cfg(test)]
        if tests::remap_should_fail() {
            return Err(GmemError::Os {
                op: "mmap(MAP_FIXED)",
                source: io::Error::from_raw_os_error(libc::ENOMEM),
            });
        }
        let fd = if to_split {
            &state
                .split_backing
                .as_ref()
                .expect("split pages have a backing")
                .fd
        } else {
            self.fd.as_ref().expect("HugeTLB files have a descriptor")
        };
        // SAFETY: the huge page lies inside the view's own mapping (checked
        // above, under the state lock); views hand out raw pointers only.
        unsafe {
            sys::map_fixed(
                addr,
                self.granule as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                fd,
                hs,
            )
        }
        .map_err(GmemError::os("mmap(MAP_FIXED)"))
    }

    fn split(&self, state: &mut FileState, huge: u64) -> Result<(), GmemError> {
        let start = Instant::now();
        if state.split_backing.is_none() {
            let fd = sys::memfd_create(c"mmukit-gmem-split", libc::MFD_CLOEXEC)
                .map_err(GmemError::os("memfd_create"))?;
            sys::ftruncate(&fd, self.size).map_err(GmemError::os("ftruncate"))?;
            let map = GuestMemFile::map_master(&fd, self.size)?;
            state.split_backing = Some(SplitBacking { fd, map });
        }
        let backing = state.split_backing.as_ref().expect("created above");
        let master = self.master.as_ref().expect("HugeTLB files are mapped");
        let offset = (huge * self.granule) as usize;
        // Allocate the 4 KiB pages in one call rather than one fault each.
        // SAFETY: inside the internal mapping of the backing.
        unsafe {
            sys::madvise(
                backing.map.addr().add(offset),
                self.granule as usize,
                libc::MADV_POPULATE_WRITE,
            )
        }
        .map_err(GmemError::os("madvise(MADV_POPULATE_WRITE)"))?;
        // SAFETY: both internal mappings cover the whole file; the ranges are
        // the same huge page in two different files.
        unsafe {
            std::ptr::copy_nonoverlapping(
                master.addr().add(offset),
                backing.map.addr().add(offset),
                self.granule as usize,
            )
        };
        let ids: Vec<u64> = state.views.iter().map(|v| v.id).collect();
        state.split.insert(huge);
        for id in ids {
            self.remap_view_huge(state, id, huge, true)?;
        }
        state.metrics.splits += 1;
        state.metrics.split_now += 1;
        state.metrics.split_time += start.elapsed();
        Ok(())
    }

    /// Puts a split huge page back together, in the order that keeps its
    /// data safe if a step fails: copy the 4 KiB pieces back into the huge
    /// page; remap every view onto it (should one remap fail, the views
    /// already moved go back to the pieces, which still hold the same data,
    /// and the page stays split); only then punch the 4 KiB backing; and
    /// last forget the split. A failed punch leaves nothing to lose (every
    /// view is on the huge page): it is logged, and the backing's pages are
    /// freed when the file closes or the page is split again.
    ///
    /// Like a split, a merge expects no access to the huge page's range
    /// while it runs (a VMM converts memory the guest is not using).
    fn merge(&self, state: &mut FileState, huge: u64) -> Result<(), GmemError> {
        let start = Instant::now();
        let backing = state
            .split_backing
            .as_ref()
            .expect("split pages have a backing");
        let master = self.master.as_ref().expect("HugeTLB files are mapped");
        let offset = huge * self.granule;
        // SAFETY: as in `split`, the other way.
        unsafe {
            std::ptr::copy_nonoverlapping(
                backing.map.addr().add(offset as usize),
                master.addr().add(offset as usize),
                self.granule as usize,
            )
        };
        let ids: Vec<u64> = state.views.iter().map(|v| v.id).collect();
        for (done, &id) in ids.iter().enumerate() {
            if let Err(err) = self.remap_view_huge(state, id, huge, false) {
                for &moved in &ids[..done] {
                    if let Err(back) = self.remap_view_huge(state, moved, huge, true) {
                        tracing::error!(%back, view = moved, "merge rollback: a view stays on the huge page");
                    }
                }
                return Err(err);
            }
        }
        let backing = state
            .split_backing
            .as_ref()
            .expect("split pages have a backing");
        if let Err(err) = sys::fallocate(
            &backing.fd,
            libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE,
            offset,
            self.granule,
        ) {
            tracing::warn!(%err, huge, "merge: punching the 4 KiB backing failed; it is freed later");
        }
        state.split.remove(&huge);
        state.metrics.merges += 1;
        state.metrics.split_now -= 1;
        state.metrics.merge_time += start.elapsed();
        Ok(())
    }
}

/// A mapping of part of a guest memory file, unmapped on drop.
///
/// Memory is reached through [`as_ptr`](Self::as_ptr) (guest memory is
/// shared with a guest, so there are no Rust references into it) or copied
/// with [`read_at`](Self::read_at) / [`write_at`](Self::write_at), which
/// check the attributes of a host view first.
#[derive(Debug)]
pub struct View {
    file: Arc<Inner>,
    id: u64,
    addr: usize,
    mapping: Option<Mapping>,
    offset: u64,
    len: u64,
    kind: ViewKind,
}

impl View {
    /// The address of the view's first byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.addr as *mut u8
    }

    /// Keeps the mapping for the rest of the process: the view stops
    /// following conversions and is never unmapped.
    pub(crate) fn leak_mapping(&mut self) {
        let mut state = self.file.state();
        state.views.retain(|v| v.id != self.id);
        if let Some(mapping) = self.mapping.take() {
            std::mem::forget(mapping);
        }
    }

    /// The file offset the view starts at.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The view's length.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the view is empty (never: views have a length).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Host or guest view.
    pub fn kind(&self) -> ViewKind {
        self.kind
    }

    fn check(&self, state: &FileState, at: u64, len: usize) -> Result<usize, GmemError> {
        let end = at
            .checked_add(len as u64)
            .filter(|&end| end <= self.len)
            .ok_or_else(|| GmemError::invalid("access outside the view"))?;
        let (file_start, file_end) = (
            self.offset.saturating_add(at),
            self.offset.saturating_add(end),
        );
        if file_end > self.file.size {
            return Err(GmemError::Fault {
                offset: self.file.size.max(file_start),
                why: "past the end of the file",
            });
        }
        if len > 0 && self.file.kernel_private() {
            return Err(GmemError::Fault {
                offset: file_start,
                why: "the kernel holds the page private",
            });
        }
        if self.kind == ViewKind::Host && len > 0 {
            let private = state
                .attrs
                .runs(file_start / PAGE_SIZE, file_end.div_ceil(PAGE_SIZE))
                .into_iter()
                .find(|run| run.2 == Attribute::Private);
            if let Some((page, _, _)) = private {
                return Err(GmemError::Fault {
                    offset: (page * PAGE_SIZE).max(file_start),
                    why: "the page is private",
                });
            }
        }
        Ok(at as usize)
    }

    /// Copies from the view at `at` into `buf`; a host view refuses private
    /// pages (EFAULT) instead of faulting.
    pub fn read_at(&self, at: u64, buf: &mut [u8]) -> Result<(), GmemError> {
        let state = self.file.state();
        let at = self.check(&state, at, buf.len())?;
        // SAFETY: the range is inside the mapping and accessible (checked
        // under the state lock, which conversions take).
        unsafe {
            std::ptr::copy_nonoverlapping(self.as_ptr().add(at), buf.as_mut_ptr(), buf.len())
        };
        Ok(())
    }

    /// Copies `buf` into the view at `at`; a host view refuses private pages.
    pub fn write_at(&self, at: u64, buf: &[u8]) -> Result<(), GmemError> {
        let state = self.file.state();
        let at = self.check(&state, at, buf.len())?;
        // SAFETY: as in `read_at`.
        unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), self.as_ptr().add(at), buf.len()) };
        Ok(())
    }

    /// Fills `[at, at + len)` with `byte`; a host view refuses private pages.
    pub fn fill(&self, at: u64, len: u64, byte: u8) -> Result<(), GmemError> {
        let state = self.file.state();
        let at = self.check(&state, at, len as usize)?;
        // SAFETY: as in `read_at`.
        unsafe { std::ptr::write_bytes(self.as_ptr().add(at), byte, len as usize) };
        Ok(())
    }
}

impl Drop for View {
    fn drop(&mut self) {
        let mut state = self.file.state();
        state.views.retain(|v| v.id != self.id);
        // Unmapped under the lock, so that no conversion remaps into it.
        drop(self.mapping.take());
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;
    use crate::consts::GUEST_MEMFD_FLAG_INIT_SHARED;

    thread_local! {
        /// Remaps of a huge page to let through before one fails.
        static REMAPS_BEFORE_FAILURE: Cell<Option<u32>> = const { Cell::new(None) };
    }

    /// Whether the remap about to happen is the one to fail.
    pub(super) fn remap_should_fail() -> bool {
        REMAPS_BEFORE_FAILURE.with(|left| match left.get() {
            Some(0) => {
                left.set(None);
                true
            }
            Some(n) => {
                left.set(Some(n - 1));
                false
            }
            None => false,
        })
    }

    fn hugetlb_file(size: u64) -> Option<GuestMemFile> {
        let file = GuestMemFile::create(
            &Backend::Hugetlb,
            GmemConfig {
                size,
                flags: GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
                huge_page_size_log2: 21,
            },
        );
        match file {
            Ok(file) => Some(file),
            Err(err) => {
                eprintln!("skip: no 2 MiB HugeTLB pages here ({err})");
                None
            }
        }
    }

    /// A merge whose second remap fails moves the first view back onto the
    /// 4 KiB pieces and keeps the page split: both views still see the same
    /// memory, nothing written is lost, and a later merge succeeds.
    #[test]
    fn a_merge_that_fails_half_way_keeps_every_view_on_the_same_data() {
        let huge = 2u64 << 20;
        let Some(file) = hugetlb_file(huge) else {
            return;
        };
        let a = file.map_guest(0, huge).unwrap();
        let b = file.map_guest(0, huge).unwrap();
        a.fill(0, huge, 0x11).unwrap();
        file.convert(0x3000, 0x1000, Attribute::Private).unwrap();
        assert_eq!(file.split_huge_pages(), vec![0]);
        a.write_at(0x10_0000, &[0x22; 8]).unwrap();
        REMAPS_BEFORE_FAILURE.with(|left| left.set(Some(1)));
        assert!(file.convert(0x3000, 0x1000, Attribute::Shared).is_err());
        assert_eq!(file.split_huge_pages(), vec![0], "still split");
        assert_eq!(
            file.attribute(0x3000),
            Attribute::Private,
            "attributes kept"
        );
        // The two views still share one copy of the memory.
        b.write_at(0x20_0000 - 8, &[0x33; 8]).unwrap();
        let mut back = [0u8; 8];
        a.read_at(0x20_0000 - 8, &mut back).unwrap();
        assert_eq!(back, [0x33; 8]);
        b.read_at(0x10_0000, &mut back).unwrap();
        assert_eq!(back, [0x22; 8]);
        // The merge goes through now, and keeps all of it.
        file.convert(0x3000, 0x1000, Attribute::Shared).unwrap();
        assert!(file.split_huge_pages().is_empty());
        for (view, at, byte) in [
            (&a, 0x10_0000, 0x22),
            (&b, 0x20_0000 - 8, 0x33),
            (&a, 0, 0x11),
        ] {
            view.read_at(at, &mut back).unwrap();
            assert_eq!(back, [byte; 8], "at {at:#x}");
        }
    }
}
