//! Dirty logging of a VM's memslots: `KVM_GET_DIRTY_LOG`, and manual
//! protect (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` with
//! `KVM_CLEAR_DIRTY_LOG`), the one place gmem issues them.

use kvm_bindings::{kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_enable_cap};
use vmm_sys_util::ioctl::ioctl_with_ref;

use super::{KvmError, KvmVm, MissingCapability};
use crate::consts::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2;

mod ioctls {
    use kvm_bindings::kvm_clear_dirty_log;
    // The kernel declares it _IOWR: the bitmap is read, and the struct is
    // passed both ways.
    vmm_sys_util::ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, 0xae, 0xc0, kvm_clear_dirty_log);
}

impl KvmVm {
    /// Turns manual protect on with `flags`
    /// (`KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE`, optionally with
    /// `KVM_DIRTY_LOG_INITIALLY_SET`): `KVM_GET_DIRTY_LOG` then stops
    /// write-protecting what it returns, and [`clear_dirty_log`] does.
    /// [`KvmError::NotSupported`] where KVM lacks the capability or one of
    /// the flags.
    ///
    /// [`clear_dirty_log`]: Self::clear_dirty_log
    pub fn enable_manual_dirty_log_protect(&self, flags: u64) -> Result<(), KvmError> {
        let offered = self.caps().manual_dirty_log_protect;
        if offered == 0 || flags & !offered != 0 {
            return Err(MissingCapability::ManualDirtyLogProtect { flags, offered }.into());
        }
        let cap = kvm_enable_cap {
            cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
            args: [flags, 0, 0, 0],
            ..Default::default()
        };
        self.vm()
            .enable_cap(&cap)
            .map_err(KvmError::ioctl("KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)"))
    }

    /// `KVM_GET_DIRTY_LOG` of memslot `slot` (`bytes` long): one bit per
    /// 4 KiB page, in 64-bit words.
    pub fn dirty_log(&self, slot: u32, bytes: u64) -> Result<Vec<u64>, KvmError> {
        self.vm()
            .get_dirty_log(slot, bytes as usize)
            .map_err(KvmError::ioctl("KVM_GET_DIRTY_LOG"))
    }

    /// `KVM_CLEAR_DIRTY_LOG`: write-protects again, and clears, the pages of
    /// `slot` from `first_page` whose bits are set in `bitmap` (one bit per
    /// page, `num_pages` of them). The kernel wants `first_page` a multiple
    /// of 64 and `num_pages` one too unless the range ends at the slot's
    /// end (EINVAL otherwise).
    pub fn clear_dirty_log(
        &self,
        slot: u32,
        first_page: u64,
        num_pages: u32,
        bitmap: &mut [u64],
    ) -> Result<(), KvmError> {
        if (bitmap.len() as u64) < u64::from(num_pages).div_ceil(64) {
            return Err(KvmError::DirtyBitmap {
                words: bitmap.len(),
                pages: num_pages,
            });
        }
        let clear = kvm_clear_dirty_log {
            slot,
            num_pages,
            first_page,
            __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
                dirty_bitmap: bitmap.as_mut_ptr().cast(),
            },
        };
        // SAFETY: the VM descriptor is open; `clear` points at a bitmap of at
        // least `num_pages` bits (checked above) that lives until the call
        // returns, and the kernel only reads it.
        let ret = unsafe { ioctl_with_ref(self.vm(), ioctls::KVM_CLEAR_DIRTY_LOG(), &clear) };
        if ret < 0 {
            return Err(KvmError::Ioctl {
                op: "KVM_CLEAR_DIRTY_LOG",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}
