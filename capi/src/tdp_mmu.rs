//! The software TDP MMU (`mmukit_tdp_mmu_*`).

use std::ffi::c_int;
use std::sync::{Arc, Mutex, RwLock};

use mmu_cache::PagePool;
use mmu_cache::alloc::ChunkAllocator;
use mmukit_private::PrivateMemoryVm;
use split::{
    Access, Gfn, Gpa, Level, LogMode, MemoryAttribute, Memslot, MmuConfig, MmuError, Pfn, TdpMmu,
    VcpuCaches, VmType,
};
use tdx_ext::TdxMirror;

use crate::guest_memory::{gmem_errno, mmukit_gmem};
use crate::{cache_errno, guard, with_handle};
use split::AccessKind;

/// Leaf counts.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct mmukit_mmu_stats {
    /// 4K leaves.
    pub pages_4k: u64,
    /// 2M leaves.
    pub pages_2m: u64,
    /// 1G leaves.
    pub pages_1g: u64,
}

/// VM type: every frame shared (`KVM_X86_DEFAULT_VM`).
pub const MMUKIT_VM_DEFAULT: u32 = 0;
/// VM type: per-frame memory attributes and private memory
/// (`KVM_X86_SW_PROTECTED_VM`).
pub const MMUKIT_VM_SW_PROTECTED: u32 = 1;

/// `KVM_MEMORY_ATTRIBUTE_PRIVATE`: the attribute bit of private memory.
pub const MMUKIT_MEMORY_ATTRIBUTE_PRIVATE: u64 = 1 << 3;
/// `KVM_MEMORY_EXIT_FLAG_PRIVATE`: a memory fault of a private access.
pub const MMUKIT_MEMORY_EXIT_FLAG_PRIVATE: u64 = 1 << 3;

/// Access kind: what the VM type says (a TD: the GPA's shared bit; a
/// software-protected VM: the frame's attribute; otherwise shared).
pub const MMUKIT_ACCESS_AUTO: u32 = 0;
/// Access kind: shared, as the hardware flags it.
pub const MMUKIT_ACCESS_SHARED: u32 = 1;
/// Access kind: private (`PFERR_PRIVATE_ACCESS`).
pub const MMUKIT_ACCESS_PRIVATE: u32 = 2;

/// A memory-fault exit, as `kvm_run.memory_fault`: the access's kind
/// differs from the memory's attribute (or a private access found no
/// private memory). Convert the range and access again.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct mmukit_memory_fault {
    /// `MMUKIT_MEMORY_EXIT_FLAG_PRIVATE` for a private access, else 0.
    pub flags: u64,
    /// The faulting page (`gfn_to_gpa(fault->gfn)`, as the kernel's
    /// `kvm_mmu_prepare_memory_fault_exit()` reports it): page-aligned,
    /// and on a TD without the shared bit.
    pub gpa: u64,
    /// The size of the range to convert: one page.
    pub size: u64,
}

/// A software TDP MMU (opaque). Faults, accesses and attribute changes may
/// come from several threads at once; the handle serializes its one
/// built-in vCPU context.
pub struct mmukit_tdp_mmu {
    pub(crate) mmu: Arc<TdpMmu>,
    pub(crate) caches: Mutex<VcpuCaches>,
    pub(crate) private: RwLock<PrivateMemoryVm>,
}

pub(crate) fn mmu_errno(err: &MmuError) -> c_int {
    match err {
        MmuError::NoSlot { .. } => -libc::ENOENT,
        MmuError::MemoryFault { .. } | MmuError::PrivateMemory { .. } => -libc::EFAULT,
        MmuError::Cache(cache) => cache_errno(cache),
        MmuError::Hook(split::HookError::Busy { .. }) => -libc::EBUSY,
        MmuError::Hook(_) => -libc::EIO,
        _ => -libc::EINVAL,
    }
}

pub(crate) fn new_mmu(
    levels: u8,
    eager_split: bool,
    hooks: Option<Arc<TdxMirror>>,
    vm_type: VmType,
) -> Result<mmukit_tdp_mmu, c_int> {
    let config = MmuConfig {
        levels,
        eager_split,
        vm_type,
        ..MmuConfig::default()
    };
    let pool = PagePool::new(ChunkAllocator::anonymous());
    let mmu = match hooks {
        Some(mirror) => TdpMmu::with_hooks(pool, config, mirror),
        None => TdpMmu::new(pool, config),
    }
    .map_err(|err| mmu_errno(&err))?;
    let mmu = Arc::new(mmu);
    let caches = Mutex::new(mmu.new_vcpu_caches());
    let private = RwLock::new(PrivateMemoryVm::new(mmu.clone()));
    Ok(mmukit_tdp_mmu {
        mmu,
        caches,
        private,
    })
}

