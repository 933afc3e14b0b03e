//! The `soft` accelerator: split's TDP MMU (a mirror over tdx-ext's software
//! TDX module when TDX is on) and software vCPU threads that write guest
//! memory through it. Its `dirty_log` and `idle` workloads migrate: a run
//! may start fresh or resume from a migration's state, and may send itself
//! to another refvmm.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use gmem::{GuestMemFile, View};
use migrate::{GuestMemoryMap, SoftDirtyLog};
use mmu_cache::PagePool;
use mmu_cache::alloc::ChunkAllocator;
use mmukit_private::slot_over_view;
use split::{Gfn, Gpa, LogMode, MmuConfig, TdpMmu, VcpuCaches};
use tdx_ext::pamt::PamtPolicy;
use tdx_ext::{Seamcall, SimTdxModule, TdxMirror};

use crate::config::{BackendName, Config, Fill, PamtPolicyName, Workload, layout};
use crate::engine::{
    PassPlan, PassProgress, RunError, create_memory, open_kvm, prefault, verify_log,
};
use crate::events::{Metrics, STOP, TIMED_OUT};
use crate::fill;
use crate::guest_error::GuestError;
use crate::migration::{self, Handover, SourcePlan, Switch, WorkloadState};
use crate::report::{CacheFigures, DirtyLog, Iteration, Report, SplitFigures, TdxFigures};

struct Td {
    module: Arc<SimTdxModule>,
    mirror: Arc<TdxMirror>,
}

/// Guest memory of a soft VM: the file, the guest view the software vCPUs
/// write through, and the prefault's rate.
#[derive(Debug)]
pub struct SoftMemory {
    file: GuestMemFile,
    view: Arc<View>,
    prefault_gib_s: Option<f64>,
}

impl SoftMemory {
    /// Creates (and prefaults) the memory `config` asks for.
    pub fn create(config: &Config) -> Result<Self, RunError> {
        let vm = if config.memory.backend == BackendName::GuestMemfd {
            Some(open_kvm()?)
        } else {
            None
        };
        let file = create_memory(config, vm.as_ref())?;
        let prefault_gib_s = prefault(config, &file)?;
        // Software vCPUs write real guest memory, at the host addresses the
        // MMU translates to.
        let view = Arc::new(file.map_guest(0, file.size())?);
        Ok(Self {
            file,
            view,
            prefault_gib_s,
        })
    }

    /// The memory as a migration reads and writes it.
    pub fn map(&self) -> GuestMemoryMap {
        GuestMemoryMap::new(vec![self.view.clone()])
    }
}

/// Where a run starts.
#[derive(Clone, Copy, Debug)]
pub enum Start {
    /// From the beginning.
    Fresh,
    /// Where a migrated VM's workload stood.
    Resumed(WorkloadState),
}

/// Runs the soft accelerator's workload.
pub fn run(
    config: &Config,
    metrics: &Metrics,
    migration: Option<&SourcePlan>,
) -> Result<Report, RunError> {
    if let Workload::Convert { .. } = config.workload.kind {
        return crate::convert::run(config, metrics);
    }
    let memory = SoftMemory::create(config)?;
    run_on(config, metrics, memory, Start::Fresh, migration)
}

