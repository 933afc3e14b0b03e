//! Bookkeeping of the pages an allocator has handed out, for allocators
//! whose backing store cannot tell by itself (the heap).

use std::collections::HashSet;

use super::AllocError;

/// Which pages are out, and which were out once and came back.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    outstanding: HashSet<usize>,
    returned: HashSet<usize>,
}

impl Ledger {
    /// Records that `addr` was handed out.
    pub(crate) fn record_out(&mut self, addr: usize) {
        self.returned.remove(&addr);
        let fresh = self.outstanding.insert(addr);
        debug_assert!(fresh, "allocator handed out {addr:#x} twice");
    }

    /// Records that `addr` came back, refusing addresses that are not out.
    pub(crate) fn record_back(&mut self, name: &str, addr: usize) -> Result<(), AllocError> {
        if self.outstanding.remove(&addr) {
            self.returned.insert(addr);
            Ok(())
        } else if self.returned.contains(&addr) {
            Err(AllocError::DoubleFree {
                allocator: name.to_owned(),
                addr,
            })
        } else {
            Err(AllocError::NotOwned {
                allocator: name.to_owned(),
                addr,
            })
        }
    }

    /// Number of pages out.
    pub(crate) fn outstanding(&self) -> usize {
        self.outstanding.len()
    }

    /// Every page still out, for the owner's `Drop`.
    pub(crate) fn drain_outstanding(&mut self) -> impl Iterator<Item = usize> + '_ {
        self.outstanding.drain()
    }
}
