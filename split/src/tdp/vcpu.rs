//! A vCPU's context: the caches its faults draw from, the hooks' state
//! of it, and its walk cache.

use mmu_cache::{CacheError, ObjectCache, PageCache};

use crate::ept;
use crate::hooks::{ExternalTablePage, HookVcpuState};
use crate::tdp::{TableHeader, TablePage, TdpMmu};

/// Tables (and headers) one fault may link: one per level of a 5-level walk.
pub const TABLES_PER_FAULT: usize = 5;

/// vCPU threads whose faults the table map has room for at once.
pub(super) const RESERVE_THREADS: usize = 64;

/// What one vCPU brings to its faults and accesses, as KVM's vcpu does:
/// caches for every level of a 5-level walk, topped up before the lock;
/// the hooks' own state of the vCPU (a TDX mirror's PAMT cache); and the
/// vCPU's walk cache (the leaf table of its last access).
#[derive(Debug)]
pub struct VcpuCaches {
    /// Table pages, filled with the non-present value.
    pub tables: PageCache<TablePage>,
    /// Table headers.
    pub headers: ObjectCache<TableHeader>,
    /// External table pages, topped up only when the hooks ask for them.
    pub external: PageCache<ExternalTablePage>,
    /// The hooks' state of this vCPU, if they keep one.
    pub hooks: Option<Box<dyn HookVcpuState>>,
    /// The leaf table of this vCPU's last access.
    pub(super) walk: WalkCache,
}

impl VcpuCaches {
    /// The hooks' state of this vCPU, as the hooks take it (downcast it
    /// with [`HookVcpuState::as_any_mut`] to the hooks' own type).
    pub fn hook_state(&mut self) -> Option<&mut dyn HookVcpuState> {
        match &mut self.hooks {
            Some(state) => Some(&mut **state),
            None => None,
        }
    }

    /// Returns every cached object (the hooks' too) to its allocator;
    /// returns how many.
    pub fn free_all(&mut self) -> usize {
        self.tables.free_all()
            + self.headers.free_all()
            + self.external.free_all()
            + self.hooks.as_mut().map_or(0, |hooks| hooks.free_all())
    }

    /// The topup before a fault takes the lock: tables and headers for a
    /// 5-level walk at the MMU's vCPU cache `capacity` (the configuration,
    /// not the set's default), and an external page per level when
    /// `external_levels` is given (the hooks ask for external tables).
    pub fn topup_for_fault(
        &mut self,
        capacity: usize,
        external_levels: Option<u8>,
    ) -> Result<(), CacheError> {
        self.tables
            .topup_with_capacity(capacity, TABLES_PER_FAULT)
            .map_err(|err| CacheError::in_set("tables", err))?;
        self.headers
            .topup_with_capacity(capacity, TABLES_PER_FAULT)
            .map_err(|err| CacheError::in_set("headers", err))?;
        if let Some(levels) = external_levels {
            self.external
                .topup_with_capacity(capacity, usize::from(levels))
                .map_err(|err| CacheError::in_set("external", err))?;
        }
        Ok(())
    }
}

/// The leaf table a vCPU's last access walked to: the software vCPU's
/// paging-structure cache. Valid for the MMU `mmu` while its table
/// generation is still `generation`, since a linked table stays linked
/// at its place until one is unlinked.
#[derive(Clone, Copy, Debug)]
pub(super) struct WalkCache {
    pub(super) mmu: u64,
    pub(super) generation: u64,
    /// `gfn >> 9` of the 2 MiB region the table maps.
    pub(super) region: u64,
    /// Whether the table is in a TD's shared tree.
    pub(super) shared: bool,
    pub(super) table_hpa: u64,
}

impl WalkCache {
    /// Matches no MMU.
    pub(super) const EMPTY: Self = Self {
        mmu: 0,
        generation: 0,
        region: 0,
        shared: false,
        table_hpa: 0,
    };
}

impl TdpMmu {
    /// A fresh vCPU context: its caches, the hooks' state of it, and an
    /// empty walk cache.
    pub fn new_vcpu_caches(&self) -> VcpuCaches {
        VcpuCaches {
            tables: PageCache::new(self.pool.clone())
                .with_init_value(ept::NON_PRESENT)
                .named("vcpu-tables"),
            headers: ObjectCache::new(self.header_slab.clone()).named("vcpu-headers"),
            external: PageCache::new(self.external_pool.clone()).named("vcpu-external"),
            hooks: self.hooks.new_vcpu_state(),
            walk: WalkCache::EMPTY,
        }
    }
}
