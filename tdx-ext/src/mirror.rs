//! The mirror/external S-EPT: split's external page-table hooks over a
//! [`TdxModule`], so that a TDP MMU marked as mirror keeps the module's
//! S-EPT identical to its own tree.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use mmu_cache::alloc::{ChunkAllocator, PageAllocator};
use mmu_cache::{Account, PageCache, PagePool};
use split::{
    Entry, ExternalPageTable, ExternalTablePage, Gfn, Gpa, HookError, HookOp, HookVcpuState, Hpa,
    Level, TableRef, Topup,
};

use crate::module::{SeamcallResult, TdxModule};
use crate::pamt::{DynamicPamt, PamtBackedAllocator, PamtCache, PamtError, PamtPage, PamtPolicy};
use crate::sim::SimTdxModule;
use crate::status::{Seamcall, SeamcallError, TdxStatus};

/// Where a software TD's pages come from: the PAMT pages, the S-EPT
/// pages, and the account both are charged to.
#[derive(Clone)]
pub struct TdPages {
    /// The PAMT pages' allocator.
    pub pamt: Arc<dyn PageAllocator>,
    /// The S-EPT pages' allocator.
    pub tables: Arc<dyn PageAllocator>,
    /// The account charged, if any.
    pub account: Option<Arc<Account>>,
}

impl TdPages {
    /// Both from anonymous memory, charged to no account.
    pub fn anonymous() -> Self {
        Self {
            pamt: Arc::new(ChunkAllocator::anonymous()),
            tables: Arc::new(ChunkAllocator::anonymous()),
            account: None,
        }
    }
}

impl std::fmt::Debug for TdPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TdPages")
            .field(
                "account",
                &self.account.as_ref().map(|a| a.name().to_owned()),
            )
            .finish_non_exhaustive()
    }
}

/// PAMT pages one split may need: a pair for the new S-EPT page's region
/// and a pair for the demoted range.
const PAMT_PER_SPLIT: usize = 4;
/// Capacity of the split path's PAMT cache.
const SPLIT_PAMT_CAPACITY: usize = 64;

/// Counters of the mirror.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MirrorCounters {
    /// SEAMCALLs retried after OPERAND_BUSY (and a vCPU kick).
    pub busy_retries: u64,
    /// Hook operations that failed and left the mirror unchanged.
    pub failures: u64,
    /// Pages kept out of the host because the module may still own them.
    pub leaked_pages: u64,
    /// PAMT pages idle in the mirror's caches right now.
    pub pamt_cached: u64,
}

/// Keeps a TDX module's S-EPT identical to a mirror TDP MMU.
///
/// Give it to [`split::TdpMmu::with_hooks`] (as an `Arc`): the MMU then takes
/// an S-EPT page from its external-table cache for every table, and calls
/// the hooks, which make the SEAMCALLs:
/// - link: TDH.MEM.SEPT.ADD; set leaf: TDH.MEM.PAGE.AUG (or PAGE.ADD before
///   the TD is finalized);
/// - remove leaf: RANGE.BLOCK, TRACK, kick, PAGE.REMOVE, PHYMEM.PAGE.WBINVD,
///   then the PAMT reference goes;
/// - split of a 2M leaf (write lock only): BLOCK, TRACK, kick, PAMT for the
///   new S-EPT page and the 4K PAMT of the range, PAGE.DEMOTE;
/// - teardown: the key is released; pages come back by RECLAIM.
///
/// OPERAND_BUSY is retried once after kicking the vCPUs; any other failure
/// leaves the mirror unchanged and is reported.
pub struct TdxMirror {
    module: Arc<dyn TdxModule>,
    pamt: Arc<DynamicPamt>,
    policy: PamtPolicy,
    table_pool: Arc<PagePool<ExternalTablePage>>,
    backed_allocator: Option<Arc<dyn PamtCache>>,
    split_cache: Mutex<PageCache<PamtPage>>,
    /// PAMT pages idle in the vCPUs' own caches, summed.
    held_by_vcpus: Arc<AtomicUsize>,
    torn_down: AtomicBool,
    busy_retries: AtomicU64,
    failures: AtomicU64,
    leaked: AtomicU64,
}

