//! Guest memory files: one guest_memfd contract over five backends.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::attrs::{AttrMap, Attribute};
use crate::consts::{
    GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
};
use crate::sys::{self, Mapping};

mod backend;
mod error;
mod hugetlb;
mod mapping;
mod rules;
mod view;

use backend::Storage;
pub use error::{GmemError, InvalidArgument, Unsupported};
use hugetlb::SplitState;
use mapping::PUNCH_HOLE;
use rules::page_aligned;
pub use rules::{check_fallocate, check_mmap};
pub use view::View;

/// The base page size.
pub use mmukit_sys::size::PAGE_4K as PAGE_SIZE;

/// The size of a transparent huge page on x86-64.
use mmukit_sys::size::PAGE_2M as THP_SIZE;

/// A VM that makes guest_memfd files (`KVM_CREATE_GUEST_MEMFD`). The KVM
/// binding's [`KvmVm`](crate::KvmVm) is the one this crate provides; the
/// trait keeps guest memory files apart from the binding, which uses them.
pub trait GuestMemfdVm: Send + Sync + std::fmt::Debug {
    /// `KVM_CREATE_GUEST_MEMFD` of `config`: the kernel checks the size and
    /// the flags and answers with its errno.
    fn create_guest_memfd(&self, config: GmemConfig) -> Result<OwnedFd, GmemError>;

    /// The guest_memfd flags the VM takes (`KVM_CAP_GUEST_MEMFD_FLAGS`).
    fn guest_memfd_flags(&self) -> u64;
}

