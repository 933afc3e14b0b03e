//! External page-table hooks: a mirror kept through the hooks stays
//! identical to the MMU's tree, and a failing hook leaves both unchanged.

mod common;

use split::{Gfn, Gpa, Hpa, Pfn};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use mmu_cache::PagePool;
use mmu_cache::alloc::{ChunkAllocator, CountingAllocator, PageAllocator};
use split::AccessKind;
use split::tdp::Access;
use split::{
    Entry, ExternalPageTable, HookError, HookOp, HookVcpuState, Level, LogMode, Memslot, MmuConfig,
    MmuError, TableRef, TdpMmu,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Link,
    SetLeaf,
    RemoveLeaf,
    FreeTable,
    SplitLeaf,
}

/// The failure a test injected into a hook.
#[derive(Debug, thiserror::Error)]
#[error("injected failure of {0:?}")]
struct Injected(Op);

#[derive(Default)]
struct MirrorState {
    leaves: HashMap<(Gfn, u8), Entry>,
    tables: HashSet<(Gfn, u8, Hpa)>,
    /// Fail `op` this many more times, with Busy or Refused.
    fail: Option<(Op, u32, bool)>,
    calls: Vec<Op>,
    /// For each split, whether the MMU held its lock for write.
    exclusive_splits: Vec<bool>,
}

/// An external page table that records what the hooks tell it.
#[derive(Clone, Default)]
struct Mirror(Arc<Mutex<MirrorState>>);

impl Mirror {
    fn state(&self) -> std::sync::MutexGuard<'_, MirrorState> {
        self.0.lock().unwrap()
    }

    fn fail(&self, op: Op, times: u32, busy: bool) {
        self.state().fail = Some((op, times, busy));
    }

    fn check(&self, op: Op) -> Result<(), HookError> {
        let mut state = self.state();
        state.calls.push(op);
        if let Some((failing, times, busy)) = state.fail
            && failing == op
            && times > 0
        {
            state.fail = Some((failing, times - 1, busy));
            let hook = match op {
                Op::Link => HookOp::LinkTable,
                Op::SetLeaf => HookOp::SetLeaf,
                Op::RemoveLeaf => HookOp::RemoveLeaf,
                Op::FreeTable => HookOp::FreeTable,
                Op::SplitLeaf => HookOp::SplitLeaf,
            };
            return Err(if busy {
                HookError::busy(hook, Injected(op))
            } else {
                HookError::refused(hook, Injected(op))
            });
        }
        Ok(())
    }

    fn leaves(&self) -> HashMap<(Gfn, u8), Entry> {
        self.state().leaves.clone()
    }

    fn tables(&self) -> usize {
        self.state().tables.len()
    }

    /// The address of the 4K-level table linked for `gfn`'s 2 MiB region.
    fn leaf_table(&self, gfn: Gfn) -> Option<Hpa> {
        let region = gfn.align_down(512);
        self.state()
            .tables
            .iter()
            .find(|&&(g, level, _)| level == 1 && g == region)
            .map(|&(_, _, hpa)| hpa)
    }
}

impl ExternalPageTable for Mirror {
    fn link_table(
        &self,
        gfn: Gfn,
        level: Level,
        table: TableRef,
        _vcpu: Option<&mut dyn HookVcpuState>,
    ) -> Result<(), HookError> {
        self.check(Op::Link)?;
        self.state().tables.insert((gfn, level.get(), table.hpa));
        Ok(())
    }

    fn set_leaf(
        &self,
        gfn: Gfn,
        level: Level,
        entry: Entry,
        _vcpu: Option<&mut dyn HookVcpuState>,
    ) -> Result<(), HookError> {
        self.check(Op::SetLeaf)?;
        let old = self.state().leaves.insert((gfn, level.get()), entry);
        assert!(old.is_none(), "set_leaf over a leaf at {gfn:#x}");
        Ok(())
    }

    fn remove_leaf(&self, gfn: Gfn, level: Level, old: Entry) -> Result<(), HookError> {
        self.check(Op::RemoveLeaf)?;
        let removed = self.state().leaves.remove(&(gfn, level.get()));
        assert_eq!(removed.map(|e| e.addr(level)), Some(old.addr(level)));
        Ok(())
    }