impl std::fmt::Debug for TdxMirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TdxMirror")
            .field("policy", &self.policy)
            .field("counters", &self.counters())
            .finish()
    }
}

fn refused(op: HookOp, what: impl Into<String>) -> HookError {
    HookError::refused(op, what.into())
}

/// A vCPU's own PAMT page cache: the mirror's state of the vCPU, kept in
/// its `VcpuCaches` and topped up before each fault takes the MMU lock.
/// What it holds is summed in the mirror's `pamt_cached` counter.
#[derive(Debug)]
pub struct VcpuPamtCache {
    cache: PageCache<PamtPage>,
    /// The mirror's sum of the pages held by every vCPU cache.
    held_by_vcpus: Arc<AtomicUsize>,
}

impl VcpuPamtCache {
    /// PAMT pages this vCPU holds ready for its next fault.
    pub fn nr_free(&self) -> usize {
        self.cache.nr_free()
    }

    /// Runs `body` on the cache and carries its change in size into the
    /// mirror's sum.
    fn update<R>(&mut self, body: impl FnOnce(&mut PageCache<PamtPage>) -> R) -> R {
        let before = self.cache.nr_free();
        let result = body(&mut self.cache);
        let after = self.cache.nr_free();
        if after > before {
            self.held_by_vcpus
                .fetch_add(after - before, Ordering::Relaxed);
        } else {
            self.held_by_vcpus
                .fetch_sub(before - after, Ordering::Relaxed);
        }
        result
    }
}

impl HookVcpuState for VcpuPamtCache {
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }

    fn free_all(&mut self) -> usize {
        self.update(PageCache::free_all)
    }
}

impl Drop for VcpuPamtCache {
    fn drop(&mut self) {
        // The cache returns its pages to the pool as it drops.
        self.held_by_vcpus
            .fetch_sub(self.cache.nr_free(), Ordering::Relaxed);
    }
}

/// A SEAMCALL's failure as a hook error: busy (retry) or refused, with the
/// leaf and the status kept as a [`SeamcallError`].
fn from_status(op: HookOp, call: Seamcall, status: TdxStatus) -> HookError {
    let cause = SeamcallError { call, status };
    if status.is_busy() {
        HookError::busy(op, cause)
    } else {
        HookError::refused(op, cause)
    }
}

impl TdxMirror {
    /// A mirror over `module`. S-EPT pages come from `table_allocator` and
    /// PAMT pages from `pamt`'s pool; both charge `account`. With
    /// [`PamtPolicy::OnCacheEntry`], the S-EPT pages' allocator makes every
    /// page PAMT-backed as it enters the MMU's cache.
    pub fn new(
        module: Arc<dyn TdxModule>,
        pamt: Arc<DynamicPamt>,
        table_allocator: impl PageAllocator + 'static,
        account: Option<Arc<Account>>,
        policy: PamtPolicy,
    ) -> Arc<Self> {
        let (table_pool, backed_allocator) = match policy {
            PamtPolicy::OnCacheEntry => {
                let backed = Arc::new(PamtBackedAllocator::new(table_allocator, pamt.clone()));
                let cache: Arc<dyn PamtCache> = backed.clone();
                (PagePool::from_shared(backed, account), Some(cache))
            }
            PamtPolicy::OnInstall => (
                PagePool::from_shared(Arc::new(table_allocator), account),
                None,
            ),
        };
        Arc::new(Self {
            split_cache: Mutex::new(pamt.new_cache()),
            held_by_vcpus: Arc::new(AtomicUsize::new(0)),
            module,
            pamt,
            policy,
            table_pool,
            backed_allocator,
            torn_down: AtomicBool::new(false),
            busy_retries: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            leaked: AtomicU64::new(0),
        })
    }