/// Creates a software TDP MMU with `levels` (4 or 5) levels.
///
/// # Safety
///
/// `out` must be a valid, aligned pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmukit_tdp_mmu_new(
    levels: u8,
    eager_split: bool,
    out: *mut *mut mmukit_tdp_mmu,
) -> c_int {
    guard(|| {
        if out.is_null() || !out.is_aligned() {
            return -libc::EINVAL;
        }
        match new_mmu(levels, eager_split, None, VmType::Default) {
            Ok(mmu) => {
                // SAFETY: checked non-null and aligned.
                unsafe { *out = Box::into_raw(Box::new(mmu)) };
                0
            }
            Err(errno) => errno,
        }
    })
}

/// Creates a software TDP MMU for a VM of `vm_type` (`MMUKIT_VM_*`): a
/// software-protected VM has memory attributes and private memory.
///
/// # Safety
///
/// `out` must be a valid, aligned pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmukit_tdp_mmu_new_vm(
    levels: u8,
    eager_split: bool,
    vm_type: u32,
    out: *mut *mut mmukit_tdp_mmu,
) -> c_int {
    guard(|| {
        if out.is_null() || !out.is_aligned() {
            return -libc::EINVAL;
        }
        let vm_type = match vm_type {
            MMUKIT_VM_DEFAULT => VmType::Default,
            MMUKIT_VM_SW_PROTECTED => VmType::SoftwareProtected,
            _ => return -libc::EINVAL,
        };
        match new_mmu(levels, eager_split, None, vm_type) {
            Ok(mmu) => {
                // SAFETY: checked non-null and aligned.
                unsafe { *out = Box::into_raw(Box::new(mmu)) };
                0
            }
            Err(errno) => errno,
        }
    })
}

/// Adds memslot `slot` with private memory: shared accesses map host frames
/// from `host_base_pfn`, private ones the pages of `file` from `offset`
/// (`KVM_SET_USER_MEMORY_REGION2` with a guest_memfd). The MMU keeps its
/// own reference to the file, so `file` may be destroyed first (-EINVAL for
/// a bad range, -EEXIST for an overlap).
///
/// # Safety
///
/// `mmu` and `file` must be live handles.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmukit_tdp_mmu_add_private_slot(
    mmu: *mut mmukit_tdp_mmu,
    slot: u32,
    base_gfn: u64,
    npages: u64,
    host_base_pfn: u64,
    file: *const mmukit_gmem,
    offset: u64,
) -> c_int {
    with_handle(mmu, |m| {
        with_handle(file, |g| {
            let Ok(memslot) = Memslot::new(slot, Gfn(base_gfn), npages, Pfn(host_base_pfn)) else {
                return -libc::EINVAL;
            };
            let mut private = m.private.write().unwrap_or_else(|p| p.into_inner());
            match private.bind(memslot, &g.file, offset) {
                Ok(_) => 0,
                Err(mmukit_private::PrivateError::Mmu(MmuError::Memslot(_))) => -libc::EEXIST,
                Err(mmukit_private::PrivateError::File(err)) => gmem_errno(&err),
                Err(_) => -libc::EINVAL,
            }
        })
    })
}

/// `KVM_SET_MEMORY_ATTRIBUTES`: makes `npages` frames from `start_gfn`
/// private (`MMUKIT_MEMORY_ATTRIBUTE_PRIVATE`) or shared (0). Their old
/// mappings are zapped first (a TD's private huge leaf split at the edges),
/// and the bound guest memory files convert too (splitting or merging
/// HugeTLB pages). Attributes a range already has change nothing (0 on a
/// VM without private memory included). -EINVAL for unknown bits, an empty
/// or too wide range, or the private bit on a VM without private memory.
///
/// # Safety
///
/// `mmu` must be a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmukit_tdp_mmu_set_memory_attributes(
    mmu: *mut mmukit_tdp_mmu,
    start_gfn: u64,
    npages: u64,
    attributes: u64,
) -> c_int {
    with_handle(mmu, |m| {
        let attribute = match attributes {
            0 => MemoryAttribute::Shared,
            MMUKIT_MEMORY_ATTRIBUTE_PRIVATE => MemoryAttribute::Private,
            _ => return -libc::EINVAL,
        };
        let Some(end) = start_gfn.checked_add(npages) else {
            return -libc::EINVAL;
        };
        let private = m.private.read().unwrap_or_else(|p| p.into_inner());
        match private.convert(Gfn(start_gfn), Gfn(end), attribute) {
            Ok(_) => 0,
            Err(mmukit_private::PrivateError::Mmu(err)) => mmu_errno(&err),
            Err(mmukit_private::PrivateError::File(err)) => gmem_errno(&err),
            Err(_) => -libc::EINVAL,
        }
    })
}

