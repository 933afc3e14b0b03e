//! Where the pages written since the last look come from: KVM's dirty
//! log ([`KvmDirtyLog`]) or the software MMU's ([`SoftDirtyLog`]), behind
//! one trait a VMM may implement for its own.

mod kvm;
mod soft;

pub use kvm::KvmDirtyLog;
pub use soft::SoftDirtyLog;

/// A dirty log could not be started, read or stopped.
#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    /// KVM refused.
    #[error("KVM dirty log: {0}")]
    Kvm(#[from] gmem::KvmError),
    /// The software MMU refused.
    #[error("software MMU dirty log: {0}")]
    Mmu(#[from] split::MmuError),
}

/// The pages of guest memory written since the last harvest.
pub trait DirtyLog: Send {
    /// Starts logging: from now on every write shows in a later
    /// [`harvest`](Self::harvest).
    fn start(&mut self) -> Result<(), DirtyLogError>;

    /// The pages written since the last harvest (or since `start`), one
    /// bit per page of guest memory in memslot order, with every one of
    /// them write-protected again, so that a write after this call shows
    /// in the next harvest.
    fn harvest(&mut self) -> Result<Vec<u64>, DirtyLogError>;

    /// Stops logging.
    fn stop(&mut self) -> Result<(), DirtyLogError>;
}

/// The log of memory nothing writes while it is sent (a stopped VM, or a
/// test): every harvest is empty.
#[derive(Clone, Copy, Debug)]
pub struct Quiescent {
    /// Guest memory in pages.
    pub pages: u64,
}

impl DirtyLog for Quiescent {
    fn start(&mut self) -> Result<(), DirtyLogError> {
        Ok(())
    }

    fn harvest(&mut self) -> Result<Vec<u64>, DirtyLogError> {
        Ok(vec![0; self.pages.div_ceil(64) as usize])
    }

    fn stop(&mut self) -> Result<(), DirtyLogError> {
        Ok(())
    }
}

/// Pages set in `bitmap`.
pub fn count(bitmap: &[u64]) -> u64 {
    bitmap.iter().map(|word| u64::from(word.count_ones())).sum()
}