    /// The module.
    pub fn module(&self) -> &Arc<dyn TdxModule> {
        &self.module
    }

    /// Dynamic PAMT.
    pub fn pamt(&self) -> &Arc<DynamicPamt> {
        &self.pamt
    }

    /// The PAMT policy.
    pub fn policy(&self) -> PamtPolicy {
        self.policy
    }

    /// Counters. `pamt_cached` includes the pages idle in every vCPU's
    /// [`VcpuPamtCache`].
    pub fn counters(&self) -> MirrorCounters {
        let split = self
            .split_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .nr_free();
        MirrorCounters {
            busy_retries: self.busy_retries.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            leaked_pages: self.leaked.load(Ordering::Relaxed),
            pamt_cached: (split
                + self.held_by_vcpus.load(Ordering::Relaxed)
                + self.backed_allocator.as_ref().map_or(0, |a| a.cached()))
                as u64,
        }
    }

    /// Returns every PAMT page idle in the mirror's caches (and in the
    /// S-EPT allocator's, with [`PamtPolicy::OnCacheEntry`]) to its pool;
    /// a vCPU's cache goes back with the vCPU's `VcpuCaches::free_all`.
    pub fn free_cached(&self) -> usize {
        let mut freed = self
            .split_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .free_all();
        if let Some(backed) = &self.backed_allocator {
            freed += backed.free_cached();
        }
        freed
    }

    /// Finalizes the TD: pages come by AUG from now on.
    pub fn finalize(&self) -> Result<(), TdxStatus> {
        self.module.finalize()
    }

    /// A finalized TD on a fresh [`SimTdxModule`] with a `levels`-level
    /// S-EPT: S-EPT and PAMT pages come from anonymous memory, and no
    /// account is charged. This is the TD a VMM without TDX hardware runs.
    pub fn finalized_on_sim(
        levels: u8,
        policy: PamtPolicy,
    ) -> Result<(Arc<SimTdxModule>, Arc<Self>), TdxStatus> {
        Self::finalized_on_sim_with(levels, policy, TdPages::anonymous())
    }

    /// [`finalized_on_sim`](Self::finalized_on_sim) with the TD's pages
    /// from `pages`: the one wiring of module, PAMT and mirror.
    pub fn finalized_on_sim_with(
        levels: u8,
        policy: PamtPolicy,
        pages: TdPages,
    ) -> Result<(Arc<SimTdxModule>, Arc<Self>), TdxStatus> {
        let module = Arc::new(SimTdxModule::new(levels));
        let pamt = DynamicPamt::new(
            module.clone(),
            PagePool::from_shared(pages.pamt, pages.account.clone()),
        );
        let mirror = Self::new(module.clone(), pamt, pages.tables, pages.account, policy);
        mirror.finalize()?;
        Ok((module, mirror))
    }

    fn retry<T>(&self, call: impl Fn() -> SeamcallResult<T>) -> SeamcallResult<T> {
        match call() {
            Err(status) if status.is_busy() => {
                self.busy_retries.fetch_add(1, Ordering::Relaxed);
                self.module.kick_vcpus();
                call()
            }
            other => other,
        }
    }

    fn fail(&self, err: HookError) -> HookError {
        self.failures.fetch_add(1, Ordering::Relaxed);
        err
    }

    /// Runs `body` on the PAMT cache of the vCPU whose state is `vcpu`, or
    /// on the split path's cache when there is no vCPU (or a state that is
    /// not the mirror's).
    fn with_cache<R>(
        &self,
        vcpu: Option<&mut dyn HookVcpuState>,
        body: impl FnOnce(&mut PageCache<PamtPage>) -> R,
    ) -> R {
        match vcpu.and_then(|state| state.as_any_mut().downcast_mut::<VcpuPamtCache>()) {
            Some(state) => state.update(body),
            None => body(&mut self.split_cache.lock().unwrap_or_else(|p| p.into_inner())),
        }
    }

