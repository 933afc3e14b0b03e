//! The software MMU's dirty log: classic mode on every memslot, with eager
//! splitting as the MMU is configured.

use split::{LogMode, TdpMmu};

use super::{DirtyLog, DirtyLogError};

/// The dirty log of a [`TdpMmu`]'s memslots.
#[derive(Debug)]
pub struct SoftDirtyLog<'a> {
    mmu: &'a TdpMmu,
    /// The memslot ids, in guest memory order.
    slots: Vec<u32>,
    logging: bool,
}

impl<'a> SoftDirtyLog<'a> {
    /// The log of `slots` (memslot ids in guest memory order) of `mmu`.
    pub fn new(mmu: &'a TdpMmu, slots: Vec<u32>) -> Self {
        Self {
            mmu,
            slots,
            logging: false,
        }
    }
}

impl DirtyLog for SoftDirtyLog<'_> {
    fn start(&mut self) -> Result<(), DirtyLogError> {
        for &slot in &self.slots {
            self.mmu.enable_dirty_logging(slot, LogMode::Classic)?;
        }
        self.logging = true;
        Ok(())
    }

    fn harvest(&mut self) -> Result<Vec<u64>, DirtyLogError> {
        let mut log = Vec::new();
        for &slot in &self.slots {
            log.extend(self.mmu.get_dirty_log(slot)?);
        }
        Ok(log)
    }

    fn stop(&mut self) -> Result<(), DirtyLogError> {
        if self.logging {
            for &slot in &self.slots {
                self.mmu.disable_dirty_logging(slot)?;
            }
            self.logging = false;
        }
        Ok(())
    }
}