    fn free_table(&self, gfn: Gfn, level: Level, table: TableRef) -> Result<(), HookError> {
        self.check(Op::FreeTable)?;
        assert!(
            self.state().tables.remove(&(gfn, level.get(), table.hpa)),
            "free of an unknown table"
        );
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
        self.check(Op::SplitLeaf)?;
        let below = level.below().unwrap();
        let mut state = self.state();
        state.exclusive_splits.push(exclusive);
        assert!(state.leaves.remove(&(gfn, level.get())).is_some());
        for i in 0..512 {
            state.leaves.insert(
                (gfn + i as u64 * below.entry_pages(), below.get()),
                old.split_child(level, i),
            );
        }
        state.tables.insert((gfn, below.get(), new_table.hpa));
        Ok(())
    }
}

fn mirrored_mmu() -> (Arc<CountingAllocator<ChunkAllocator>>, Mirror, TdpMmu) {
    mirrored_mmu_with(MmuConfig::default())
}

fn mirrored_mmu_with(
    config: MmuConfig,
) -> (Arc<CountingAllocator<ChunkAllocator>>, Mirror, TdpMmu) {
    let counting = Arc::new(CountingAllocator::new(ChunkAllocator::anonymous()));
    let pool = PagePool::from_shared(counting.clone(), None);
    let mirror = Mirror::default();
    let mmu = TdpMmu::with_hooks(pool, config, Arc::new(mirror.clone())).unwrap();
    // 8 MiB at gpa 0.
    mmu.add_memslot(Memslot::new(0, Gfn(0), 2048, Pfn(0x40000)).unwrap())
        .unwrap();
    (counting, mirror, mmu)
}

/// The mirror holds exactly the MMU's leaves, and as many tables.
fn assert_identical(mirror: &Mirror, mmu: &TdpMmu) {
    let leaves = mirror.leaves();
    let stats = common::checked_stats(mmu);
    assert_eq!(
        leaves.len() as u64,
        stats.pages_4k + stats.pages_2m + stats.pages_1g,
        "leaf count differs"
    );
    for (&(gfn, level), &entry) in &leaves {
        let t = mmu
            .translate(gfn.gpa())
            .expect("mirror leaf not in the MMU");
        assert_eq!(t.level.get(), level);
        assert_eq!(t.entry.addr(t.level), entry.addr(t.level), "gfn {gfn:#x}");
        assert_eq!(t.entry.perms(), entry.perms());
    }
    assert_eq!(mirror.tables(), mmu.live_tables(), "table count differs");
}

#[test]
fn the_mirror_follows_faults_splits_and_zaps() {
    let (_, mirror, mmu) = mirrored_mmu();
    let mut vcpu = mmu.new_vcpu_caches();
    for gpa in (0..8u64 << 20).step_by(2 << 20) {
        mmu.fault(&mut vcpu, Gpa(gpa), AccessKind::Write).unwrap();
    }
    assert_identical(&mirror, &mmu);
    mmu.split_huge_pages(Gfn(0), Gfn(1024), Level::L4K).unwrap();
    assert_identical(&mirror, &mmu);
    mmu.zap_range(Gfn(0), Gfn(512)).unwrap();
    assert_identical(&mirror, &mmu);
    mmu.enable_dirty_logging(0, LogMode::Classic).unwrap();
    mmu.fault(&mut vcpu, Gpa(0x3000), AccessKind::Write)
        .unwrap();
    assert_identical(&mirror, &mmu);
    mmu.zap_range(Gfn(0), Gfn(2048)).unwrap();
    assert_identical(&mirror, &mmu);
    assert!(mirror.leaves().is_empty());
}

