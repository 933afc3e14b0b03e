//! The five backends behind one private trait: what each does its own way
//! (how its memory is made, allocated, punched and mapped). Attributes,
//! views and conversion are shared by all of them and live elsewhere.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use super::error::GmemError;
use super::hugetlb::HugetlbFile;
use super::mapping::{
    PUNCH_HOLE, ask_for_huge_pages, fallocate, map_file_at, map_file_view, map_whole, populate,
    zero,
};
use super::{Backend, BackendKind, FileState, GmemConfig, GuestMemfdVm, Inner};
use crate::sys::{self, Mapping};

/// The per-backend half of a file.
pub(super) trait Storage: Send + Sync + std::fmt::Debug {
    /// The backend's kind.
    fn kind(&self) -> BackendKind;

    /// The file descriptor (none for anonymous memory).
    fn fd(&self) -> Option<&OwnedFd>;

    /// An internal read-write mapping of the whole file, where the backend
    /// keeps one (HugeTLB: it holds the reservation; secret and anonymous
    /// memory: the way to their pages).
    fn master(&self) -> Option<&Mapping> {
        None
    }

    /// The VM of a KVM guest_memfd.
    fn vm(&self) -> Option<&Arc<dyn GuestMemfdVm>> {
        None
    }

    /// A descriptor whose file operations (read, write, truncate,
    /// fallocate, mmap) the kernel answers with guest_memfd's own rules;
    /// `None` where gmem applies them.
    fn kernel_file(&self) -> Option<&OwnedFd> {
        None
    }

    /// The HugeTLB file, for what only HugeTLB does (page orders, splits).
    fn hugetlb(&self) -> Option<&HugetlbFile> {
        None
    }

    /// Allocates `[start, end)` (checked, inside the file). By default:
    /// `fallocate(KEEP_SIZE)` on the descriptor.
    fn allocate(
        &self,
        file: &Inner,
        state: &FileState,
        start: u64,
        end: u64,
    ) -> Result<(), GmemError> {
        let _ = (file, state);
        fallocate(self.descriptor(), libc::FALLOC_FL_KEEP_SIZE, start, end)
    }

    /// Punches `[start, end)` (checked, inside the file): it reads as zero.
    /// By default: `fallocate(PUNCH_HOLE)` on the descriptor.
    fn punch(
        &self,
        file: &Inner,
        state: &FileState,
        start: u64,
        end: u64,
    ) -> Result<(), GmemError> {
        let _ = (file, state);
        fallocate(self.descriptor(), PUNCH_HOLE, start, end)
    }

    /// Maps `[offset, offset + len)` of the file at the start of the fresh
    /// reservation `view` for a new view, with the caller's `map_flags`.
    /// By default: the file descriptor, shared and read-write.
    fn map_view(
        &self,
        file: &Inner,
        view: &Mapping,
        offset: u64,
        len: u64,
        map_flags: i32,
    ) -> Result<(), GmemError> {
        let _ = (file, map_flags);
        map_file_view(view, self.descriptor(), offset, len)
    }

    /// Maps the memory of `[offset, offset + len)` at `addr`: the file, the
    /// split backing of a split huge page, or the anonymous memory.
    ///
    /// # Safety
    ///
    /// `[addr, addr + len)` must lie inside a view's mapping, under the
    /// state lock.
    unsafe fn map_memory(
        &self,
        file: &Inner,
        state: &FileState,
        addr: *mut u8,
        offset: u64,
        len: u64,
    ) -> Result<(), GmemError> {
        let _ = (file, state);
        // SAFETY: guaranteed by the caller.
        unsafe { map_file_at(addr, self.descriptor(), offset, len) }
    }

    /// The descriptor of a backend that has one (every backend but
    /// anonymous memory, which maps its views its own way).
    fn descriptor(&self) -> &OwnedFd {
        self.fd()
            .expect("a backend without a descriptor maps its own views")
    }

    /// Whether a view's part past the end of the file raises SIGBUS by
    /// itself; where not, gmem maps it from the fault source.
    fn faults_past_end(&self) -> bool {
        true
    }

    /// Whether prefault must touch each page (no `MADV_POPULATE_WRITE`).
    fn populates_by_touch(&self) -> bool {
        false
    }

    /// Whether the memory's mappings ask for transparent huge pages.
    fn transparent_huge_pages(&self) -> bool {
        false
    }

    /// Where the backend's views are windows of one mapping of its memory
    /// (private anonymous memory): the address of `offset` there. `None`
    /// where each view is a mapping of its own.
    fn window(&self, offset: u64) -> Option<usize> {
        let _ = offset;
        None
    }