/// A software vCPU's access at `gpa` of `kind` (`MMUKIT_ACCESS_*`): the
/// hardware walk, and a fault on a miss. 0 with `*hpa` set; -EFAULT with
/// `*fault` set (when not NULL) for a memory-fault exit: convert the range
/// with `mmukit_tdp_mmu_set_memory_attributes` and access again.
///
/// # Safety
///
/// `mmu` must be a live handle; `hpa` a valid, aligned pointer; `fault`
/// NULL or a valid, aligned pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmukit_tdp_mmu_access(
    mmu: *mut mmukit_tdp_mmu,
    gpa: u64,
    write: bool,
    kind: u32,
    hpa: *mut u64,
    fault: *mut mmukit_memory_fault,
) -> c_int {
    with_handle(mmu, |m| {
        if hpa.is_null() || !hpa.is_aligned() || (!fault.is_null() && !fault.is_aligned()) {
            return -libc::EINVAL;
        }
        let attribute = match kind {
            MMUKIT_ACCESS_AUTO => None,
            MMUKIT_ACCESS_SHARED => Some(MemoryAttribute::Shared),
            MMUKIT_ACCESS_PRIVATE => Some(MemoryAttribute::Private),
            _ => return -libc::EINVAL,
        };
        let access = AccessKind::data(write);
        let mut caches = m.caches.lock().unwrap_or_else(|p| p.into_inner());
        let result = match m.mmu.access(&mut caches, Gpa(gpa), access) {
            Access::Hit(found) => Ok(found),
            Access::Miss => match attribute {
                None => m.mmu.fault(&mut caches, Gpa(gpa), access),
                Some(attribute) => m.mmu.fault_as(&mut caches, Gpa(gpa), access, attribute),
            }
            .map(|t| t.hpa),
        };
        match result {
            Ok(found) => {
                // SAFETY: checked non-null and aligned.
                unsafe { *hpa = found.0 };
                0
            }
            Err(MmuError::MemoryFault { gpa, size, private }) => {
                if !fault.is_null() {
                    // SAFETY: checked non-null and aligned.
                    unsafe {
                        *fault = mmukit_memory_fault {
                            flags: if private {
                                MMUKIT_MEMORY_EXIT_FLAG_PRIVATE
                            } else {
                                0
                            },
                            gpa: gpa.0,
                            size,
                        }
                    };
                }
                -libc::EFAULT
            }
            Err(err) => mmu_errno(&err),
        }
    })
}

/// Adds memslot `slot`: `npages` guest frames from `base_gfn` on host frames
/// from `host_base_pfn`, with leaves up to 1G wherever the frames align
/// (no bound from the host's pages: see
/// [`mmukit_tdp_mmu_add_slot_on_host_pages`]).
///
/// # Safety
///
/// `mmu` must be a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmukit_tdp_mmu_add_slot(
    mmu: *mut mmukit_tdp_mmu,
    slot: u32,
    base_gfn: u64,
    npages: u64,
    host_base_pfn: u64,
) -> c_int {
    // SAFETY: forwarded from the caller; pages of any size.
    unsafe {
        mmukit_tdp_mmu_add_slot_on_host_pages(
            mmu,
            slot,
            base_gfn,
            npages,
            host_base_pfn,
            Level::L1G.entry_bytes(),
        )
    }
}

/// Adds memslot `slot` as [`mmukit_tdp_mmu_add_slot`] does, on host memory
/// mapped with pages of `host_page_size` bytes (4096; 2 MiB for
/// transparent huge pages or 2 MiB HugeTLB pages; 1 GiB for 1 GiB HugeTLB
/// pages): no leaf of the slot is larger, as KVM bounds a leaf by the host's
/// mapping. Another size is -EINVAL.
///
/// # Safety
///
/// `mmu` must be a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmukit_tdp_mmu_add_slot_on_host_pages(
    mmu: *mut mmukit_tdp_mmu,
    slot: u32,
    base_gfn: u64,
    npages: u64,
    host_base_pfn: u64,
    host_page_size: u64,
) -> c_int {
    let Some(level) = Level::of_page_size(host_page_size) else {
        return -libc::EINVAL;
    };
    with_handle(mmu, |m| {
        match Memslot::new(slot, Gfn(base_gfn), npages, Pfn(host_base_pfn)) {
            Ok(memslot) => match m.mmu.add_memslot(memslot.with_host_page_level(level)) {
                Ok(_) => 0,
                Err(_) => -libc::EEXIST,
            },
            Err(_) => -libc::EINVAL,
        }
    })
}