    /// BLOCK, TRACK and kick: the entry may then be removed or demoted.
    fn block_and_track(&self, op: HookOp, gpa: Gpa, level: Level) -> Result<(), HookError> {
        // Already blocked: an earlier removal or demote stopped after its
        // BLOCK; carry on from there.
        match self.retry(|| self.module.range_block(gpa, level)) {
            Ok(()) | Err(TdxStatus::GpaRangeAlreadyBlocked) => {}
            Err(status) => return Err(from_status(op, Seamcall::MemRangeBlock, status)),
        }
        self.retry(|| self.module.track())
            .map_err(|s| from_status(op, Seamcall::MemTrack, s))?;
        self.module.kick_vcpus();
        Ok(())
    }

    /// TDH.MEM.RANGE.UNBLOCK of an entry whose removal or demote failed
    /// after its BLOCK and TRACK, so that the S-EPT is left as it was.
    fn unblock(&self, gpa: Gpa, level: Level) {
        if let Err(status) = self.retry(|| self.module.range_unblock(gpa, level)) {
            tracing::error!(gpa = gpa.0, %status, "TDH.MEM.RANGE.UNBLOCK after a failed removal");
        }
    }

    /// A PAMT reference for `page`. OPERAND_BUSY from its PAMT.ADD is retried
    /// after a kick inside [`DynamicPamt`]; if it is still busy, it is
    /// reported as busy, so that the fault is retried.
    fn pamt_get(
        &self,
        op: HookOp,
        page: Hpa,
        count: u32,
        vcpu: Option<&mut dyn HookVcpuState>,
    ) -> Result<(), HookError> {
        let result = self.with_cache(vcpu, |cache| self.pamt.get_many(page, count, cache));
        result.map_err(|err| match err {
            PamtError::Add { status, .. } => from_status(op, Seamcall::PhymemPamtAdd, status),
            other => refused(op, other.to_string()),
        })
    }

    fn flush(&self, page: Hpa, pages: u64) -> bool {
        let mut clean = true;
        for i in 0..pages {
            if self
                .retry(|| self.module.page_wbinvd(page + i * 4096))
                .is_err()
            {
                self.leaked.fetch_add(1, Ordering::Relaxed);
                clean = false;
            }
        }
        clean
    }
}

impl ExternalPageTable for TdxMirror {
    fn external_tables(&self) -> bool {
        true
    }

    fn external_pool(&self) -> Option<Arc<PagePool<ExternalTablePage>>> {
        Some(self.table_pool.clone())
    }

    /// TDH.MEM.PAGE.AUG maps 4K and 2M pages only: private leaves stop at 2M.
    fn max_leaf_level(&self) -> Level {
        Level::L2M
    }

    fn new_vcpu_state(&self) -> Option<Box<dyn HookVcpuState>> {
        Some(Box::new(VcpuPamtCache {
            cache: self.pamt.new_cache(),
            held_by_vcpus: Arc::clone(&self.held_by_vcpus),
        }))
    }

    fn topup(&self, need: Topup, vcpu: Option<&mut dyn HookVcpuState>) -> Result<(), HookError> {
        match need {
            Topup::Fault { levels } => self.with_cache(vcpu, |cache| {
                // A pair for each S-EPT page a walk may add, and for the page.
                cache.topup(2 * (usize::from(levels) + 1))
            }),
            Topup::Split { .. } => self
                .split_cache
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .topup_with_capacity(SPLIT_PAMT_CAPACITY, PAMT_PER_SPLIT),
        }
        .map_err(|err| refused(HookOp::Topup, format!("PAMT cache: {err}")))
    }

    fn split_budget(&self) -> usize {
        self.split_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .nr_free()
            / PAMT_PER_SPLIT
    }