    /// Whether pages can be private: the host's views can hide a page the
    /// guest's view shows.
    fn holds_private_pages(&self) -> bool {
        true
    }
}

/// Whether shmem mappings should ask for transparent huge pages: the
/// host's shmem THP mode allows them.
fn shmem_thp() -> bool {
    crate::caps::ThpModes::read().is_some_and(|modes| modes.shmem_allows())
}

/// Creates the storage of `backend` for `config`.
pub(super) fn create(
    backend: &Backend,
    config: GmemConfig,
    granule: u64,
) -> Result<Box<dyn Storage>, GmemError> {
    Ok(match backend {
        Backend::Kvm(vm) => Box::new(KvmFile {
            fd: vm.create_guest_memfd(config)?,
            vm: vm.clone(),
        }),
        Backend::Memfd => {
            let fd = sys::memfd_create(c"mmukit-gmem", libc::MFD_CLOEXEC)
                .map_err(GmemError::os("memfd_create"))?;
            sys::ftruncate(&fd, config.size).map_err(GmemError::os("ftruncate"))?;
            Box::new(MemfdFile {
                fd,
                thp: shmem_thp(),
            })
        }
        Backend::Hugetlb => Box::new(HugetlbFile::create(config, granule)?),
        Backend::Secret => {
            let fd = sys::memfd_secret().map_err(|err| {
                if err.raw_os_error() == Some(libc::ENOSYS) {
                    GmemError::Unavailable {
                        backend: "secret",
                        why: "the kernel has no memfd_secret (boot with secretmem.enable=1)",
                    }
                } else {
                    GmemError::os("memfd_secret")(err)
                }
            })?;
            sys::ftruncate(&fd, config.size).map_err(GmemError::os("ftruncate"))?;
            let master = map_whole(&fd, config.size)?;
            Box::new(SecretFile { fd, master })
        }
        Backend::Anonymous => {
            // NORESERVE: like a guest_memfd, a large file is sparse and takes
            // memory only as it is used, so a 1 TiB file is created whatever
            // the commit limit says.
            let master = Mapping::new(
                config.size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                None,
                0,
            )
            .map_err(GmemError::os("mmap"))?;
            // Shared anonymous memory is shmem: its huge pages follow the
            // host's shmem THP mode.
            // SAFETY: the mapping was just made and is ours.
            let thp =
                shmem_thp() && unsafe { ask_for_huge_pages(master.addr(), config.size as usize) };
            Box::new(AnonymousMemory { master, thp })
        }
        Backend::PrivateAnonymous => Box::new(PrivateAnonymousMemory::create(config.size)?),
    })
}

/// KVM guest_memfd: the kernel answers every file operation.
#[derive(Debug)]
struct KvmFile {
    fd: OwnedFd,
    vm: Arc<dyn GuestMemfdVm>,
}

impl Storage for KvmFile {
    fn kind(&self) -> BackendKind {
        BackendKind::Kvm
    }

    fn fd(&self) -> Option<&OwnedFd> {
        Some(&self.fd)
    }

    fn vm(&self) -> Option<&Arc<dyn GuestMemfdVm>> {
        Some(&self.vm)
    }

    fn kernel_file(&self) -> Option<&OwnedFd> {
        Some(&self.fd)
    }

    fn map_view(
        &self,
        _: &Inner,
        view: &Mapping,
        offset: u64,
        len: u64,
        map_flags: i32,
    ) -> Result<(), GmemError> {
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        // SAFETY: the whole of the caller's fresh reservation; the kernel
        // applies guest_memfd's rules to the flags.
        unsafe {
            sys::map_fixed_flags(view.addr(), len as usize, prot, map_flags, &self.fd, offset)
        }
        .map_err(GmemError::os("mmap"))
    }
}

/// A memfd (shmem).
#[derive(Debug)]
struct MemfdFile {
    fd: OwnedFd,
    /// Whether its views ask for transparent huge pages.
    thp: bool,
}

impl Storage for MemfdFile {
    fn kind(&self) -> BackendKind {
        BackendKind::Memfd
    }

    fn fd(&self) -> Option<&OwnedFd> {
        Some(&self.fd)
    }

    fn map_view(
        &self,
        _: &Inner,
        view: &Mapping,
        offset: u64,
        len: u64,
        _: i32,
    ) -> Result<(), GmemError> {
        map_file_view(view, &self.fd, offset, len)?;
        if self.thp {
            // SAFETY: the view's fresh mapping, ours.
            unsafe { ask_for_huge_pages(view.addr(), len as usize) };
        }
        Ok(())
    }