/// Runs the workload on `memory` from `start`, migrating by `migration`.
pub fn run_on(
    config: &Config,
    metrics: &Metrics,
    memory: SoftMemory,
    start: Start,
    migration: Option<&SourcePlan>,
) -> Result<Report, RunError> {
    let mmu_config = MmuConfig {
        eager_split: config.mmu.eager_split,
        vcpu_cache_capacity: config.mmu.cache_capacity,
        ..MmuConfig::default()
    };
    let pool = PagePool::new(ChunkAllocator::anonymous());
    let td = if config.tdx.enabled {
        let policy = match config.tdx.pamt_policy {
            PamtPolicyName::OnInstall => PamtPolicy::OnInstall,
            PamtPolicyName::OnCacheEntry => PamtPolicy::OnCacheEntry,
        };
        let (module, mirror) = TdxMirror::finalized_on_sim(mmu_config.levels, policy)
            .map_err(RunError::tdx("finalizing the TD"))?;
        Some(Td { module, mirror })
    } else {
        None
    };
    let mmu = match &td {
        Some(td) => TdpMmu::with_hooks(pool, mmu_config, td.mirror.clone()),
        None => TdpMmu::new(pool, mmu_config),
    }
    .map_err(RunError::mmu("creating the MMU"))?;
    mmu.add_memslot(
        slot_over_view(0, Gfn(0), &memory.file, &memory.view).map_err(RunError::Memslot)?,
    )
    .map_err(RunError::mmu("adding the memslot"))?;
    let mut report = Report {
        accel: "soft".into(),
        backend: config.memory.backend.name().into(),
        vcpus: config.vcpus,
        memory_bytes: config.memory_bytes(),
        prefault_gib_s: memory.prefault_gib_s,
        transparent_huge_pages: memory.file.transparent_huge_pages(),
        workload: crate::workload_name(&config.workload).into(),
        ..Report::default()
    };
    let switch = Switch::default();
    let run = Run {
        config,
        metrics,
        mmu: &mmu,
        memory: &memory,
        start,
        migration,
        switch: &switch,
    };
    let end = match config.workload.kind {
        Workload::DirtyLog {
            iterations,
            bytes_per_vcpu_mib,
            write_percent,
        } => {
            let plan = PassPlan {
                iterations,
                share_bytes: bytes_per_vcpu_mib << 20,
                write_percent,
            };
            let (end, log, cache) = run.dirty_log(plan)?;
            report.dirty_log = Some(log);
            report.cache = Some(cache);
            end
        }
        Workload::Idle { duration_ms, fill } => {
            run.idle(Duration::from_millis(duration_ms), fill)?
        }
        _ => {
            return Err(RunError::Host {
                what: "workload.kind".into(),
                fix: "the soft accelerator runs dirty_log, convert and idle".into(),
            });
        }
    };
    report.tdx = td.as_ref().map(|td| TdxFigures {
        seamcalls: Seamcall::ALL.iter().map(|&s| td.module.calls(s)).sum(),
        pamt_pages: td.mirror.pamt().counters().pages_in_use,
    });
    if td.is_some() {
        tracing::debug!("TD teardown");
        mmu.teardown()
            .map_err(RunError::mmu("tearing the TD down"))?;
    }
    if let Some(plan) = migration {
        report.migration = Some(migration::source_figures(plan, switch.outcome()));
    }
    report.memory_pages = Some(crate::report::MemoryPages::of(&memory.file));
    report.exit = match end {
        End::Done(exit) => exit.into(),
        End::Stopped => "stopped by a signal".into(),
        End::Migrated => format!(
            "migrated to {}",
            migration.map_or_else(String::new, |p| p.address.to_string())
        ),
    };
    Ok(report)
}

/// One run's parts: what the workloads share.
struct Run<'a> {
    config: &'a Config,
    metrics: &'a Metrics,
    mmu: &'a TdpMmu,
    memory: &'a SoftMemory,
    start: Start,
    migration: Option<&'a SourcePlan>,
    switch: &'a Switch,
}

/// How a workload ended on this side.
enum End {
    /// It ran to its end here (after a failed migration too).
    Done(&'static str),
    /// A signal stopped it.
    Stopped,
    /// The destination took over.
    Migrated,
}

/// Where the host side and the vCPU threads meet: the barrier that starts
/// and ends each pass, the stop flag, the first failure a vCPU met, and
/// the migration, whose dirty log the vCPUs feed.
struct Meeting<'a> {
    barrier: Barrier,
    done: AtomicBool,
    failure: Mutex<Option<GuestError>>,
    switch: &'a Switch,
    /// Whether a migration may read the dirty log during a pass: then a
    /// write marks its page again after the store (a CPU sets the dirty
    /// bit with it), so a harvest between the translation and the store
    /// misses nothing.
    remark: bool,
}

impl Meeting<'_> {
    fn check(&self) -> Result<(), RunError> {
        match self
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            Some(why) => Err(RunError::Guest(why)),
            None => Ok(()),
        }
    }
}

/// The value pass `pass` writes (0 is the populate pass).
fn pass_value(pass: u32) -> u64 {
    u64::from(pass) + 1
}