/// Handles a fault at `gpa` (-ENOENT when no slot holds it).
///
/// # Safety
///
/// `mmu` must be a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmukit_tdp_mmu_fault(
    mmu: *mut mmukit_tdp_mmu,
    gpa: u64,
    write: bool,
) -> c_int {
    with_handle(mmu, |m| {
        let mut caches = m.caches.lock().unwrap_or_else(|p| p.into_inner());
        match m.mmu.fault(&mut caches, Gpa(gpa), AccessKind::data(write)) {
            Ok(_) => 0,
            Err(err) => mmu_errno(&err),
        }
    })
}

/// Translates `gpa`: `*hpa` and `*level` (1 = 4K); -ENOENT when unmapped.
///
/// # Safety
///
/// `mmu` must be a live handle; `hpa` and `level` valid, aligned pointers.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmukit_tdp_mmu_translate(
    mmu: *const mmukit_tdp_mmu,
    gpa: u64,
    hpa: *mut u64,
    level: *mut u8,
) -> c_int {
    with_handle(mmu, |m| {
        if hpa.is_null() || level.is_null() || !hpa.is_aligned() {
            return -libc::EINVAL;
        }
        match m.mmu.translate(Gpa(gpa)) {
            Some(t) => {
                // SAFETY: checked non-null and aligned.
                unsafe {
                    *hpa = t.hpa.0;
                    *level = t.level.get();
                }
                0
            }
            None => -libc::ENOENT,
        }
    })
}

/// Starts classic dirty logging on `slot` (eager split when configured).
///
/// # Safety
///
/// `mmu` must be a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmukit_tdp_mmu_enable_dirty_log(
    mmu: *mut mmukit_tdp_mmu,
    slot: u32,
) -> c_int {
    with_handle(mmu, |m| {
        match m.mmu.enable_dirty_logging(slot, LogMode::Classic) {
            Ok(()) => 0,
            Err(err) => mmu_errno(&err),
        }
    })
}

/// Copies and clears the dirty log of `slot` into `bitmap` (`words` 64-bit
/// words; -EINVAL when too few for the slot).
///
/// # Safety
///
/// `mmu` must be a live handle; `bitmap` valid for `words` aligned words.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmukit_tdp_mmu_get_dirty_log(
    mmu: *mut mmukit_tdp_mmu,
    slot: u32,
    bitmap: *mut u64,
    words: usize,
) -> c_int {
    with_handle(mmu, |m| {
        if bitmap.is_null() || !bitmap.is_aligned() {
            return -libc::EINVAL;
        }
        let Ok(memslot) = m.mmu.slot(slot) else {
            return -libc::ENOENT;
        };
        if words < memslot.npages().div_ceil(64) as usize {
            return -libc::EINVAL;
        }
        match m.mmu.get_dirty_log(slot) {
            Ok(log) => {
                // SAFETY: the caller gave `words` valid words; log.len() <= words.
                unsafe { std::ptr::copy_nonoverlapping(log.as_ptr(), bitmap, log.len()) };
                0
            }
            Err(err) => mmu_errno(&err),
        }
    })
}

/// Splits every huge leaf of `slot` down to 4K; returns the number of
/// splits (>= 0) or a negative errno.
///
/// # Safety
///
/// `mmu` must be a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmukit_tdp_mmu_split(mmu: *mut mmukit_tdp_mmu, slot: u32) -> c_int {
    with_handle(mmu, |m| {
        let Ok(memslot) = m.mmu.slot(slot) else {
            return -libc::ENOENT;
        };
        match m
            .mmu
            .split_huge_pages(memslot.base_gfn(), memslot.end_gfn(), Level::L4K)
        {
            Ok(splits) => splits.min(i32::MAX as u64) as c_int,
            Err(err) => mmu_errno(&err),
        }
    })
}

/// Leaf counts.
///
/// # Safety
///
/// `mmu` must be a live handle; `stats` a valid, aligned pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmukit_tdp_mmu_stats(
    mmu: *const mmukit_tdp_mmu,
    stats: *mut mmukit_mmu_stats,
) -> c_int {
    with_handle(mmu, |m| {
        if stats.is_null() || !stats.is_aligned() {
            return -libc::EINVAL;
        }
        let s = m.mmu.page_stats();
        // SAFETY: checked non-null and aligned.
        unsafe {
            *stats = mmukit_mmu_stats {
                pages_4k: s.pages_4k,
                pages_2m: s.pages_2m,
                pages_1g: s.pages_1g,
            }
        };
        0
    })
}

/// Destroys the MMU.
///
/// # Safety
///
/// `mmu` must be a live handle or NULL; it is invalid afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmukit_tdp_mmu_destroy(mmu: *mut mmukit_tdp_mmu) {
    guard(|| {
        if !mmu.is_null() && mmu.is_aligned() {
            // SAFETY: a handle from mmukit_tdp_mmu_new, destroyed once.
            drop(unsafe { Box::from_raw(mmu) });
        }
        0
    });
}
