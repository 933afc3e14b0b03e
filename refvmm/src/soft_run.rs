//! The `soft` accelerator: split's TDP MMU (a mirror over tdx-ext's software
//! TDX module when TDX is on) and software vCPU threads that write guest
//! memory through it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::Instant;

use mmu_cache::PagePool;
use mmu_cache::alloc::ChunkAllocator;
use mmukit_private::slot_over_view;
use split::{Gfn, Gpa, LogMode, MmuConfig, TdpMmu, VcpuCaches};
use tdx_ext::pamt::PamtPolicy;
use tdx_ext::{Seamcall, SimTdxModule, TdxMirror};

use crate::config::{BackendName, Config, PamtPolicyName, Workload, layout};
use crate::engine::{
    PassPlan, PassProgress, RunError, create_memory, open_kvm, prefault, verify_log,
};
use crate::events::{Metrics, STOP, TIMED_OUT};
use crate::guest_error::GuestError;
use crate::report::{CacheFigures, DirtyLog, Iteration, Report, SplitFigures, TdxFigures};

struct Td {
    module: Arc<SimTdxModule>,
    mirror: Arc<TdxMirror>,
}

/// Runs the dirty_log workload on the software MMU stack.
pub fn run(config: &Config, metrics: &Metrics) -> Result<Report, RunError> {
    if let Workload::Convert { .. } = config.workload.kind {
        return crate::convert::run(config, metrics);
    }
    let Workload::DirtyLog {
        iterations,
        bytes_per_vcpu_mib,
        write_percent,
    } = config.workload.kind
    else {
        return Err(RunError::Host {
            what: "workload.kind".into(),
            fix: "the soft accelerator runs only dirty_log".into(),
        });
    };
    let vm = if config.memory.backend == BackendName::GuestMemfd {
        Some(open_kvm()?)
    } else {
        None
    };
    let file = create_memory(config, vm.as_ref())?;
    let prefault_gib_s = prefault(config, &file)?;
    // Software vCPUs write real guest memory, at the host addresses the MMU
    // translates to.
    let view = file.map_guest(0, file.size())?;
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
    mmu.add_memslot(slot_over_view(0, Gfn(0), &file, &view).map_err(RunError::Memslot)?)
        .map_err(RunError::mmu("adding the memslot"))?;

    let share_bytes = bytes_per_vcpu_mib << 20;
    let vcpus = config.vcpus as usize;
    let barrier = Barrier::new(vcpus + 1);
    let done = AtomicBool::new(false);
    let failure: Mutex<Option<GuestError>> = Mutex::new(None);
    let mut log_report = DirtyLog::default();
    let mut cache = CacheFigures::default();
    let caches: Vec<VcpuCaches> =
        std::thread::scope(|scope| -> Result<Vec<VcpuCaches>, RunError> {
            let handles: Vec<_> = (0..vcpus as u64)
                .map(|id| {
                    let (mmu, barrier, done, failure) = (&mmu, &barrier, &done, &failure);
                    scope.spawn(move || {
                        let mut caches = mmu.new_vcpu_caches();
                        let first =
                            layout::shares_start(config.memory_bytes(), vcpus as u64 * share_bytes)
                                + id * share_bytes;
                        let mut value = 1u64;
                        loop {
                            for i in 0..share_bytes / 4096 {
                                let gpa = first + i * 4096;
                                let result = if i % 100 < u64::from(write_percent) {
                                    mmu.write(&mut caches, Gpa(gpa)).map(|hpa| {
                                        // SAFETY: the MMU translated into the
                                        // guest view, which outlives this thread.
                                        unsafe {
                                            std::ptr::write_volatile(hpa.0 as *mut u64, value)
                                        }
                                    })
                                } else {
                                    mmu.read(&mut caches, Gpa(gpa)).map(|hpa| {
                                        // SAFETY: as above.
                                        unsafe { std::ptr::read_volatile(hpa.0 as *const u64) };
                                    })
                                };
                                if let Err(err) = result {
                                    failure
                                        .lock()
                                        .unwrap_or_else(|p| p.into_inner())
                                        .get_or_insert(GuestError::Access {
                                            vcpu: id,
                                            gpa,
                                            source: err,
                                        });
                                    break;
                                }
                            }
                            value += 1;
                            barrier.wait();
                            barrier.wait();
                            if done.load(Ordering::Relaxed) {
                                return caches;
                            }
                        }
                    })
                })
                .collect();
            let passes = PassPlan {
                iterations,
                share_bytes,
                write_percent,
            };
            let meeting = Meeting {
                barrier: &barrier,
                failure: &failure,
            };
            let outcome = drive(&mmu, config, passes, meeting, &mut log_report, metrics);
            done.store(true, Ordering::Relaxed);
            barrier.wait();
            let caches: Vec<VcpuCaches> = handles
                .into_iter()
                .map(|h| h.join().expect("vCPU threads do not panic"))
                .collect();
            outcome?;
            Ok(caches)
        })?;
    for vcpu in &caches {
        for stats in [vcpu.tables.stats(), vcpu.headers.stats()] {
            cache.topups += stats.fills;
            cache.pages_taken += stats.obtained;
            cache.fallback_allocations += stats.empty_allocs;
        }
    }
    let tdx = td.as_ref().map(|td| TdxFigures {
        seamcalls: Seamcall::ALL.iter().map(|&s| td.module.calls(s)).sum(),
        pamt_pages: td.mirror.pamt().counters().pages_in_use,
    });
    if td.is_some() {
        tracing::debug!("TD teardown");
        mmu.teardown()
            .map_err(RunError::mmu("tearing the TD down"))?;
    }
    drop(caches);
    Ok(Report {
        accel: "soft".into(),
        backend: config.memory.backend.name().into(),
        vcpus: config.vcpus,
        memory_bytes: config.memory_bytes(),
        prefault_gib_s,
        transparent_huge_pages: file.transparent_huge_pages(),
        workload: "dirty_log".into(),
        dirty_log: Some(log_report),
        cache: Some(cache),
        tdx,
        serial_bytes: 0,
        vcpu_exits: 0,
        exit: "iterations done".into(),
        ..Report::default()
    })
}