    unsafe fn map_memory(
        &self,
        _: &Inner,
        _: &FileState,
        addr: *mut u8,
        offset: u64,
        len: u64,
    ) -> Result<(), GmemError> {
        // SAFETY: guaranteed by the caller.
        unsafe { map_file_at(addr, &self.fd, offset, len) }?;
        if self.thp {
            // A fixed mapping is a new VMA: ask again.
            // SAFETY: the range the caller owns, just mapped.
            unsafe { ask_for_huge_pages(addr, len as usize) };
        }
        Ok(())
    }

    fn transparent_huge_pages(&self) -> bool {
        self.thp
    }
}

/// HugeTLB: the file's own type keeps its pages and their splits.
impl Storage for HugetlbFile {
    fn kind(&self) -> BackendKind {
        BackendKind::Hugetlb
    }

    fn fd(&self) -> Option<&OwnedFd> {
        Some(HugetlbFile::fd(self))
    }

    fn master(&self) -> Option<&Mapping> {
        Some(HugetlbFile::master(self))
    }

    fn hugetlb(&self) -> Option<&HugetlbFile> {
        Some(self)
    }

    fn allocate(
        &self,
        _: &Inner,
        state: &FileState,
        start: u64,
        end: u64,
    ) -> Result<(), GmemError> {
        HugetlbFile::allocate(self, state, start, end)
    }

    fn punch(&self, _: &Inner, state: &FileState, start: u64, end: u64) -> Result<(), GmemError> {
        HugetlbFile::punch(self, state, start, end)
    }

    /// hugetlbfs grows a file that is mapped past its end: only the part
    /// inside it is mapped; the rest is left to the fault source.
    fn map_view(
        &self,
        file: &Inner,
        view: &Mapping,
        offset: u64,
        len: u64,
        _: i32,
    ) -> Result<(), GmemError> {
        let inside = len.min(file.size.saturating_sub(offset));
        map_file_view(view, HugetlbFile::fd(self), offset, inside)
    }

    unsafe fn map_memory(
        &self,
        _: &Inner,
        state: &FileState,
        addr: *mut u8,
        offset: u64,
        len: u64,
    ) -> Result<(), GmemError> {
        // SAFETY: guaranteed by the caller.
        unsafe { HugetlbFile::map_memory(self, state, addr, offset, len) }
    }

    fn faults_past_end(&self) -> bool {
        false
    }
}

/// memfd_secret: pages out of the kernel's direct map, with no hole
/// punching and no `MADV_POPULATE_WRITE`.
#[derive(Debug)]
struct SecretFile {
    fd: OwnedFd,
    master: Mapping,
}

impl Storage for SecretFile {
    fn kind(&self) -> BackendKind {
        BackendKind::Secret
    }

    fn fd(&self) -> Option<&OwnedFd> {
        Some(&self.fd)
    }

    fn master(&self) -> Option<&Mapping> {
        Some(&self.master)
    }

    fn allocate(&self, _: &Inner, _: &FileState, start: u64, end: u64) -> Result<(), GmemError> {
        crate::prefault::touch_pages(self.master.addr() as usize + start as usize, end - start);
        Ok(())
    }

    fn punch(&self, _: &Inner, _: &FileState, start: u64, end: u64) -> Result<(), GmemError> {
        zero(&self.master, start, end);
        Ok(())
    }

    fn populates_by_touch(&self) -> bool {
        true
    }
}

/// Drops the pages of `[start, end)` (inside `map`, checked by the caller)
/// with `advice`, a punch of anonymous memory.
fn drop_pages(
    map: &Mapping,
    start: u64,
    end: u64,
    advice: i32,
    name: &'static str,
) -> Result<(), GmemError> {
    // SAFETY: inside the internal mapping; dropping the pages is the point,
    // and readers go through raw pointers only.
    unsafe {
        sys::madvise(
            map.addr().add(start as usize),
            (end - start) as usize,
            advice,
        )
    }
    .map_err(GmemError::os(name))
}

/// Shared anonymous memory: views are second mappings of the same pages.
#[derive(Debug)]
struct AnonymousMemory {
    master: Mapping,
    /// Whether the memory asked for transparent huge pages.
    thp: bool,
}

impl Storage for AnonymousMemory {
    fn kind(&self) -> BackendKind {
        BackendKind::Anonymous
    }

    fn fd(&self) -> Option<&OwnedFd> {
        None
    }

    fn master(&self) -> Option<&Mapping> {
        Some(&self.master)
    }

    fn allocate(&self, _: &Inner, _: &FileState, start: u64, end: u64) -> Result<(), GmemError> {
        populate(&self.master, start, end - start)
    }

