//! The software TDP MMU over the TDX mirror and module (`mmukit_tdx_*`).

use std::ffi::c_int;
use std::sync::Arc;

use tdx_ext::pamt::PamtPolicy;
use tdx_ext::{Seamcall, SimTdxModule, TdxMirror};

use crate::guard;
use crate::tdp_mmu::{mmukit_tdp_mmu, new_mmu};

/// PAMT policy: PAMT for S-EPT pages just before they go to the module.
pub const MMUKIT_PAMT_ON_INSTALL: u32 = 0;
/// PAMT policy: PAMT for S-EPT pages when they enter the MMU's cache.
pub const MMUKIT_PAMT_ON_CACHE_ENTRY: u32 = 1;

/// A TD: a mirror TDP MMU over the software TDX module (opaque).
pub struct mmukit_tdx {
    mmu: mmukit_tdp_mmu,
    module: Arc<SimTdxModule>,
    mirror: Arc<TdxMirror>,
}

/// Creates a finalized TD with `levels`-level S-EPT and a PAMT policy
/// (`MMUKIT_PAMT_*`). Every access maps the slots' host frames through the
/// mirror and the S-EPT; see [`mmukit_tdx_new_private`] for a TD with
/// shared and private memory.
///
/// # Safety
///
/// `out` must be a valid, aligned pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmukit_tdx_new(
    levels: u8,
    pamt_policy: u32,
    out: *mut *mut mmukit_tdx,
) -> c_int {
    // SAFETY: `out` as the caller guarantees.
    unsafe { new_td(levels, pamt_policy, false, out) }
}

/// Creates a finalized TD with private memory: an access whose GPA has the
/// shared bit (47 with 4 levels, 51 with 5) is shared and maps the slot's
/// host frames in a shared tree the module never sees; any other is
/// private and maps the slot's guest memory file (see
/// `mmukit_tdp_mmu_add_private_slot`) through the mirror and the S-EPT.
/// Memory attributes start shared: make memory private with
/// `mmukit_tdp_mmu_set_memory_attributes`.
///
/// # Safety
///
/// `out` must be a valid, aligned pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmukit_tdx_new_private(
    levels: u8,
    pamt_policy: u32,
    out: *mut *mut mmukit_tdx,
) -> c_int {
    // SAFETY: `out` as the caller guarantees.
    unsafe { new_td(levels, pamt_policy, true, out) }
}

/// # Safety
///
/// `out` must be NULL or a valid pointer (checked for NULL and alignment).
unsafe fn new_td(
    levels: u8,
    pamt_policy: u32,
    private_memory: bool,
    out: *mut *mut mmukit_tdx,
) -> c_int {
    guard(|| {
        if out.is_null() || !out.is_aligned() || !(4..=5).contains(&levels) {
            return -libc::EINVAL;
        }
        let policy = match pamt_policy {
            MMUKIT_PAMT_ON_INSTALL => PamtPolicy::OnInstall,
            MMUKIT_PAMT_ON_CACHE_ENTRY => PamtPolicy::OnCacheEntry,
            _ => return -libc::EINVAL,
        };
        let Ok((module, mirror)) = TdxMirror::finalized_on_sim(levels, policy) else {
            return -libc::EIO;
        };
        let vm_type = if private_memory {
            split::VmType::td(levels)
        } else {
            split::VmType::Default
        };
        match new_mmu(levels, true, Some(mirror.clone()), vm_type) {
            Ok(mmu) => {
                let handle = Box::new(mmukit_tdx {
                    mmu,
                    module,
                    mirror,
                });
                // SAFETY: checked non-null and aligned.
                unsafe { *out = Box::into_raw(handle) };
                0
            }
            Err(errno) => errno,
        }
    })
}

/// The TD's MMU, for the `mmukit_tdp_mmu_*` calls (owned by the TD; do not
/// destroy it). NULL for a NULL TD.
///
/// # Safety
///
/// `tdx` must be a live handle or NULL.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmukit_tdx_mmu(tdx: *mut mmukit_tdx) -> *mut mmukit_tdp_mmu {
    if tdx.is_null() || !tdx.is_aligned() {
        return std::ptr::null_mut();
    }
    // SAFETY: a live handle, per the caller's contract.
    unsafe { &raw mut (*tdx).mmu }
}

/// SEAMCALLs made so far and PAMT pages in use.
///
/// # Safety
///
/// `tdx` must be a live handle; the out pointers valid and aligned.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmukit_tdx_counts(
    tdx: *const mmukit_tdx,
    seamcalls: *mut u64,
    pamt_pages: *mut u64,
) -> c_int {
    guard(|| {
        if tdx.is_null() || seamcalls.is_null() || pamt_pages.is_null() {
            return -libc::EINVAL;
        }
        if !tdx.is_aligned() || !seamcalls.is_aligned() || !pamt_pages.is_aligned() {
            return -libc::EINVAL;
        }
        // SAFETY: a live handle, per the caller's contract.
        let tdx = unsafe { &*tdx };
        let calls = Seamcall::ALL.iter().map(|&s| tdx.module.calls(s)).sum();
        // SAFETY: checked non-null and aligned.
        unsafe {
            *seamcalls = calls;
            *pamt_pages = tdx.mirror.pamt().counters().pages_in_use;
        }
        0
    })
}

/// Tears the TD down (every page reclaimed) and destroys it.
///
/// # Safety
///
/// `tdx` must be a live handle or NULL; it is invalid afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmukit_tdx_destroy(tdx: *mut mmukit_tdx) {
    guard(|| {
        if !tdx.is_null() && tdx.is_aligned() {
            // SAFETY: a handle from mmukit_tdx_new, destroyed once.
            let tdx = unsafe { Box::from_raw(tdx) };
            let _ = tdx.mmu.mmu.teardown();
            drop(tdx);
        }
        0
    });
}