    fn link_table(
        &self,
        gfn: Gfn,
        level: Level,
        table: TableRef,
        vcpu: Option<&mut dyn HookVcpuState>,
    ) -> Result<(), HookError> {
        let page = table
            .external
            .ok_or_else(|| refused(HookOp::LinkTable, "a mirror table without an S-EPT page"))?;
        if self.policy == PamtPolicy::OnInstall {
            self.pamt_get(HookOp::LinkTable, page, 1, vcpu)?;
        }
        if let Err(status) = self.retry(|| self.module.sept_add(gfn.gpa(), level, page)) {
            if self.policy == PamtPolicy::OnInstall {
                self.pamt.put(page);
            }
            return Err(self.fail(from_status(HookOp::LinkTable, Seamcall::MemSeptAdd, status)));
        }
        Ok(())
    }

    fn set_leaf(
        &self,
        gfn: Gfn,
        level: Level,
        entry: Entry,
        vcpu: Option<&mut dyn HookVcpuState>,
    ) -> Result<(), HookError> {
        let page = Hpa(entry.addr(level));
        let gpa = gfn.gpa();
        if level == Level::L4K {
            self.pamt_get(HookOp::SetLeaf, page, 1, vcpu)?;
        }
        let result = if self.module.is_finalized() {
            self.retry(|| self.module.page_aug(gpa, level, page))
                .map_err(|s| from_status(HookOp::SetLeaf, Seamcall::MemPageAug, s))
        } else if level == Level::L4K {
            self.retry(|| self.module.page_add(gpa, page))
                .map_err(|s| from_status(HookOp::SetLeaf, Seamcall::MemPageAdd, s))
        } else {
            Err(refused(
                HookOp::SetLeaf,
                "huge pages are added only after the TD is finalized",
            ))
        };
        if let Err(err) = result {
            if level == Level::L4K {
                self.pamt.put(page);
            }
            return Err(self.fail(err));
        }
        Ok(())
    }

    fn remove_leaf(&self, gfn: Gfn, level: Level, old: Entry) -> Result<(), HookError> {
        let page = Hpa(old.addr(level));
        let pages = level.entry_bytes() / 4096;
        if self.torn_down.load(Ordering::Acquire) {
            if let Err(status) = self.retry(|| self.module.page_reclaim(page)) {
                self.leaked.fetch_add(pages, Ordering::Relaxed);
                return Err(self.fail(from_status(
                    HookOp::RemoveLeaf,
                    Seamcall::PhymemPageReclaim,
                    status,
                )));
            }
            if level == Level::L4K {
                self.pamt.put(page);
            }
            return Ok(());
        }
        let gpa = gfn.gpa();
        self.block_and_track(HookOp::RemoveLeaf, gpa, level)
            .map_err(|err| self.fail(err))?;
        if let Err(status) = self.retry(|| self.module.page_remove(gpa, level)) {
            // The leaf stays: unblock it, so the S-EPT is as it was.
            self.unblock(gpa, level);
            return Err(self.fail(from_status(
                HookOp::RemoveLeaf,
                Seamcall::MemPageRemove,
                status,
            )));
        }
        // The page is the host's again only after WBINVD; until then (or if
        // it fails) it keeps its PAMT reference and is never reused.
        if self.flush(page, pages) && level == Level::L4K {
            self.pamt.put(page);
        }
        Ok(())
    }

