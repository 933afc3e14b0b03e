//! Guest memory files (`mmukit_gmem_*`).

use std::ffi::c_int;
use std::sync::{Arc, Mutex};

use gmem::{
    Attribute, Backend, Capability, GmemConfig, GmemError, GuestMemFile, HostCaps, KvmVm, View,
};

use crate::{guard, read_config, with_handle};

/// Backend: shared anonymous memory (shmem: its views alias its pages, so
/// pages can be private).
pub const MMUKIT_GMEM_ANONYMOUS: u32 = 0;
/// Backend: memfd.
pub const MMUKIT_GMEM_MEMFD: u32 = 1;
/// Backend: HugeTLB memfd (`huge_page_size_log2` 21 or 30).
pub const MMUKIT_GMEM_HUGETLB: u32 = 2;
/// Backend: memfd_secret.
pub const MMUKIT_GMEM_SECRET: u32 = 3;
/// Backend: KVM guest_memfd (on a VM the library creates, or on the
/// caller's with `mmukit_gmem_create_on_vm`).
pub const MMUKIT_GMEM_GUEST_MEMFD: u32 = 4;
/// Backend: private anonymous memory asking for transparent huge pages (a
/// VMM's plain RAM: 2 MiB pages under the host's default `madvise` THP
/// mode). Its pages stay shared: a conversion to private, or a file without
/// `INIT_SHARED`, is -EOPNOTSUPP.
pub const MMUKIT_GMEM_PRIVATE_ANONYMOUS: u32 = 5;

/// Host capability: a usable `/dev/kvm`.
pub const MMUKIT_CAP_KVM: u32 = 0;
/// Host capability: `KVM_CAP_GUEST_MEMFD`.
pub const MMUKIT_CAP_GUEST_MEMFD: u32 = 1;
/// Host capability: guest_memfd with `MMAP | INIT_SHARED` (memory the host
/// maps, shared from the start).
pub const MMUKIT_CAP_GUEST_MEMFD_MMAP: u32 = 2;
/// Host capability: `KVM_CAP_MEMORY_ATTRIBUTES` with the private bit.
pub const MMUKIT_CAP_MEMORY_ATTRIBUTES: u32 = 3;
/// Host capability: software-protected VMs (`KVM_CAP_VM_TYPES`).
pub const MMUKIT_CAP_SW_PROTECTED_VM: u32 = 4;
/// Host capability: `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`.
pub const MMUKIT_CAP_MANUAL_DIRTY_LOG_PROTECT: u32 = 5;
/// Host capability: `KVM_CAP_DIRTY_LOG_RING`.
pub const MMUKIT_CAP_DIRTY_LOG_RING: u32 = 6;
/// Host capability: a 2 MiB HugeTLB pool with pages reserved.
pub const MMUKIT_CAP_HUGETLB_2M: u32 = 7;
/// Host capability: a 1 GiB HugeTLB pool with pages reserved.
pub const MMUKIT_CAP_HUGETLB_1G: u32 = 8;
/// Host capability: `memfd_secret(2)`.
pub const MMUKIT_CAP_MEMFD_SECRET: u32 = 9;
/// Host capability: transparent huge pages for shmem.
pub const MMUKIT_CAP_SHMEM_THP: u32 = 10;
/// Host capability: transparent huge pages for private anonymous memory
/// that asks (`transparent_hugepage/enabled` is `always` or `madvise`).
pub const MMUKIT_CAP_ANONYMOUS_THP: u32 = 11;
/// Host capability: `userfaultfd(2)` with `UFFDIO_COPY`, so a HugeTLB
/// split fills its new pages in one pass instead of clearing them first.
pub const MMUKIT_CAP_USERFAULTFD: u32 = 12;

/// Whether this host offers `capability` (one of `MMUKIT_CAP_*`): 1 when
/// it does, 0 when it does not (or `MMUKIT_HIDE_CAPS` hides it), -EINVAL
/// for an unknown number. The host is probed once per process; ask here
/// rather than guess from an errno.
#[unsafe(no_mangle)]
pub extern "C" fn mmukit_host_has(capability: u32) -> c_int {
    guard(|| match Capability::ALL.get(capability as usize) {
        Some(&cap) => c_int::from(HostCaps::get().has(cap)),
        None => -libc::EINVAL,
    })
}

/// How a guest memory file is made. Set `struct_size` to
/// `sizeof(struct mmukit_gmem_config)`: the struct may grow at its end.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct mmukit_gmem_config {
    /// `sizeof(struct mmukit_gmem_config)` as the caller compiled it.
    pub struct_size: u32,
    /// One of `MMUKIT_GMEM_*`.
    pub backend: u32,
    /// Size in bytes.
    pub size: u64,
    /// `GUEST_MEMFD_FLAG_*` bits (MMAP = 1, INIT_SHARED = 2, NO_DIRECT_MAP = 4).
    pub flags: u64,
    /// HugeTLB page size as log2; 0 for other backends.
    pub huge_page_size_log2: u8,
}