impl Run<'_> {
    /// The dirty-log workload: vCPU threads write their shares pass after
    /// pass; the host checks the log each pass (but while a migration owns
    /// it), and at the end that every page holds what was written last.
    fn dirty_log(&self, plan: PassPlan) -> Result<(End, DirtyLog, CacheFigures), RunError> {
        let Run {
            config,
            metrics,
            mmu,
            memory,
            start,
            migration,
            switch,
        } = *self;
        let vcpus = config.vcpus as usize;
        let first_pass = match start {
            Start::Fresh => 0,
            Start::Resumed(state) => state.passes_done + 1,
        };
        let meeting = Meeting {
            barrier: Barrier::new(vcpus + 1),
            done: AtomicBool::new(false),
            failure: Mutex::new(None),
            switch,
            remark: migration.is_some(),
        };
        let mut log_report = DirtyLog::default();
        let started = Instant::now();
        let map = memory.map();
        let (end, caches) = std::thread::scope(|scope| -> Result<_, RunError> {
            let handles: Vec<_> = (0..vcpus as u64)
                .map(|id| {
                    let meeting = &meeting;
                    scope.spawn(move || vcpu_passes(mmu, config, plan, id, first_pass, meeting))
                })
                .collect();
            if let Some(plan) = migration {
                let map = &map;
                scope.spawn(move || {
                    let mut log = SoftDirtyLog::sharing(mmu, vec![0]);
                    migration::send(plan, config, map, &mut log, switch, started, metrics);
                });
            }
            let outcome = drive(
                mmu,
                config,
                plan,
                first_pass,
                &meeting,
                &mut log_report,
                metrics,
            );
            // A migration still waiting for the workload stops waiting.
            switch.abandon();
            // Every way out lets the vCPUs go: they leave at the next barrier.
            meeting.done.store(true, Ordering::Relaxed);
            meeting.barrier.wait();
            let caches: Vec<VcpuCaches> = handles
                .into_iter()
                .map(|h| h.join().expect("vCPU threads do not panic"))
                .collect();
            Ok((outcome?, caches))
        })?;
        if matches!(end, End::Done(_)) {
            verify_memory(&map, config, plan)?;
        }
        let mut cache = CacheFigures::default();
        for vcpu in &caches {
            for stats in [vcpu.tables.stats(), vcpu.headers.stats()] {
                cache.topups += stats.fills;
                cache.pages_taken += stats.obtained;
                cache.fallback_allocations += stats.empty_allocs;
            }
        }
        Ok((end, log_report, cache))
    }

    /// The idle workload: memory holds its fill, the vCPUs halt, the host
    /// waits for `duration` (less what the source idled) or a migration.
    fn idle(&self, duration: Duration, fill: Fill) -> Result<End, RunError> {
        let Run {
            config,
            metrics,
            mmu,
            memory,
            start,
            migration,
            switch,
        } = *self;
        let map = memory.map();
        let idled_before = match start {
            Start::Fresh => {
                fill::write(&map, fill, 0);
                Duration::ZERO
            }
            Start::Resumed(state) => {
                fill::verify(&map, fill, 0)?;
                Duration::from_millis(state.elapsed_ms)
            }
        };
        let started = Instant::now();
        switch.ready();
        std::thread::scope(|scope| {
            if let Some(plan) = migration {
                let map = &map;
                scope.spawn(move || {
                    let mut log = SoftDirtyLog::new(mmu, vec![0]);
                    migration::send(plan, config, map, &mut log, switch, started, metrics);
                });
            }
            let state = || WorkloadState {
                elapsed_ms: (idled_before + started.elapsed()).as_millis() as u64,
                ..WorkloadState::default()
            };
            let mut end = End::Done("idle time over");
            loop {
                if STOP.load(Ordering::Relaxed) {
                    end = End::Stopped;
                    break;
                }
                if idled_before + started.elapsed() >= duration {
                    break;
                }
                if switch.wants_stop()
                    && let Handover::Migrated(_) = switch.hand_over(vec![state().section()])
                {
                    return Ok(End::Migrated);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            if migration.is_some()
                && !switch.over()
                && let Handover::Migrated(_) = switch.hand_over(vec![state().section()])
            {
                return Ok(End::Migrated);
            }
            Ok(end)
        })
    }
}

/// One software vCPU: waits for each pass, writes (or reads) its share
/// through the MMU, and says it is done, until the host says stop.
fn vcpu_passes(
    mmu: &TdpMmu,
    config: &Config,
    plan: PassPlan,
    id: u64,
    first_pass: u32,
    meeting: &Meeting<'_>,
) -> VcpuCaches {
    let mut caches = mmu.new_vcpu_caches();
    let vcpus = u64::from(config.vcpus);
    let first = layout::shares_start(config.memory_bytes(), vcpus * plan.share_bytes)
        + id * plan.share_bytes;
    let mut pass = first_pass;
    loop {
        meeting.barrier.wait(); // go
        if meeting.done.load(Ordering::Relaxed) {
            return caches;
        }
        let remark = meeting.remark;
        let value = pass_value(pass);
        for i in 0..plan.share_bytes / 4096 {
            let gpa = Gpa(first + i * 4096);
            let result = if i % 100 < u64::from(plan.write_percent) {
                mmu.write(&mut caches, gpa).and_then(|hpa| {
                    // SAFETY: the MMU translated into the guest view, which
                    // outlives this thread.
                    unsafe { std::ptr::write_volatile(hpa.0 as *mut u64, value) };
                    if remark {
                        mmu.write(&mut caches, gpa)?;
                    }
                    Ok(())
                })
            } else {
                mmu.read(&mut caches, gpa).map(|hpa| {
                    // SAFETY: as above.
                    unsafe { std::ptr::read_volatile(hpa.0 as *const u64) };
                })
            };
            if let Err(err) = result {
                meeting
                    .failure
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert(GuestError::Access {
                        vcpu: id,
                        gpa: gpa.0,
                        source: err,
                    });
                break;
            }
        }
        pass += 1;
        meeting.barrier.wait(); // the pass is done
    }
}

/// The host side: the populate pass (fresh runs), dirty logging on, then
/// each pass checked against the log, stopping for a migration's
/// switch-over at a pass boundary.
fn drive(
    mmu: &TdpMmu,
    config: &Config,
    plan: PassPlan,
    first_pass: u32,
    meeting: &Meeting<'_>,
    report: &mut DirtyLog,
    metrics: &Metrics,
) -> Result<End, RunError> {
    let one_pass = || {
        meeting.barrier.wait(); // go
        meeting.barrier.wait(); // done
        meeting.check()
    };
    if first_pass == 0 {
        let start = Instant::now();
        one_pass()?;
        report.populate_s = start.elapsed().as_secs_f64();
    }
    report.pages_before_enable = Some(mmu.page_stats().into());
    let manual = config.mmu.manual_protect;
    let mode = if manual {
        LogMode::ManualInitiallySet
    } else {
        LogMode::Classic
    };
    let start = Instant::now();
    mmu.enable_dirty_logging(0, mode)
        .map_err(RunError::mmu("enabling dirty logging"))?;
    if manual {
        // Initially set: clear once, so the first pass's log holds its own
        // writes only.
        let log = mmu
            .get_dirty_log(0)
            .map_err(RunError::mmu("getting the dirty log"))?;
        mmu.clear_dirty_log(0, 0, &log)
            .map_err(RunError::mmu("clearing the dirty log"))?;
    }
    report.enable_dirty_log_s = start.elapsed().as_secs_f64();
    report.pages_after_enable = Some(mmu.page_stats().into());
    meeting.switch.ready();
    let progress = PassProgress::new(
        plan.iterations,
        u64::from(config.vcpus) * plan.share_bytes * u64::from(plan.write_percent) / 100,
    );
    let shares_start = layout::shares_start(
        config.memory_bytes(),
        plan.total_share_bytes(config.vcpus as usize),
    );
    for iteration in first_pass.max(1)..=plan.iterations {
        if STOP.load(Ordering::Relaxed) {
            // Stopped by a signal: the report keeps the passes done.
            tracing::debug!(iteration, "stopped by a signal before this pass");
            return Ok(End::Stopped);
        }
        if TIMED_OUT.load(Ordering::Relaxed) {
            return Err(GuestError::TimedOut {
                done: iteration - 1,
                passes: plan.iterations,
            }
            .into());
        }
        if meeting.switch.wants_stop() {
            let state = WorkloadState {
                passes_done: iteration - 1,
                ..WorkloadState::default()
            };
            if let Handover::Migrated(_) = meeting.switch.hand_over(vec![state.section()]) {
                return Ok(End::Migrated);
            }
        }
        let epoch = meeting.switch.epoch();
        let migrating = meeting.switch.migrating();
        let start = Instant::now();
        one_pass()?;
        let dirty_s = start.elapsed().as_secs_f64();
        metrics.passes.fetch_add(1, Ordering::Relaxed);
        let mut pass = Iteration {
            dirty_s,
            ..Iteration::default()
        };
        // A pass that began while a migration owned the log, or that a
        // migration's harvest may have crossed, is not checked against it.
        let checked = if migrating {
            None
        } else {
            meeting
                .switch
                .unless_migrating(epoch, || read_pass_log(mmu, manual, &mut pass))
        };
        if let Some(log) = checked {
            verify_log(
                &log?,
                shares_start,
                config.vcpus as usize,
                plan.share_bytes,
                plan.write_percent,
                iteration,
            )?;
        }
        let counters = mmu.counters();
        metrics.faults.store(counters.faults, Ordering::Relaxed);
        metrics
            .splits
            .store(counters.splits + counters.lazy_splits, Ordering::Relaxed);
        tracing::debug!(iteration, dirty_s, "dirty-log pass");
        report.iterations.push(pass);
        progress.pass_done();
    }
    let counters = mmu.counters();
    report.splits = Some(SplitFigures {
        eager: counters.splits,
        lazy: counters.lazy_splits,
        fallbacks: counters.split_fallbacks,
    });
    // A migration still running switches over now, with every pass done.
    if meeting.remark && !meeting.switch.over() {
        let state = WorkloadState {
            passes_done: plan.iterations,
            ..WorkloadState::default()
        };
        if let Handover::Migrated(_) = meeting.switch.hand_over(vec![state.section()]) {
            return Ok(End::Migrated);
        }
    }
    Ok(End::Done("iterations done"))
}

/// Reads (and in manual mode clears) the log of a pass, timing both.
fn read_pass_log(mmu: &TdpMmu, manual: bool, pass: &mut Iteration) -> Result<Vec<u64>, RunError> {
    let start = Instant::now();
    let log = mmu
        .get_dirty_log(0)
        .map_err(RunError::mmu("getting the dirty log"))?;
    pass.get_dirty_log_s = start.elapsed().as_secs_f64();
    if manual {
        let start = Instant::now();
        mmu.clear_dirty_log(0, 0, &log)
            .map_err(RunError::mmu("clearing the dirty log"))?;
        pass.clear_dirty_log_s = start.elapsed().as_secs_f64();
    }
    pass.dirty_pages = log.iter().map(|w| u64::from(w.count_ones())).sum();
    Ok(log)
}

/// The guest's own check at the end: every page written holds the value of
/// the last pass.
fn verify_memory(memory: &GuestMemoryMap, config: &Config, plan: PassPlan) -> Result<(), RunError> {
    let vcpus = u64::from(config.vcpus);
    let shares_start = layout::shares_start(config.memory_bytes(), vcpus * plan.share_bytes);
    let expected = pass_value(plan.iterations);
    let mut page = vec![0u8; 4096];
    for vcpu in 0..vcpus {
        let first = (shares_start + vcpu * plan.share_bytes) / 4096;
        for i in 0..plan.share_bytes / 4096 {
            if i % 100 >= u64::from(plan.write_percent) {
                continue;
            }
            let frame = first + i;
            memory.read(frame, &mut page);
            let found = u64::from_ne_bytes(page[..8].try_into().expect("8 bytes"));
            if found != expected {
                return Err(GuestError::StaleMemory {
                    vcpu,
                    gpa: frame * 4096,
                    found,
                    expected,
                }
                .into());
            }
        }
    }
    Ok(())
}