    fn punch(&self, _: &Inner, _: &FileState, start: u64, end: u64) -> Result<(), GmemError> {
        // Shmem pages dropped from the file read as zero afterwards.
        drop_pages(
            &self.master,
            start,
            end,
            libc::MADV_REMOVE,
            "madvise(MADV_REMOVE)",
        )
    }

    /// A second mapping of the same pages (mremap with an old size of 0);
    /// any part past the end is left to the fault source.
    fn map_view(
        &self,
        file: &Inner,
        view: &Mapping,
        offset: u64,
        len: u64,
        _: i32,
    ) -> Result<(), GmemError> {
        let inside = len.min(file.size.saturating_sub(offset));
        if inside == 0 {
            return Ok(());
        }
        // SAFETY: the source is the shared internal mapping; the target is
        // the start of the caller's fresh reservation.
        unsafe {
            sys::mremap_alias(
                self.master.addr().add(offset as usize),
                inside as usize,
                view.addr(),
            )
        }
        .map_err(GmemError::os("mremap"))
    }

    unsafe fn map_memory(
        &self,
        _: &Inner,
        _: &FileState,
        addr: *mut u8,
        offset: u64,
        len: u64,
    ) -> Result<(), GmemError> {
        // SAFETY: the source is the shared internal mapping; the target is
        // guaranteed by the caller.
        unsafe { sys::mremap_alias(self.master.addr().add(offset as usize), len as usize, addr) }
            .map_err(GmemError::os("mremap"))
    }

    fn faults_past_end(&self) -> bool {
        false
    }

    fn transparent_huge_pages(&self) -> bool {
        self.thp
    }
}

/// Private anonymous memory: one mapping, `MAP_PRIVATE` and asking for
/// transparent huge pages, as a VMM's plain RAM is. Views are windows of it,
/// so every view reaches the same pages; none can hide one, so every page
/// stays shared.
#[derive(Debug)]
struct PrivateAnonymousMemory {
    memory: Mapping,
    /// Whether the memory asked for transparent huge pages and the host's
    /// anonymous THP mode gives them to a mapping that asks.
    thp: bool,
}

impl PrivateAnonymousMemory {
    fn create(size: u64) -> Result<Self, GmemError> {
        // On a 2 MiB boundary, so that every aligned 2 MiB of the file can
        // be one huge page.
        let memory = Mapping::reserve_aligned(size as usize, super::THP_SIZE as usize)
            .map_err(GmemError::os("mmap"))?;
        // NORESERVE: memory is taken as it is used, as on the other
        // backends, whatever the commit limit says.
        // SAFETY: the reservation was just made and is ours; nothing uses it.
        unsafe {
            sys::map_fixed_anonymous(
                memory.addr(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            )
        }
        .map_err(GmemError::os("mmap"))?;
        let host_allows =
            crate::caps::ThpModes::read().is_some_and(|modes| modes.anonymous_allows());
        // SAFETY: the mapping was just made and is ours.
        let thp = host_allows && unsafe { ask_for_huge_pages(memory.addr(), size as usize) };
        Ok(Self { memory, thp })
    }
}

impl Storage for PrivateAnonymousMemory {
    fn kind(&self) -> BackendKind {
        BackendKind::Anonymous
    }

    fn fd(&self) -> Option<&OwnedFd> {
        None
    }

    fn master(&self) -> Option<&Mapping> {
        Some(&self.memory)
    }

    fn allocate(&self, _: &Inner, _: &FileState, start: u64, end: u64) -> Result<(), GmemError> {
        populate(&self.memory, start, end - start)
    }

    fn punch(&self, _: &Inner, _: &FileState, start: u64, end: u64) -> Result<(), GmemError> {
        // Private anonymous pages dropped read as zero afterwards.
        drop_pages(
            &self.memory,
            start,
            end,
            libc::MADV_DONTNEED,
            "madvise(MADV_DONTNEED)",
        )
    }

    fn map_view(&self, _: &Inner, _: &Mapping, _: u64, _: u64, _: i32) -> Result<(), GmemError> {
        unreachable!("views of private anonymous memory are windows, never mappings of their own")
    }

    /// Every view is a window of the memory, already mapped: a shared page
    /// is there.
    unsafe fn map_memory(
        &self,
        _: &Inner,
        _: &FileState,
        addr: *mut u8,
        offset: u64,
        _: u64,
    ) -> Result<(), GmemError> {
        debug_assert_eq!(self.window(offset), Some(addr as usize));
        Ok(())
    }

    fn transparent_huge_pages(&self) -> bool {
        self.thp
    }

    fn window(&self, offset: u64) -> Option<usize> {
        Some(self.memory.addr() as usize + offset as usize)
    }

    fn holds_private_pages(&self) -> bool {
        false
    }
}