/// A guest memory file (opaque).
pub struct mmukit_gmem {
    pub(crate) file: GuestMemFile,
    view: Mutex<Option<View>>,
    /// The VM the file is bound on (and, for guest_memfd, made on).
    vm: Option<Arc<KvmVm>>,
}

pub(crate) fn gmem_errno(err: &GmemError) -> c_int {
    match err {
        GmemError::Unavailable { .. } => -libc::ENOTSUP,
        other => -other.errno(),
    }
}

/// Creates a guest memory file; `*out` receives the handle. A guest_memfd
/// is made on a VM the library creates, which the caller cannot reach; use
/// `mmukit_gmem_create_on_vm` to make and bind it on the caller's VM.
///
/// # Safety
///
/// `config` and `out` must be valid pointers (or NULL: -EINVAL).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmukit_gmem_create(
    config: *const mmukit_gmem_config,
    out: *mut *mut mmukit_gmem,
) -> c_int {
    guard(|| {
        if config.is_null() || !config.is_aligned() {
            return -libc::EINVAL;
        }
        // SAFETY: checked non-null and aligned; the caller's struct holds
        // `struct_size` bytes.
        let config = match unsafe { read_config(config) } {
            Ok(config) => config,
            Err(errno) => return errno,
        };
        let vm = if config.backend == MMUKIT_GMEM_GUEST_MEMFD {
            match KvmVm::new() {
                Ok(vm) => Some(vm),
                Err(_) => return -libc::ENOTSUP,
            }
        } else {
            None
        };
        // SAFETY: `out` as the caller guarantees.
        unsafe { create(config, vm, out) }
    })
}

/// Creates a guest memory file for the caller's VM `vm_fd` (of KVM type
/// `vm_type`, `KVM_CREATE_VM`'s argument): a guest_memfd is made on that
/// VM, and `mmukit_gmem_bind` binds the file as a memslot of it, with
/// gmem's checks (guest_memfd is per VM: a file made on another VM cannot
/// be bound). The library duplicates `vm_fd`; the caller keeps its own.
/// -EINVAL when `vm_fd` is not a KVM VM.
///
/// # Safety
///
/// `config` and `out` must be valid pointers (or NULL: -EINVAL).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmukit_gmem_create_on_vm(
    vm_fd: c_int,
    vm_type: u64,
    config: *const mmukit_gmem_config,
    out: *mut *mut mmukit_gmem,
) -> c_int {
    guard(|| {
        if config.is_null() || !config.is_aligned() || vm_fd < 0 {
            return -libc::EINVAL;
        }
        // SAFETY: checked non-null and aligned; the caller's struct holds
        // `struct_size` bytes.
        let config = match unsafe { read_config(config) } {
            Ok(config) => config,
            Err(errno) => return errno,
        };
        // SAFETY: the caller's open descriptor, borrowed for this call only
        // (the VM keeps a duplicate).
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(vm_fd) };
        let vm = match KvmVm::from_vm_fd(borrowed, vm_type) {
            Ok(vm) => vm,
            Err(err) => return -err.errno(),
        };
        // SAFETY: `out` as the caller guarantees.
        unsafe { create(config, Some(vm), out) }
    })
}

/// Makes the file on `vm` (when a guest_memfd) and the handle.
///
/// # Safety
///
/// `out` must be NULL or a valid pointer (checked for NULL and alignment).
unsafe fn create(
    config: mmukit_gmem_config,
    vm: Option<Arc<KvmVm>>,
    out: *mut *mut mmukit_gmem,
) -> c_int {
    if out.is_null() || !out.is_aligned() {
        return -libc::EINVAL;
    }
    let backend = match config.backend {
        MMUKIT_GMEM_ANONYMOUS => Backend::Anonymous,
        MMUKIT_GMEM_PRIVATE_ANONYMOUS => Backend::PrivateAnonymous,
        MMUKIT_GMEM_MEMFD => Backend::Memfd,
        MMUKIT_GMEM_HUGETLB => Backend::Hugetlb,
        MMUKIT_GMEM_SECRET => Backend::Secret,
        MMUKIT_GMEM_GUEST_MEMFD => match &vm {
            Some(vm) => Backend::Kvm(vm.clone()),
            None => return -libc::ENOTSUP,
        },
        _ => return -libc::EINVAL,
    };
    match GuestMemFile::create(
        &backend,
        GmemConfig {
            size: config.size,
            flags: config.flags,
            huge_page_size_log2: config.huge_page_size_log2,
        },
    ) {
        Ok(file) => {
            let handle = Box::new(mmukit_gmem {
                file,
                view: Mutex::new(None),
                vm,
            });
            // SAFETY: checked non-null and aligned.
            unsafe { *out = Box::into_raw(handle) };
            0
        }
        Err(err) => gmem_errno(&err),
    }
}

