//! KVM's dirty log: `KVM_MEM_LOG_DIRTY_PAGES` on every memslot, read with
//! `KVM_GET_DIRTY_LOG`, with manual protect (`KVM_CLEAR_DIRTY_LOG`, pages
//! initially set) where the host has it.

use std::sync::Arc;

use gmem::consts::{
    KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MEM_LOG_DIRTY_PAGES,
};
use gmem::{GuestRegion, KvmVm};

use super::{DirtyLog, DirtyLogError};

/// The dirty log of a KVM VM's memslots.
#[derive(Debug)]
pub struct KvmDirtyLog {
    vm: Arc<KvmVm>,
    /// The memslots, in guest memory order, and their regions.
    slots: Vec<(u32, Arc<GuestRegion>)>,
    /// Manual protect with initially-set bits.
    manual: bool,
    /// Whether this log turns logging on and off (or shares the VM's own,
    /// which stays on).
    owns_logging: bool,
    logging: bool,
}

impl KvmDirtyLog {
    /// The log of `slots` (memslot id and region, in guest memory order) of
    /// `vm`; with manual protect where the VM offers it with initially-set
    /// bits.
    pub fn new(vm: Arc<KvmVm>, slots: Vec<(u32, Arc<GuestRegion>)>) -> Self {
        let wanted = (KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET) as u64;
        let manual = vm.caps().manual_dirty_log_protect & wanted == wanted;
        Self {
            vm,
            slots,
            manual,
            owns_logging: true,
            logging: false,
        }
    }

    /// The log the VM keeps on already for its own workload (in manual
    /// mode when `manual`): `start` drops what was logged before it, and
    /// `stop` leaves logging as it was.
    pub fn sharing(vm: Arc<KvmVm>, slots: Vec<(u32, Arc<GuestRegion>)>, manual: bool) -> Self {
        Self {
            vm,
            slots,
            manual,
            owns_logging: false,
            logging: false,
        }
    }

    /// Whether the log uses manual protect.
    pub fn manual(&self) -> bool {
        self.manual
    }

    /// Reads (and in manual mode clears) every slot's log into one bitmap.
    fn read(&mut self) -> Result<Vec<u64>, DirtyLogError> {
        let mut log = Vec::new();
        for (slot, region) in &self.slots {
            let mut part = self.vm.dirty_log(*slot, region.size())?;
            if self.manual {
                let pages = region.size() / mmukit_sys::size::PAGE_4K;
                self.vm.clear_dirty_log(*slot, 0, pages as u32, &mut part)?;
            }
            log.extend(part);
        }
        Ok(log)
    }
}

impl DirtyLog for KvmDirtyLog {
    fn start(&mut self) -> Result<(), DirtyLogError> {
        if !self.owns_logging {
            // Writes before the start are in memory already: the full copy
            // sends them.
            self.read()?;
            self.logging = true;
            return Ok(());
        }
        if self.manual {
            let flags = (KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET) as u64;
            self.vm.enable_manual_dirty_log_protect(flags)?;
        }
        for (slot, region) in &self.slots {
            self.vm
                .bind(*slot, region.clone(), KVM_MEM_LOG_DIRTY_PAGES)?;
        }
        self.logging = true;
        if self.manual {
            // Every bit starts set and nothing is write-protected: one
            // harvest now clears the bits and protects every page, so that
            // the first real harvest holds only writes made after it.
            self.read()?;
        }
        Ok(())
    }

    fn harvest(&mut self) -> Result<Vec<u64>, DirtyLogError> {
        self.read()
    }

    fn stop(&mut self) -> Result<(), DirtyLogError> {
        if self.logging && self.owns_logging {
            for (slot, region) in &self.slots {
                self.vm.bind(*slot, region.clone(), 0)?;
            }
            self.logging = false;
        }
        Ok(())
    }
}