    fn free_table(&self, gfn: Gfn, level: Level, table: TableRef) -> Result<(), HookError> {
        let page = table
            .external
            .ok_or_else(|| refused(HookOp::FreeTable, "a mirror table without an S-EPT page"))?;
        if self.torn_down.load(Ordering::Acquire) {
            if let Err(status) = self.retry(|| self.module.page_reclaim(page)) {
                self.leaked.fetch_add(1, Ordering::Relaxed);
                return Err(self.fail(from_status(
                    HookOp::FreeTable,
                    Seamcall::PhymemPageReclaim,
                    status,
                )));
            }
        } else {
            let gpa = gfn.gpa();
            let parent = Level::new(level.get() + 1)
                .ok_or_else(|| refused(HookOp::FreeTable, "the root"))?;
            self.block_and_track(HookOp::FreeTable, gpa, parent)
                .map_err(|err| self.fail(err))?;
            if let Err(status) = self.retry(|| self.module.sept_remove(gpa, level)) {
                self.unblock(gpa, parent);
                return Err(self.fail(from_status(
                    HookOp::FreeTable,
                    Seamcall::MemSeptRemove,
                    status,
                )));
            }
            if !self.flush(page, 1) {
                return Err(self.fail(refused(
                    HookOp::FreeTable,
                    "TDH.PHYMEM.PAGE.WBINVD of an S-EPT page",
                )));
            }
        }
        if self.policy == PamtPolicy::OnInstall {
            self.pamt.put(page);
        }
        Ok(())
    }

    fn split_leaf(
        &self,
        gfn: Gfn,
        level: Level,
        old: Entry,
        new_table: TableRef,
        exclusive: bool,
    ) -> Result<(), HookError> {
        if !exclusive {
            return Err(self.fail(refused(
                HookOp::SplitLeaf,
                "TDH.MEM.PAGE.DEMOTE needs the MMU lock held for write",
            )));
        }
        let sept = new_table
            .external
            .ok_or_else(|| refused(HookOp::SplitLeaf, "a mirror table without an S-EPT page"))?;
        let gpa = gfn.gpa();
        let page = Hpa(old.addr(level));
        self.block_and_track(HookOp::SplitLeaf, gpa, level)
            .map_err(|err| self.fail(err))?;
        // Past the BLOCK, a failure unblocks the entry, so the S-EPT is left
        // as it was.
        let undo = |err: HookError| {
            if let Err(status) = self.retry(|| self.module.range_unblock(gpa, level)) {
                tracing::error!(gpa = gpa.0, %status, "TDH.MEM.RANGE.UNBLOCK after a failed DEMOTE");
            }
            self.fail(err)
        };
        if self.policy == PamtPolicy::OnInstall
            && let Err(err) = self.pamt_get(HookOp::SplitLeaf, sept, 1, None)
        {
            return Err(undo(err));
        }
        let release_sept = || {
            if self.policy == PamtPolicy::OnInstall {
                self.pamt.put(sept);
            }
        };
        // A 2 MiB page: DEMOTE takes the 4K PAMT pair of its range.
        let pair = if level == Level::L2M {
            let mut cache = self.split_cache.lock().unwrap_or_else(|p| p.into_inner());
            match self.pamt.take_pair(&mut cache) {
                Ok(pair) => Some(pair),
                Err(err) => {
                    release_sept();
                    return Err(undo(refused(HookOp::SplitLeaf, err.to_string())));
                }
            }
        } else {
            None
        };
        let operands = pair
            .as_ref()
            .map(|pair| [Hpa(pair[0].addr() as u64), Hpa(pair[1].addr() as u64)]);
        match self.retry(|| self.module.page_demote(gpa, level, sept, operands)) {
            Ok(()) => {
                if let Some(pair) = pair {
                    self.pamt.adopt(page, pair, 512);
                }
                Ok(())
            }
            Err(status) => {
                if let Some(pair) = pair {
                    let mut cache = self.split_cache.lock().unwrap_or_else(|p| p.into_inner());
                    for page in pair {
                        cache.free(page);
                    }
                }
                release_sept();
                Err(undo(from_status(
                    HookOp::SplitLeaf,
                    Seamcall::MemPageDemote,
                    status,
                )))
            }
        }
    }

    fn teardown(&self) -> Result<(), HookError> {
        self.module
            .release_key()
            .map_err(|s| refused(HookOp::Teardown, format!("releasing the TD key: {s}")))?;
        self.torn_down.store(true, Ordering::Release);
        Ok(())
    }
}