/// Where a file's memory comes from.
#[derive(Clone, Debug)]
pub enum Backend {
    /// KVM guest_memfd on this VM.
    Kvm(Arc<dyn GuestMemfdVm>),
    /// A memfd (shmem).
    Memfd,
    /// A HugeTLB memfd; the page size is the config's `huge_page_size_log2`.
    Hugetlb,
    /// memfd_secret: pages are not in the kernel's direct map.
    Secret,
    /// Shared anonymous memory: views are second mappings of the same
    /// pages, so a host view can hide a private page the guest view shows.
    /// Its transparent huge pages follow the host's shmem THP mode.
    Anonymous,
    /// Private anonymous memory (`MAP_PRIVATE` with `MADV_HUGEPAGE`), a
    /// VMM's plain RAM: transparent huge pages under the host's default
    /// `madvise` mode. Views are windows of its one mapping, so they must
    /// lie inside the file, and its pages stay shared (a file created
    /// private or a conversion to private is refused). Its kind is
    /// [`BackendKind::Anonymous`].
    PrivateAnonymous,
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
    /// Anonymous memory, shared or private.
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
            Self::Anonymous | Self::PrivateAnonymous => BackendKind::Anonymous,
        }
    }

    /// Anonymous memory in the form a file needs: private anonymous
    /// ([`Backend::PrivateAnonymous`], which gets transparent huge pages on
    /// a stock host) where no page will ever be private, so no second host
    /// view of the same pages is needed; shared anonymous
    /// ([`Backend::Anonymous`]) where pages may become private.
    ///
    /// ```
    /// use gmem::Backend;
    ///
    /// assert!(matches!(Backend::anonymous(false), Backend::PrivateAnonymous));
    /// assert!(matches!(Backend::anonymous(true), Backend::Anonymous));
    /// ```
    pub fn anonymous(private_pages: bool) -> Self {
        if private_pages {
            Self::Anonymous
        } else {
            Self::PrivateAnonymous
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
    /// Split steps on a HugeTLB file, each counted once: a 2 MiB page onto
    /// 4 KiB pages (in place, with nothing copied, while no host view maps
    /// it; moved to 4 KiB pages when one comes, which counts no new step);
    /// a 1 GiB page into 2 MiB pieces (the first tier), or
    /// onto 4 KiB pages whole where the 2 MiB pool is short; a 2 MiB piece
    /// of a tiered 1 GiB page onto 4 KiB pages (the second tier). So a
    /// 4 KiB conversion inside a whole 1 GiB page counts two.
    pub splits: u64,
    /// Merge steps, the reverse of each split step, counted the same way.
    pub merges: u64,
    /// Split steps in force now (`splits - merges`): huge pages split, plus
    /// pieces of tiered pages on 4 KiB pages.
    pub split_now: u64,
    /// Time spent splitting.
    pub split_time: Duration,
    /// Time spent merging.
    pub merge_time: Duration,
    /// Of `split_time` and `merge_time`, the part that moved the data
    /// (with what allocating the destination pages took); the rest remapped
    /// the views.
    pub copy_time: Duration,
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

#[derive(Debug)]
struct FileState {
    attrs: AttrMap,
    views: Vec<ViewRecord>,
    next_view: u64,
    /// Where a HugeTLB file's split huge pages lie (empty on the other
    /// backends).
    splits: SplitState,
    metrics: FileMetrics,
}

#[derive(Debug)]
pub(crate) struct Inner {
    size: u64,
    flags: u64,
    granule: u64,
    /// What the backend does its own way.
    storage: Box<dyn Storage>,
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

impl GuestMemFile {
    /// Creates a file on `backend`, checking `config` as guest_memfd does.
    pub fn create(backend: &Backend, config: GmemConfig) -> Result<Self, GmemError> {
        let kind = backend.kind();
        let granule = match (kind, config.huge_page_size_log2) {
            (BackendKind::Hugetlb, log2 @ (21 | 30)) => 1u64 << log2,
            (BackendKind::Hugetlb, log2) => {
                return Err(InvalidArgument::HugePageSize { log2 }.into());
            }
            (_, 0) => PAGE_SIZE,
            (_, log2) => {
                return Err(InvalidArgument::NoHugePages {
                    log2,
                    backend: kind.name(),
                }
                .into());
            }
        };
        if kind != BackendKind::Kvm {
            if config.size == 0 || !config.size.is_multiple_of(granule) {
                return Err(InvalidArgument::Size {
                    size: config.size,
                    granule,
                }
                .into());
            }
            let unknown = config.flags & !kind.supported_flags();
            if unknown != 0 {
                return Err(InvalidArgument::Flags {
                    flags: unknown,
                    backend: kind.name(),
                }
                .into());
            }
        }
        let initial = if config.flags & GUEST_MEMFD_FLAG_INIT_SHARED != 0 {
            Attribute::Shared
        } else {
            Attribute::Private
        };
        if initial == Attribute::Private && matches!(backend, Backend::PrivateAnonymous) {
            return Err(Unsupported::PrivatePageOnPrivateAnonymous {
                what: "a file created private (no GUEST_MEMFD_FLAG_INIT_SHARED)",
            }
            .into());
        }
        let storage = backend::create(backend, config, granule)?;
        let size = match storage.fd() {
            Some(fd) => sys::file_size(fd).map_err(GmemError::os("fstat"))?,
            None => config.size,
        };
        Ok(Self {
            inner: Arc::new(Inner {
                size,
                flags: config.flags,
                granule,
                storage,
                state: Mutex::new(FileState {
                    attrs: AttrMap::new(size / PAGE_SIZE, initial),
                    views: Vec::new(),
                    next_view: 0,
                    splits: SplitState::default(),
                    metrics: FileMetrics::default(),
                }),
            }),
        })
    }

    fn state(&self) -> MutexGuard<'_, FileState> {
        self.inner.state()
    }

    /// The backend kind.
    pub fn backend(&self) -> BackendKind {
        self.inner.storage.kind()
    }

    /// The backend in words, with the form of anonymous memory: `private
    /// anonymous` or `shared anonymous`, otherwise the kind's name.
    pub fn form(&self) -> &'static str {
        match self.backend() {
            BackendKind::Anonymous if self.inner.storage.window(0).is_some() => "private anonymous",
            BackendKind::Anonymous => "shared anonymous",
            kind => kind.name(),
        }
    }

    /// The size in bytes (fixed for the file's life).
    pub fn size(&self) -> u64 {
        self.inner.size
    }

    /// The size the kernel reports for the file (fstat), or the size for
    /// anonymous memory.
    pub fn stat_size(&self) -> Result<u64, GmemError> {
        match self.inner.storage.fd() {
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
        self.inner.storage.fd()
    }

    /// Whether `other` is this same file (clones share one file).
    pub fn is_same_file(&self, other: &GuestMemFile) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// The VM of a KVM guest_memfd.
    pub fn vm(&self) -> Option<&Arc<dyn GuestMemfdVm>> {
        self.inner.storage.vm()
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

    /// Whether the file's memory asks for transparent huge pages
    /// (`MADV_HUGEPAGE`) where the host gives them: private anonymous
    /// memory under the host's anonymous THP mode (`always` or `madvise`),
    /// shared anonymous and memfd memory under its shmem THP mode (see
    /// [`HostCaps`](crate::HostCaps)). [`residency`](Self::residency) says
    /// what the kernel actually gave.
    pub fn transparent_huge_pages(&self) -> bool {
        self.inner.storage.transparent_huge_pages()
    }

    /// What the kernel says backs the file's mappings now (its internal
    /// mapping and every view that is a mapping of its own): resident bytes
    /// and those in huge pages, read from `/proc/self/smaps`. A page mapped
    /// by two mappings (a shared file and its views) counts in each. `None`
    /// where smaps cannot be read.
    ///
    /// ```
    /// use gmem::{Backend, GmemConfig, GuestMemFile};
    /// use gmem::consts::{GUEST_MEMFD_FLAG_MMAP, GUEST_MEMFD_FLAG_INIT_SHARED};
    ///
    /// let file = GuestMemFile::create(&Backend::PrivateAnonymous, GmemConfig {
    ///     size: 4 << 20,
    ///     flags: GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
    ///     huge_page_size_log2: 0,
    /// })?;
    /// file.prefault(0, 4 << 20, 1, &|_, _| {})?;
    /// let seen = file.residency().expect("smaps is readable");
    /// assert_eq!(seen.resident, 4 << 20);
    /// # Ok::<(), gmem::GmemError>(())
    /// ```
    pub fn residency(&self) -> Option<crate::Residency> {
        let mut ranges: Vec<(usize, usize)> = Vec::new();
        if let Some(master) = self.inner.storage.master() {
            ranges.push((master.addr() as usize, master.len()));
        }
        if self.inner.storage.window(0).is_none() {
            let state = self.state();
            ranges.extend(state.views.iter().map(|v| (v.addr, v.len as usize)));
        }
        let mut total = crate::Residency::default();
        for (start, len) in ranges {
            let seen = crate::Residency::of_range(start, len)?;
            total.resident += seen.resident;
            total.huge += seen.huge;
        }
        Some(total)
    }

    /// The largest page the host maps the file's memory with, the bound a
    /// KVM fault finds in the host page tables (`host_pfn_mapping_level`):
    /// the HugeTLB page size, 2 MiB where the memory asks for transparent
    /// huge pages, 4 KiB otherwise. A HugeTLB page split for a conversion
    /// is mapped with 4 KiB pages until it is merged.
    pub fn host_page_size(&self) -> u64 {
        if let Some(hugetlb) = self.inner.storage.hugetlb() {
            hugetlb.page_size()
        } else if self.transparent_huge_pages() {
            THP_SIZE
        } else {
            PAGE_SIZE
        }
    }

    /// The order of the page behind `offset` (what `kvm_gmem_get_pfn`
    /// returns as `max_order`): 9 or 18 for a HugeTLB page of 2 MiB or
    /// 1 GiB while it is whole, 0 once it is split and on the other
    /// backends.
    pub fn page_order(&self, offset: u64) -> u8 {
        match self.inner.storage.hugetlb() {
            Some(hugetlb) => hugetlb.page_order(&self.state().splits, offset),
            None => 0,
        }
    }

    /// Huge pages currently split.
    pub fn split_huge_pages(&self) -> Vec<u64> {
        self.state().splits.split_pages()
    }

    // ----- file operations --------------------------------------------------

    /// `read(2)` on the file: guest memory files are not readable.
    pub fn read(&self, buf: &mut [u8]) -> Result<usize, GmemError> {
        match self.inner.storage.kernel_file() {
            Some(fd) => {
                // SAFETY: `buf` is valid for writes of its length.
                let ret = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if ret < 0 {
                    Err(GmemError::os("read")(io::Error::last_os_error()))
                } else {
                    Ok(ret as usize)
                }
            }
            _ => Err(InvalidArgument::FileIo { done: "read" }.into()),
        }
    }

    /// `write(2)` on the file: guest memory files are not writable.
    pub fn write(&self, buf: &[u8]) -> Result<usize, GmemError> {
        match self.inner.storage.kernel_file() {
            Some(fd) => {
                // SAFETY: `buf` is valid for reads of its length.
                let ret = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
                if ret < 0 {
                    Err(GmemError::os("write")(io::Error::last_os_error()))
                } else {
                    Ok(ret as usize)
                }
            }
            _ => Err(InvalidArgument::FileIo { done: "written" }.into()),
        }
    }

    /// `ftruncate(2)`: the size of a guest memory file is fixed.
    pub fn set_len(&self, len: u64) -> Result<(), GmemError> {
        match self.inner.storage.kernel_file() {
            Some(fd) => sys::ftruncate(fd, len).map_err(GmemError::os("ftruncate")),
            _ => Err(InvalidArgument::FixedSize.into()),
        }
    }

    /// `fallocate(2)` with the kernel's rules, checked in the kernel's
    /// order before anything is touched (see [`check_fallocate`]): a punch
    /// may pass the end of the file, an allocation may not. On the KVM
    /// backend the kernel itself answers.
    pub fn fallocate(&self, mode: i32, offset: u64, len: u64) -> Result<(), GmemError> {
        if let Some(fd) = self.inner.storage.kernel_file() {
            return sys::fallocate(fd, mode, offset, len).map_err(GmemError::os("fallocate"));
        }
        let range = check_fallocate(mode, offset, len, self.inner.size)?;
        if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 {
            // Only now, with every argument valid, is the range cut at the end.
            let end = range.end.min(self.inner.size);
            if range.start < end {
                let state = self.state();
                self.inner
                    .storage
                    .punch(&self.inner, &state, range.start, end)?;
            }
            Ok(())
        } else {
            let state = self.state();
            self.inner
                .storage
                .allocate(&self.inner, &state, range.start, range.end)
        }
    }

    /// Allocates (`FALLOC_FL_KEEP_SIZE`) `[offset, offset + len)`.
    pub fn allocate_range(&self, offset: u64, len: u64) -> Result<(), GmemError> {
        self.fallocate(libc::FALLOC_FL_KEEP_SIZE, offset, len)
    }

    /// Punches a hole in `[offset, offset + len)`: the pages read back as zero.
    pub fn punch_hole(&self, offset: u64, len: u64) -> Result<(), GmemError> {
        self.fallocate(PUNCH_HOLE, offset, len)
    }

    // ----- conversion -------------------------------------------------------

    /// Converts `[offset, offset + len)` (page aligned, inside the file) to
    /// `to`. Host views fault on private pages from now on. On HugeTLB, a
    /// huge page that becomes mixed is split, and one that becomes uniform
    /// again is merged back; data is kept either way. A 2 MiB page splits
    /// in one step: in place (only its order changes) while no host view
    /// maps it, onto 4 KiB pages otherwise; a 1 GiB page in two tiers, into 2 MiB
    /// pieces and then only its mixed pieces onto 4 KiB pages (or onto 4 KiB
    /// pages whole where the 2 MiB pool is short). [`FileMetrics`] counts
    /// each step.
    ///
    /// The caller must not let the guest access the range while it is
    /// converted (as KVM requires of private/shared conversions).
    pub fn convert(&self, offset: u64, len: u64, to: Attribute) -> Result<Protection, GmemError> {
        let end = offset
            .checked_add(len)
            .filter(|&end| end <= self.inner.size);
        let Some(end) = end.filter(|_| len > 0 && page_aligned(offset) && page_aligned(len)) else {
            return Err(InvalidArgument::Range {
                op: "conversion",
                offset,
                len,
            }
            .into());
        };
        let inner = &self.inner;
        if inner.kernel_private() && to == Attribute::Shared {
            return Err(Unsupported::SharedConversionOfPrivateFile { offset, len }.into());
        }
        if to == Attribute::Private && !inner.storage.holds_private_pages() {
            return Err(Unsupported::PrivatePageOnPrivateAnonymous {
                what: "a conversion to private",
            }
            .into());
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
        if let Some(hugetlb) = inner.storage.hugetlb() {
            match hugetlb.follow_conversion(&mut state, offset, end) {
                Ok(reshaped) => {
                    protect_first = protect_first.min(reshaped.start);
                    protect_last = protect_last.max(reshaped.end);
                }
                Err(stopped) => {
                    // The huge page that failed and those after it kept
                    // their layout: so do their attributes. The ones before
                    // are converted.
                    let kept = stopped.kept_from;
                    for (run_start, run_end, attr) in before {
                        if run_end > kept {
                            state.attrs.set(run_start.max(kept), run_end, attr);
                        }
                    }
                    let from = protect_first.min(stopped.reshaped_from);
                    if from < kept {
                        inner.protect(&state, from, kept, None)?;
                    }
                    return Err(stopped.error);
                }
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
            return Err(InvalidArgument::NoThreads.into());
        }
        let end = offset
            .checked_add(len)
            .filter(|&end| end <= self.inner.size);
        let Some(_) = end.filter(|_| page_aligned(offset) && page_aligned(len)) else {
            return Err(InvalidArgument::Range {
                op: "prefault",
                offset,
                len,
            }
            .into());
        };
        let temporary;
        let base = match self.inner.storage.master() {
            Some(master) => master.addr() as usize + offset as usize,
            None => {
                if self.inner.flags & GUEST_MEMFD_FLAG_MMAP == 0 {
                    return Err(GmemError::NoMmap);
                }
                temporary = Mapping::new(
                    len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    self.inner.storage.fd(),
                    offset,
                )
                .map_err(GmemError::os("mmap"))?;
                if self.inner.storage.transparent_huge_pages() {
                    // SAFETY: our fresh mapping of the range.
                    unsafe { mapping::ask_for_huge_pages(temporary.addr(), len as usize) };
                }
                temporary.addr() as usize
            }
        };
        let by_touch = self.inner.storage.populates_by_touch();
        Ok(crate::prefault::populate(
            base, len, threads, by_touch, progress,
        )?)
    }
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, FileState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the kernel holds this file's pages private and can convert
    /// none of them: a guest_memfd created without INIT_SHARED, on a kernel
    /// without in-place conversion. Any host access to them, from any view,
    /// raises SIGBUS.
    fn kernel_private(&self) -> bool {
        self.storage.kernel_file().is_some() && self.flags & GUEST_MEMFD_FLAG_INIT_SHARED == 0
    }
}
