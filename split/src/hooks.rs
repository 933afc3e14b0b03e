//! Hooks for external page tables: a second copy of the tree that another
//! party keeps (the TDX module's S-EPT, mirrored by the TDP MMU).
//!
//! The TDP MMU calls a hook *before* it commits the change to its own tree,
//! with the entry frozen so that no other walker acts on it; if the hook
//! fails, the entry is restored and the mirror is left unchanged.

use crate::ept::{Entry, Level};

/// Errors of external page-table hooks.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HookError {
    /// The external side is busy; the operation may be retried.
    #[error("external page table busy: {what}")]
    Busy {
        /// What was refused.
        what: String,
    },
    /// The external side refused the operation.
    #[error("external page table refused: {what}")]
    Refused {
        /// What was refused, and why.
        what: String,
    },
}

/// Callbacks that keep an external page table identical to the MMU's tree.
///
/// Every method has a no-op default, so an implementation overrides only
/// what it mirrors.
pub trait ExternalPageTable: Send + Sync {
    /// A table at `table_hpa` is being linked under the entry for `gfn` at `level`.
    fn link_table(&self, gfn: u64, level: Level, table_hpa: u64) -> Result<(), HookError> {
        let _ = (gfn, level, table_hpa);
        Ok(())
    }

    /// A leaf `entry` is being installed for `gfn` at `level`.
    fn set_leaf(&self, gfn: u64, level: Level, entry: Entry) -> Result<(), HookError> {
        let _ = (gfn, level, entry);
        Ok(())
    }

    /// The leaf `old` for `gfn` at `level` is being removed.
    fn remove_leaf(&self, gfn: u64, level: Level, old: Entry) -> Result<(), HookError> {
        let _ = (gfn, level, old);
        Ok(())
    }

    /// The table at `table_hpa`, linked for `gfn` at `level`, is being freed
    /// (its entries are already gone).
    fn free_table(&self, gfn: u64, level: Level, table_hpa: u64) -> Result<(), HookError> {
        let _ = (gfn, level, table_hpa);
        Ok(())
    }

    /// The huge leaf `old` for `gfn` at `level` is being replaced by the
    /// filled table at `new_table_hpa` mapping the same memory.
    fn split_leaf(
        &self,
        gfn: u64,
        level: Level,
        old: Entry,
        new_table_hpa: u64,
    ) -> Result<(), HookError> {
        let _ = (gfn, level, old, new_table_hpa);
        Ok(())
    }
}

/// No external page table: every hook succeeds and does nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoExternal;

impl ExternalPageTable for NoExternal {}
