//! Hooks for external page tables: a second copy of the tree that another
//! party keeps (the TDX module's S-EPT, mirrored by the TDP MMU).
//!
//! The TDP MMU calls a hook *before* it commits the change to its own tree,
//! with the entry frozen so that no other walker acts on it; if the hook
//! fails, the entry is restored and the mirror is left unchanged.

use std::sync::Arc;

use mmu_cache::{PageKind, PagePool};

use crate::addr::{Gfn, Hpa};
use crate::ept::{Entry, Level};

/// The hook an error came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HookOp {
    /// [`ExternalPageTable::topup`].
    Topup,
    /// [`ExternalPageTable::link_table`].
    LinkTable,
    /// [`ExternalPageTable::set_leaf`].
    SetLeaf,
    /// [`ExternalPageTable::remove_leaf`].
    RemoveLeaf,
    /// [`ExternalPageTable::free_table`].
    FreeTable,
    /// [`ExternalPageTable::split_leaf`].
    SplitLeaf,
    /// [`ExternalPageTable::teardown`].
    Teardown,
}

impl std::fmt::Display for HookOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Topup => "topup",
            Self::LinkTable => "link table",
            Self::SetLeaf => "set leaf",
            Self::RemoveLeaf => "remove leaf",
            Self::FreeTable => "free table",
            Self::SplitLeaf => "split leaf",
            Self::Teardown => "teardown",
        })
    }
}

/// Why the external side failed: any error, kept as it is (a TDX status
/// survives as its own type; see [`HookError::cause`]).
pub type HookCause = Arc<dyn std::error::Error + Send + Sync>;

/// Errors of external page-table hooks: the operation and its cause.
#[derive(Clone, Debug, thiserror::Error)]
pub enum HookError {
    /// The external side is busy; the operation may be retried.
    #[error("external page table busy ({op}): {source}")]
    Busy {
        /// The hook.
        op: HookOp,
        /// The external side's error.
        source: HookCause,
    },
    /// The external side refused the operation.
    #[error("external page table refused {op}: {source}")]
    Refused {
        /// The hook.
        op: HookOp,
        /// The external side's error.
        source: HookCause,
    },
}

impl HookError {
    /// A busy external side: retry.
    pub fn busy(op: HookOp, cause: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Busy {
            op,
            source: Arc::new(cause),
        }
    }

    /// A refusal; `cause` is any error, or a message.
    pub fn refused(op: HookOp, cause: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Refused {
            op,
            source: Arc::from(cause.into()),
        }
    }

    /// The hook that failed.
    pub fn op(&self) -> HookOp {
        match self {
            Self::Busy { op, .. } | Self::Refused { op, .. } => *op,
        }
    }

    /// Whether the operation may be retried.
    pub fn is_busy(&self) -> bool {
        matches!(self, Self::Busy { .. })
    }

    /// The external side's error as its own type, if it is an `E`.
    pub fn cause<E: std::error::Error + 'static>(&self) -> Option<&E> {
        match self {
            Self::Busy { source, .. } | Self::Refused { source, .. } => source.downcast_ref::<E>(),
        }
    }
}

/// Pages that hold the external copy of a table (the TDX S-EPT page that
/// mirrors a mirror-tree table). They belong to the MMU: it takes them from
/// its external-table cache and frees them when the hooks let them go.
#[derive(Debug)]
pub enum ExternalTablePage {}
impl PageKind for ExternalTablePage {}

/// A table as the hooks see it: the MMU's own table page and, when the
/// hooks ask for them, the external page that mirrors it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableRef {
    /// The MMU's table page.
    pub hpa: Hpa,
    /// The external page (see [`ExternalPageTable::external_tables`]).
    pub external: Option<Hpa>,
}

/// What an operation is about to need, told to the hooks before the MMU
/// takes its lock so that they can top up their own caches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topup {
    /// A fault that may link a table at each of `levels` levels and map a leaf.
    Fault {
        /// The paging depth.
        levels: u8,
    },
    /// A splitter about to do up to `splits` splits under the write lock.
    Split {
        /// Splits before the next topup.
        splits: usize,
    },
}

/// The hooks' own state of one vCPU (a TDX mirror's PAMT page cache). It
/// lives in the vCPU's [`VcpuCaches`](crate::VcpuCaches) and is handed to
/// the hooks on that vCPU's faults, as KVM hands its hooks the vcpu, so no
/// hook looks a vCPU up in a map shared by all of them.
pub trait HookVcpuState: Send + std::fmt::Debug {
    /// The state as `Any`, for the hooks to downcast to their own type.
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;