/// Where the host side and the vCPU threads meet: the barrier that starts
/// and ends each pass, and the first failure a vCPU met.
#[derive(Clone, Copy)]
struct Meeting<'a> {
    barrier: &'a Barrier,
    failure: &'a Mutex<Option<GuestError>>,
}

/// The host side of the test: populate, enable, iterate, verify.
fn drive(
    mmu: &TdpMmu,
    config: &Config,
    passes: PassPlan,
    meeting: Meeting<'_>,
    report: &mut DirtyLog,
    metrics: &Metrics,
) -> Result<(), RunError> {
    let PassPlan {
        iterations,
        share_bytes,
        write_percent,
    } = passes;
    let Meeting { barrier, failure } = meeting;
    let check = || match failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
        Some(why) => Err(RunError::Guest(why)),
        None => Ok(()),
    };
    let start = Instant::now();
    barrier.wait();
    report.populate_s = start.elapsed().as_secs_f64();
    check()?;
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
    report.enable_dirty_log_s = start.elapsed().as_secs_f64();
    report.pages_after_enable = Some(mmu.page_stats().into());
    let progress = PassProgress::new(
        iterations,
        u64::from(config.vcpus) * share_bytes * u64::from(write_percent) / 100,
    );
    for iteration in 1..=iterations {
        if STOP.load(Ordering::Relaxed) {
            // Stopped by a signal: the report keeps the passes done.
            tracing::debug!(iteration, "stopped by a signal before this pass");
            break;
        }
        if TIMED_OUT.load(Ordering::Relaxed) {
            return Err(GuestError::TimedOut {
                done: iteration - 1,
                passes: iterations,
            }
            .into());
        }
        let start = Instant::now();
        barrier.wait();
        barrier.wait();
        let dirty_s = start.elapsed().as_secs_f64();
        metrics.passes.fetch_add(1, Ordering::Relaxed);
        check()?;
        let start = Instant::now();
        let log = mmu
            .get_dirty_log(0)
            .map_err(RunError::mmu("getting the dirty log"))?;
        let get_s = start.elapsed().as_secs_f64();
        let mut clear_s = 0.0;
        if manual {
            let start = Instant::now();
            mmu.clear_dirty_log(0, 0, &log)
                .map_err(RunError::mmu("clearing the dirty log"))?;
            clear_s = start.elapsed().as_secs_f64();
        }
        verify_log(
            &log,
            layout::shares_start(config.memory_bytes(), u64::from(config.vcpus) * share_bytes),
            config.vcpus as usize,
            share_bytes,
            write_percent,
            iteration,
        )?;
        let counters = mmu.counters();
        metrics.faults.store(counters.faults, Ordering::Relaxed);
        metrics
            .splits
            .store(counters.splits + counters.lazy_splits, Ordering::Relaxed);
        tracing::debug!(
            iteration,
            dirty_pages = log.iter().map(|w| u64::from(w.count_ones())).sum::<u64>(),
            dirty_s,
            "dirty-log pass"
        );
        report.iterations.push(Iteration {
            dirty_s,
            get_dirty_log_s: get_s,
            clear_dirty_log_s: clear_s,
            dirty_pages: log.iter().map(|w| u64::from(w.count_ones())).sum(),
        });
        progress.pass_done();
    }
    let counters = mmu.counters();
    report.splits = Some(SplitFigures {
        eager: counters.splits,
        lazy: counters.lazy_splits,
        fallbacks: counters.split_fallbacks,
    });
    Ok(())
}