#[test]
fn a_refused_set_leaf_leaves_both_unchanged() {
    let (counting, mirror, mmu) = mirrored_mmu();
    let mut vcpu = mmu.new_vcpu_caches();
    mmu.fault(&mut vcpu, Gpa(0), AccessKind::Write).unwrap();
    let stats = mmu.page_stats();
    let tables = mmu.live_tables();
    mirror.fail(Op::SetLeaf, 1, false);
    let err = mmu
        .fault(&mut vcpu, Gpa(2 << 20), AccessKind::Write)
        .unwrap_err();
    let MmuError::Hook(hook) = &err else {
        panic!("{err}")
    };
    assert_eq!(hook.op(), HookOp::SetLeaf);
    assert!(!hook.is_busy());
    assert!(
        matches!(hook.cause::<Injected>(), Some(Injected(Op::SetLeaf))),
        "the cause survives"
    );
    assert_eq!(mmu.translate(Gpa(2 << 20)), None);
    assert_eq!(mmu.page_stats(), stats);
    assert_eq!(mmu.live_tables(), tables);
    assert_identical(&mirror, &mmu);
    // The next attempt goes through.
    mmu.fault(&mut vcpu, Gpa(2 << 20), AccessKind::Write)
        .unwrap();
    assert_identical(&mirror, &mmu);
    drop(vcpu);
    drop(mmu);
    assert_eq!(counting.pages_outstanding(), 0);
}

#[test]
fn a_busy_hook_is_retried() {
    let (_, mirror, mmu) = mirrored_mmu();
    let mut vcpu = mmu.new_vcpu_caches();
    mirror.fail(Op::SetLeaf, 3, true);
    mmu.fault(&mut vcpu, Gpa(0), AccessKind::Write).unwrap();
    assert_eq!(mmu.counters().retries, 3);
    assert_identical(&mirror, &mmu);
}

#[test]
fn a_refused_link_returns_the_table_page_and_links_nothing() {
    let (counting, mirror, mmu) = mirrored_mmu();
    let mut vcpu = mmu.new_vcpu_caches();
    mirror.fail(Op::Link, 1, false);
    assert!(
        mmu.fault(&mut vcpu, Gpa(0x5000), AccessKind::Write)
            .is_err()
    );
    assert_eq!(mmu.live_tables(), 0);
    assert_eq!(mmu.translate(Gpa(0x5000)), None);
    assert_identical(&mirror, &mmu);
    mmu.fault(&mut vcpu, Gpa(0x5000), AccessKind::Write)
        .unwrap();
    assert_identical(&mirror, &mmu);
    drop(vcpu);
    drop(mmu);
    assert_eq!(counting.pages_outstanding(), 0);
}

#[test]
fn a_refused_split_keeps_the_huge_leaf_in_both() {
    let (counting, mirror, mmu) = mirrored_mmu();
    let mut vcpu = mmu.new_vcpu_caches();
    mmu.fault(&mut vcpu, Gpa(0), AccessKind::Write).unwrap();
    let before = mmu.translate(Gpa(0x1000)).unwrap();
    mirror.fail(Op::SplitLeaf, 1, false);
    assert!(mmu.split_huge_pages(Gfn(0), Gfn(512), Level::L4K).is_err());
    assert_eq!(mmu.translate(Gpa(0x1000)), Some(before));
    assert_eq!(mmu.page_stats().pages_2m, 1);
    assert_identical(&mirror, &mmu);
    assert_eq!(
        mmu.split_huge_pages(Gfn(0), Gfn(512), Level::L4K).unwrap(),
        1
    );
    assert_identical(&mirror, &mmu);
    drop(vcpu);
    drop(mmu);
    assert_eq!(counting.pages_outstanding(), 0);
}

#[test]
fn a_refused_remove_stops_the_zap_where_it_is() {
    let (_, mirror, mmu) = mirrored_mmu();
    let mut vcpu = mmu.new_vcpu_caches();
    for gpa in (0..8u64 << 20).step_by(2 << 20) {
        mmu.fault(&mut vcpu, Gpa(gpa), AccessKind::Write).unwrap();
    }
    mirror.fail(Op::RemoveLeaf, 1, false);
    assert!(mmu.zap_range(Gfn(0), Gfn(2048)).is_err());
    // Nothing was removed from either side.
    assert_eq!(mmu.page_stats().pages_2m, 4);
    assert_identical(&mirror, &mmu);
    // The whole address space: the now empty tables are freed too.
    mmu.zap_range(Gfn(0), Gfn(1 << 36)).unwrap();
    assert_identical(&mirror, &mmu);
    assert_eq!(mmu.live_tables(), 0);
    assert!(mirror.state().calls.contains(&Op::FreeTable));
}

