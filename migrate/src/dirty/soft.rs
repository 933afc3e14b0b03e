//! The software MMU's dirty log: classic mode on every memslot (eager
//! splitting as the MMU is configured), or the log the VM's own workload
//! keeps on already, in either mode.

use split::{LogMode, TdpMmu};

use super::{DirtyLog, DirtyLogError};

/// The dirty log of a [`TdpMmu`]'s memslots.
#[derive(Debug)]
pub struct SoftDirtyLog<'a> {
    mmu: &'a TdpMmu,
    /// The memslot ids, in guest memory order.
    slots: Vec<u32>,
    /// Whether this log turns logging on and off (or shares the
    /// workload's, which stays on).
    owns_logging: bool,
    logging: bool,
}

impl<'a> SoftDirtyLog<'a> {
    /// The log of `slots` (memslot ids in guest memory order) of `mmu`,
    /// turned on at `start` in classic mode and off at `stop`.
    pub fn new(mmu: &'a TdpMmu, slots: Vec<u32>) -> Self {
        Self {
            mmu,
            slots,
            owns_logging: true,
            logging: false,
        }
    }

    /// The log of `slots` that the VM keeps on already (classic or manual):
    /// `start` drops what was logged before it, and `stop` leaves logging
    /// on for its owner.
    pub fn sharing(mmu: &'a TdpMmu, slots: Vec<u32>) -> Self {
        Self {
            mmu,
            slots,
            owns_logging: false,
            logging: false,
        }
    }
}

impl DirtyLog for SoftDirtyLog<'_> {
    fn start(&mut self) -> Result<(), DirtyLogError> {
        if self.owns_logging {
            for &slot in &self.slots {
                self.mmu.enable_dirty_logging(slot, LogMode::Classic)?;
            }
        } else {
            // Writes before the start are in memory already: the full copy
            // sends them.
            self.harvest()?;
        }
        self.logging = true;
        Ok(())
    }

    fn harvest(&mut self) -> Result<Vec<u64>, DirtyLogError> {
        let mut log = Vec::new();
        for &slot in &self.slots {
            let part = self.mmu.get_dirty_log(slot)?;
            if self.mmu.slot(slot)?.log_mode() == Some(LogMode::ManualInitiallySet) {
                self.mmu.clear_dirty_log(slot, 0, &part)?;
            }
            log.extend(part);
        }
        Ok(log)
    }

    fn stop(&mut self) -> Result<(), DirtyLogError> {
        if self.logging && self.owns_logging {
            for &slot in &self.slots {
                self.mmu.disable_dirty_logging(slot)?;
            }
        }
        self.logging = false;
        Ok(())
    }
}