    /// Gives back everything cached; returns how many objects.
    fn free_all(&mut self) -> usize;
}

/// Callbacks that keep an external page table identical to the MMU's tree.
///
/// Every method has a no-op default, so an implementation overrides only
/// what it mirrors. Calls that change the tree are made with the MMU lock
/// held; [`topup`](Self::topup) is made before it is taken.
pub trait ExternalPageTable: Send + Sync {
    /// Whether the MMU must provide an external page for every table it
    /// links (passed in [`TableRef::external`]). Read once, at construction.
    fn external_tables(&self) -> bool {
        false
    }

    /// Whether the hooks keep a mirror of the tree (a TD's S-EPT): then a
    /// fault never puts a huge leaf over an existing table, as the kernel
    /// disallows page merging on the mirror root (the external side would
    /// need a PROMOTE). Only hooks that mirror nothing say no. Read once,
    /// at construction.
    fn mirrors(&self) -> bool {
        true
    }

    /// The largest leaf the external side maps (a TD maps 4K and 2M only,
    /// so KVM caps its private leaves at 2M). Read once, at construction.
    fn max_leaf_level(&self) -> Level {
        Level::L1G
    }

    /// The pool external pages come from (`None`: the MMU's own pool).
    fn external_pool(&self) -> Option<Arc<PagePool<ExternalTablePage>>> {
        None
    }

    /// A new vCPU's state for the hooks, kept in its caches (`None`: the
    /// hooks keep none).
    fn new_vcpu_state(&self) -> Option<Box<dyn HookVcpuState>> {
        None
    }

    /// Tops up the hooks' own caches for what is about to happen: the
    /// faulting vCPU's state for a [`Topup::Fault`], none for a split.
    fn topup(&self, need: Topup, vcpu: Option<&mut dyn HookVcpuState>) -> Result<(), HookError> {
        let _ = (need, vcpu);
        Ok(())
    }

    /// How many splits the hooks' caches can serve after a
    /// [`Topup::Split`]; the splitter tops up again after that many.
    fn split_budget(&self) -> usize {
        usize::MAX
    }

    /// `table` is being linked under the entry for `gfn` at `level` (the
    /// level of the table's entries) by a fault of the vCPU whose state is
    /// `vcpu`.
    fn link_table(
        &self,
        gfn: Gfn,
        level: Level,
        table: TableRef,
        vcpu: Option<&mut dyn HookVcpuState>,
    ) -> Result<(), HookError> {
        let _ = (gfn, level, table, vcpu);
        Ok(())
    }

    /// A leaf `entry` is being installed for `gfn` at `level` by a fault of
    /// the vCPU whose state is `vcpu`.
    fn set_leaf(
        &self,
        gfn: Gfn,
        level: Level,
        entry: Entry,
        vcpu: Option<&mut dyn HookVcpuState>,
    ) -> Result<(), HookError> {
        let _ = (gfn, level, entry, vcpu);
        Ok(())
    }

    /// The leaf `old` for `gfn` at `level` is being removed.
    fn remove_leaf(&self, gfn: Gfn, level: Level, old: Entry) -> Result<(), HookError> {
        let _ = (gfn, level, old);
        Ok(())
    }

    /// `table`, linked for `gfn` at `level`, is being freed (its entries
    /// are already gone). On an error the MMU keeps the table linked, or,
    /// at teardown, keeps the external page out of the allocator (leaked).
    fn free_table(&self, gfn: Gfn, level: Level, table: TableRef) -> Result<(), HookError> {
        let _ = (gfn, level, table);
        Ok(())
    }

    /// The huge leaf `old` for `gfn` at `level` is being replaced by the
    /// filled `new_table` mapping the same memory. `exclusive` is true when
    /// the caller holds the MMU lock for write.
    fn split_leaf(
        &self,
        gfn: Gfn,
        level: Level,
        old: Entry,
        new_table: TableRef,
        exclusive: bool,
    ) -> Result<(), HookError> {
        let _ = (gfn, level, old, new_table, exclusive);
        Ok(())
    }

    /// The VM is going away: after this, leaves and tables are only taken
    /// back (the TDX key is released; pages are reclaimed).
    fn teardown(&self) -> Result<(), HookError> {
        Ok(())
    }
}

/// No external page table: every hook succeeds and does nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoExternal;

impl ExternalPageTable for NoExternal {
    fn mirrors(&self) -> bool {
        false
    }
}