/// A write fault on a write-protected huge leaf splits it through the
/// `split_leaf` hook alone (no remove-then-link pair), under the read lock.
/// Refused, both trees keep the huge leaf; busy, the fault retries.
#[test]
fn a_failing_lazy_split_leaves_both_trees_as_they_were() {
    let (counting, mirror, mmu) = mirrored_mmu_with(MmuConfig {
        eager_split: false,
        ..MmuConfig::default()
    });
    let mut vcpu = mmu.new_vcpu_caches();
    mmu.fault(&mut vcpu, Gpa(0), AccessKind::Read).unwrap();
    mmu.enable_dirty_logging(0, LogMode::ManualInitiallySet)
        .unwrap();
    mmu.clear_dirty_log(0, 0, &[1]).unwrap(); // write-protects the 2M leaf
    let before = mmu.translate(Gpa(0x5000)).unwrap();
    let tables = mmu.live_tables();
    mirror.fail(Op::SplitLeaf, 1, false);
    let err = mmu
        .fault(&mut vcpu, Gpa(0x5000), AccessKind::Write)
        .unwrap_err();
    assert!(
        matches!(err, MmuError::Hook(HookError::Refused { .. })),
        "{err}"
    );
    assert_eq!(
        mmu.translate(Gpa(0x5000)),
        Some(before),
        "the huge leaf stays"
    );
    assert_eq!(mmu.live_tables(), tables);
    assert_eq!(mirror.leaves().len(), 1);
    assert_eq!(mirror.tables(), tables);
    assert!(!mirror.state().calls.contains(&Op::RemoveLeaf));
    mirror.fail(Op::SplitLeaf, 2, true);
    mmu.fault(&mut vcpu, Gpa(0x5000), AccessKind::Write)
        .unwrap();
    assert_eq!(mmu.counters().lazy_splits, 1);
    assert_eq!(mirror.leaves().len(), 512, "all 512 children, in both");
    assert_eq!(mirror.state().exclusive_splits, vec![false]);
    assert_eq!(mirror.tables(), mmu.live_tables());
    drop(vcpu);
    drop(mmu);
    assert_eq!(counting.pages_outstanding(), 0);
}

/// A refused free of an emptied table stops the zap with the table still
/// linked on both sides; the next zap frees it.
#[test]
fn a_refused_table_free_keeps_the_table_in_both() {
    let (_, mirror, mmu) = mirrored_mmu();
    let mut vcpu = mmu.new_vcpu_caches();
    mmu.fault(&mut vcpu, Gpa(0), AccessKind::Write).unwrap();
    mmu.split_huge_pages(Gfn(0), Gfn(512), Level::L4K).unwrap();
    let tables = mmu.live_tables();
    mirror.fail(Op::FreeTable, 1, false);
    assert!(mmu.zap_range(Gfn(0), Gfn(1 << 36)).is_err());
    assert_eq!(mmu.page_stats().pages_4k, 0, "the leaves went from both");
    assert!(mirror.leaves().is_empty());
    assert_eq!(mmu.live_tables(), tables, "the refused table stays linked");
    assert_eq!(mirror.tables(), tables);
    mmu.zap_range(Gfn(0), Gfn(1 << 36)).unwrap();
    assert_eq!((mmu.live_tables(), mirror.tables()), (0, 0));
}

/// Disabling dirty logging zaps through the hooks; a refused removal there
/// leaves both trees alike and is reported.
#[test]
fn a_refused_remove_while_disabling_dirty_logging_leaves_both_alike() {
    let (_, mirror, mmu) = mirrored_mmu();
    let mut vcpu = mmu.new_vcpu_caches();
    mmu.fault(&mut vcpu, Gpa(0), AccessKind::Write).unwrap();
    mmu.enable_dirty_logging(0, LogMode::Classic).unwrap();
    mmu.fault(&mut vcpu, Gpa(0x3000), AccessKind::Write)
        .unwrap();
    mirror.fail(Op::RemoveLeaf, 1, false);
    assert!(mmu.disable_dirty_logging(0).is_err());
    assert_identical(&mirror, &mmu);
    mmu.disable_dirty_logging(0).unwrap();
    assert_identical(&mirror, &mmu);
    assert!(mirror.leaves().is_empty());
}

/// Hooks that ask for an external page per table and record them.
#[derive(Default)]
struct RecorderState {
    live: HashSet<Hpa>,
    torn_down: bool,
    refused: u32,
    topups: u32,
}

