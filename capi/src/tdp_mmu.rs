//! The software TDP MMU (`mmukit_tdp_mmu_*`).

use split::{Gfn, Gpa, Pfn};
use std::ffi::c_int;
use std::sync::{Arc, Mutex};

use super::*;

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

/// A software TDP MMU (opaque).
pub struct mmukit_tdp_mmu {
    pub(crate) mmu: TdpMmu,
    pub(crate) caches: Mutex<VcpuCaches>,
}

pub(crate) fn mmu_errno(err: &MmuError) -> c_int {
    match err {
        MmuError::NoSlot { .. } => -libc::ENOENT,
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
) -> Result<mmukit_tdp_mmu, c_int> {
    let config = MmuConfig {
        levels,
        eager_split,
        ..MmuConfig::default()
    };
    let pool = PagePool::new(ChunkAllocator::anonymous());
    let mmu = match hooks {
        Some(mirror) => TdpMmu::with_hooks(pool, config, mirror),
        None => TdpMmu::new(pool, config),
    }
    .map_err(|err| mmu_errno(&err))?;
    let caches = Mutex::new(mmu.new_vcpu_caches());
    Ok(mmukit_tdp_mmu { mmu, caches })
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
        match new_mmu(levels, eager_split, None) {
            Ok(mmu) => {
                // SAFETY: checked non-null and aligned.
                unsafe { *out = Box::into_raw(Box::new(mmu)) };
                0
            }
            Err(errno) => errno,
        }
    })
}

/// Adds memslot `slot`: `npages` guest frames from `base_gfn` on host frames
/// from `host_base_pfn`.
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
    with_handle(mmu, |m| {
        match Memslot::new(slot, Gfn(base_gfn), npages, Pfn(host_base_pfn)) {
            Ok(memslot) => match m.mmu.add_memslot(memslot) {
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
        match m.mmu.fault(&mut caches, Gpa(gpa), write) {
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