/// Binds `[file_offset, file_offset + size)` of the file as memslot `slot`
/// at `guest_addr` of its VM (`KVM_SET_USER_MEMORY_REGION2`; a guest_memfd
/// with `KVM_MEM_GUEST_MEMFD` and its own mapping as the userspace
/// address), after gmem's checks, which answer with the kernel's errno.
/// `flags` takes `KVM_MEM_LOG_DIRTY_PAGES` (1) and `KVM_MEM_READONLY` (2).
/// -ENOTSUP for a file with no VM (made by `mmukit_gmem_create` on a
/// backend other than guest_memfd).
///
/// # Safety
///
/// `gmem` must be a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmukit_gmem_bind(
    gmem: *mut mmukit_gmem,
    slot: u32,
    guest_addr: u64,
    size: u64,
    file_offset: u64,
    flags: u32,
) -> c_int {
    with_handle(gmem, |g| {
        let Some(vm) = &g.vm else {
            return -libc::ENOTSUP;
        };
        let region = match gmem::GuestRegion::new(
            &g.file,
            file_offset,
            size,
            guest_addr,
            gmem::DirtyTracking::Off,
        ) {
            Ok(region) => Arc::new(region),
            Err(gmem::RegionError::File(err)) => return gmem_errno(&err),
            Err(_) => return -libc::EINVAL,
        };
        match vm.bind(slot, region, flags) {
            Ok(()) => 0,
            Err(err) => -err.errno(),
        }
    })
}

/// Deletes memslot `slot` that `mmukit_gmem_bind` made.
///
/// # Safety
///
/// `gmem` must be a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmukit_gmem_unbind(gmem: *mut mmukit_gmem, slot: u32) -> c_int {
    with_handle(gmem, |g| match &g.vm {
        Some(vm) => match vm.unbind(slot) {
            Ok(_) => 0,
            Err(err) => -err.errno(),
        },
        None => -libc::ENOTSUP,
    })
}

/// `fallocate(2)` with guest_memfd's rules (`mode` takes FALLOC_FL_* bits).
///
/// # Safety
///
/// `gmem` must be a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmukit_gmem_fallocate(
    gmem: *mut mmukit_gmem,
    mode: c_int,
    offset: u64,
    len: u64,
) -> c_int {
    with_handle(gmem, |g| match g.file.fallocate(mode, offset, len) {
        Ok(()) => 0,
        Err(err) => gmem_errno(&err),
    })
}

/// Converts `[offset, offset + len)` to private (host views fault) or shared.
///
/// # Safety
///
/// `gmem` must be a live handle; no access may race with the conversion.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmukit_gmem_convert(
    gmem: *mut mmukit_gmem,
    offset: u64,
    len: u64,
    to_private: bool,
) -> c_int {
    let to = if to_private {
        Attribute::Private
    } else {
        Attribute::Shared
    };
    with_handle(gmem, |g| match g.file.convert(offset, len, to) {
        Ok(_) => 0,
        Err(err) => gmem_errno(&err),
    })
}

/// The file descriptor (owned by the handle), or -ENOTSUP for anonymous memory.
///
/// # Safety
///
/// `gmem` must be a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmukit_gmem_fd(gmem: *const mmukit_gmem) -> c_int {
    with_handle(gmem, |g| match g.file.fd() {
        Some(fd) => std::os::fd::AsRawFd::as_raw_fd(fd),
        None => -libc::ENOTSUP,
    })
}

/// The address of a host view of the whole file (made at the first call,
/// unmapped by destroy); private pages in it fault.
///
/// # Safety
///
/// `gmem` must be a live handle; `addr_out` a valid, aligned pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmukit_gmem_host_addr(
    gmem: *mut mmukit_gmem,
    addr_out: *mut u64,
) -> c_int {
    with_handle(gmem, |g| {
        if addr_out.is_null() || !addr_out.is_aligned() {
            return -libc::EINVAL;
        }
        let mut view = g.view.lock().unwrap_or_else(|p| p.into_inner());
        if view.is_none() {
            match g.file.map(0, g.file.size()) {
                Ok(mapped) => *view = Some(mapped),
                Err(err) => return gmem_errno(&err),
            }
        }
        // SAFETY: checked non-null and aligned.
        unsafe { *addr_out = view.as_ref().expect("mapped above").as_ptr() as u64 };
        0
    })
}

/// Populates the whole file with `threads` threads.
///
/// # Safety
///
/// `gmem` must be a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmukit_gmem_prefault(gmem: *mut mmukit_gmem, threads: u32) -> c_int {
    with_handle(gmem, |g| {
        match g
            .file
            .prefault(0, g.file.size(), threads as usize, &|_, _| {})
        {
            Ok(_) => 0,
            Err(err) => gmem_errno(&err),
        }
    })
}

/// Destroys the file and its view.
///
/// # Safety
///
/// `gmem` must be a live handle or NULL; it is invalid afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmukit_gmem_destroy(gmem: *mut mmukit_gmem) {
    guard(|| {
        if !gmem.is_null() && gmem.is_aligned() {
            // SAFETY: a handle from mmukit_gmem_create, destroyed once.
            drop(unsafe { Box::from_raw(gmem) });
        }
        0
    });
}