#[derive(Clone, Default)]
struct ExternalRecorder {
    state: Arc<Mutex<RecorderState>>,
}

impl ExternalRecorder {
    fn live(&self) -> usize {
        self.state.lock().unwrap().live.len()
    }
}

impl ExternalPageTable for ExternalRecorder {
    fn external_tables(&self) -> bool {
        true
    }

    fn topup(
        &self,
        _need: split::Topup,
        _vcpu: Option<&mut dyn HookVcpuState>,
    ) -> Result<(), HookError> {
        self.state.lock().unwrap().topups += 1;
        Ok(())
    }

    fn link_table(
        &self,
        _gfn: Gfn,
        _level: Level,
        table: TableRef,
        _vcpu: Option<&mut dyn HookVcpuState>,
    ) -> Result<(), HookError> {
        let external = table.external.expect("an external page for every table");
        assert_ne!(external, table.hpa);
        assert!(self.state.lock().unwrap().live.insert(external));
        Ok(())
    }

    fn free_table(&self, _gfn: Gfn, _level: Level, table: TableRef) -> Result<(), HookError> {
        let mut state = self.state.lock().unwrap();
        // After teardown, refuse the first table: its page must be leaked.
        if state.torn_down && state.refused == 0 {
            state.refused += 1;
            return Err(HookError::refused(HookOp::FreeTable, "reclaim"));
        }
        assert!(state.live.remove(&table.external.unwrap()));
        Ok(())
    }

    fn split_leaf(
        &self,
        _gfn: Gfn,
        _level: Level,
        _old: Entry,
        new_table: TableRef,
        _exclusive: bool,
    ) -> Result<(), HookError> {
        let external = new_table
            .external
            .expect("an external page for every table");
        assert!(self.state.lock().unwrap().live.insert(external));
        Ok(())
    }

    fn teardown(&self) -> Result<(), HookError> {
        self.state.lock().unwrap().torn_down = true;
        Ok(())
    }
}

#[test]
fn external_pages_follow_tables_and_a_refused_reclaim_leaks_one() {
    let counting = Arc::new(CountingAllocator::new(ChunkAllocator::anonymous()));
    let pool = PagePool::from_shared(counting.clone(), None);
    let hooks = ExternalRecorder::default();
    let mmu = TdpMmu::with_hooks(pool, MmuConfig::default(), Arc::new(hooks.clone())).unwrap();
    assert!(mmu.has_external_tables());
    mmu.add_memslot(Memslot::new(0, Gfn(0), 4096, Pfn(0x40000)).unwrap())
        .unwrap();
    let mut vcpu = mmu.new_vcpu_caches();
    mmu.fault(&mut vcpu, Gpa(0), AccessKind::Write).unwrap();
    assert_eq!(hooks.live(), mmu.live_tables());
    assert!(
        hooks.state.lock().unwrap().topups >= 1,
        "topped up before the lock"
    );
    mmu.split_huge_pages(Gfn(0), Gfn(4096), Level::L4K).unwrap();
    assert_eq!(hooks.live(), mmu.live_tables());
    mmu.zap_range(Gfn(0), Gfn(1 << 36)).unwrap();
    assert_eq!((hooks.live(), mmu.live_tables()), (0, 0));
    for gpa in (0..16u64 << 20).step_by(2 << 20) {
        mmu.fault(&mut vcpu, Gpa(gpa), AccessKind::Write).unwrap();
    }
    let tables = mmu.live_tables() as u64;
    let report = mmu.teardown().unwrap();
    assert_eq!(report.tables, tables);
    assert_eq!(report.external_leaked, 1);
    assert_eq!(mmu.counters().external_leaked, 1);
    assert_eq!(mmu.live_tables(), 0);
    assert_eq!(mmu.teardown().unwrap(), split::TeardownReport::default());
    vcpu.free_all();
    drop(vcpu);
    drop(mmu);
    assert_eq!(
        counting.pages_outstanding(),
        1,
        "only the leaked page is out"
    );
}

/// A thread's walk cache remembers the leaf table of its last access. Once
/// a zap frees that table and a fault links another one for the region, an
/// access must go through the new table, not the freed one.
#[test]
fn an_access_after_its_table_was_freed_walks_the_new_one() {
    let mirror = Mirror::default();
    let pool = PagePool::new(ChunkAllocator::anonymous());
    let mmu = TdpMmu::with_hooks(pool, MmuConfig::default(), Arc::new(mirror.clone())).unwrap();
    // 64 MiB with host frames that are not 2M-aligned: 4K leaves only.
    mmu.add_memslot(Memslot::new(0, Gfn(0), 16384, Pfn(0x40001)).unwrap())
        .unwrap();
    let mut vcpu = mmu.new_vcpu_caches();
    mmu.fault(&mut vcpu, Gpa(0), AccessKind::Write).unwrap();
    let freed = mirror.leaf_table(Gfn(0)).unwrap();
    assert!(matches!(
        mmu.access(&mut vcpu, Gpa(0), AccessKind::Write),
        Access::Hit(_)
    ));
    mmu.zap_range(Gfn(0), Gfn(512)).unwrap();
    assert_eq!(mirror.leaf_table(Gfn(0)), None, "the zap freed the table");
    assert_eq!(
        mmu.access(&mut vcpu, Gpa(0), AccessKind::Write),
        Access::Miss
    );
    mmu.fault(&mut vcpu, Gpa(0x5000), AccessKind::Write)
        .unwrap();
    let linked = mirror.leaf_table(Gfn(0)).unwrap();
    assert_ne!(linked, freed, "the region has a new table");
    let hpa = mmu.translate(Gpa(0x5000)).unwrap().hpa;
    assert_eq!(
        mmu.access(&mut vcpu, Gpa(0x5000), AccessKind::Write),
        Access::Hit(hpa)
    );
    assert_eq!(
        mmu.access(&mut vcpu, Gpa(0), AccessKind::Read),
        Access::Miss
    );
    assert_identical(&mirror, &mmu);
}

/// Hooks that, from inside a split (with the MMU's lock held by the
/// splitter), fault another region on another thread and wait for it.
struct FaultDuringSplit {
    mmu: Arc<std::sync::OnceLock<Arc<TdpMmu>>>,
    faulted_meanwhile: Arc<Mutex<Vec<bool>>>,
}

impl ExternalPageTable for FaultDuringSplit {
    fn split_leaf(
        &self,
        _gfn: Gfn,
        _level: Level,
        _old: Entry,
        _new_table: TableRef,
        exclusive: bool,
    ) -> Result<(), HookError> {
        assert!(
            !exclusive,
            "no external tables: the split holds the read lock"
        );
        let mmu = self.mmu.get().expect("set").clone();
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut vcpu = mmu.new_vcpu_caches();
            let result = mmu
                .fault(&mut vcpu, Gpa(6 << 20), AccessKind::Write)
                .map(|_| ());
            let _ = done.send(result.is_ok());
        });
        let faulted = finished
            .recv_timeout(std::time::Duration::from_secs(10))
            .unwrap_or(false);
        self.faulted_meanwhile.lock().unwrap().push(faulted);
        Ok(())
    }
}

/// The kernel's eager split runs under the read lock with
/// compare-and-exchange: a vCPU fault elsewhere in the slot completes while
/// the split is in progress.
#[test]
fn a_vcpu_fault_completes_while_an_eager_split_is_in_progress() {
    let cell = Arc::new(std::sync::OnceLock::new());
    let faulted = Arc::new(Mutex::new(Vec::new()));
    let hooks = FaultDuringSplit {
        mmu: cell.clone(),
        faulted_meanwhile: faulted.clone(),
    };
    let pool = PagePool::new(ChunkAllocator::anonymous());
    let mmu = Arc::new(TdpMmu::with_hooks(pool, MmuConfig::default(), Arc::new(hooks)).unwrap());
    assert!(cell.set(mmu.clone()).is_ok(), "set once");
    mmu.add_memslot(Memslot::new(0, Gfn(0), 2048, Pfn(0x40000)).unwrap())
        .unwrap();
    let mut vcpu = mmu.new_vcpu_caches();
    mmu.fault(&mut vcpu, Gpa(0), AccessKind::Write).unwrap();
    mmu.enable_dirty_logging(0, LogMode::Classic).unwrap();
    assert_eq!(*faulted.lock().unwrap(), vec![true]);
    let stats = common::checked_stats(&mmu);
    assert_eq!(stats.pages_4k, 513, "512 split children and the 4K fault");
}
