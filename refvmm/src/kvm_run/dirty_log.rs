//! The dirty-log workload on KVM (the kernel's dirty_log_perf_test): the
//! vCPUs write their shares each pass, and the host reads, clears and
//! checks the log.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::Instant;

use gmem::GuestRegion;
use gmem::consts::{
    KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{VcpuExit, VcpuFd};

use super::boot::{long_mode_tables, protected_mode, write_guest};
use super::{Stop, Vm, fault, stop_requested, unexpected_exit};
use crate::config::{Config, layout};
use crate::engine::{PassPlan, PassProgress, RunError, kvm_err, verify_log};
use crate::events::{self, Metrics, STOP};
use crate::guest_error::GuestError;
use crate::programs::{self, PASS_PORT};
use crate::report::{DirtyLog, Iteration};

/// Manual protect, with every bit initially set.
const MANUAL_PROTECT_FLAGS: u64 =
    (KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET) as u64;

/// Where the host and the vCPU threads meet: the barrier that starts and
/// ends each pass, the stop flag, and the first failure a vCPU met.
struct Meeting {
    barrier: Barrier,
    done: AtomicBool,
    failure: Mutex<Option<RunError>>,
}

impl Meeting {
    /// The first failure a vCPU recorded, if any.
    fn check(&self) -> Result<(), RunError> {
        match self
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }
}

/// Runs the workload's passes: the guest writes its shares, KVM logs them.
pub(super) fn dirty_log(
    config: &Config,
    vm: &Vm,
    plan: PassPlan,
    metrics: &Metrics,
) -> Result<DirtyLog, RunError> {
    let vcpus = config.vcpus as usize;
    let shares_start = layout::shares_start(config.memory_bytes(), plan.total_share_bytes(vcpus));
    let fds = create_vcpus(config, vm, plan, shares_start)?;
    let meeting = Arc::new(Meeting {
        barrier: Barrier::new(vcpus + 1),
        done: AtomicBool::new(false),
        failure: Mutex::new(None),
    });
    let mut result = DirtyLog::default();
    let outcome = std::thread::scope(|scope| {
        for (id, vcpu) in fds.into_iter().enumerate() {
            let meeting = meeting.clone();
            scope.spawn(move || vcpu_passes(vcpu, id as u64, &meeting, metrics));
        }
        let outcome = host_passes(
            config,
            vm,
            plan,
            shares_start,
            &meeting,
            &mut result,
            metrics,
        );
        // Every way out lets the vCPUs go: they leave at the next barrier.
        meeting.done.store(true, Ordering::Relaxed);
        meeting.barrier.wait();
        outcome
    });
    match outcome {
        // A signal stopped a pass: the report keeps the passes done (and
        // the populate and enable times).
        Err(RunError::Guest(why)) if STOP.load(Ordering::Relaxed) => {
            tracing::debug!(%why, passes = result.iterations.len(), "stopped by a signal");
            Ok(result)
        }
        other => other.map(|()| result),
    }
}

/// The vCPUs in long mode with paging over all of memory (shares may lie
/// past 4 GiB), each at the loop over its own share.
fn create_vcpus(
    config: &Config,
    vm: &Vm,
    plan: PassPlan,
    shares_start: u64,
) -> Result<Vec<VcpuFd>, RunError> {
    write_guest(&vm.region, layout::CODE, &programs::dirty_loop_64())?;
    long_mode_tables(&vm.region, config.memory_bytes())?;
    (0..u64::from(config.vcpus))
        .map(|id| {
            let vcpu = vm
                .vm
                .vm()
                .create_vcpu(id)
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            protected_mode(&vcpu, true)?;
            let mut regs = vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
            regs.rip = layout::CODE;
            regs.rflags = 2;
            regs.rsi = shares_start + id * plan.share_bytes;
            regs.rbx = plan.share_bytes / 4096;
            regs.rdx = u64::from(PASS_PORT);
            regs.rsp = u64::from(plan.write_percent);
            regs.rax = 1;
            vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
            Ok(vcpu)
        })
        .collect()
}

/// One vCPU thread: a pass of its share, then the barriers, until the host
/// says stop.
fn vcpu_passes(mut vcpu: VcpuFd, id: u64, meeting: &Meeting, metrics: &Metrics) {
    events::register_vcpu_thread();
    loop {
        let outcome = loop {
            match stop_requested(&vcpu, id) {
                Some(Stop::Signal) => break Err(GuestError::Stopped.into()),
                Some(Stop::Timeout(fault)) => break Err(fault),
                None => {}
            }
            let exit = vcpu.run();
            metrics.vcpu_exits.fetch_add(1, Ordering::Relaxed);
            let unexpected = match exit {
                Ok(VcpuExit::IoOut(PASS_PORT, _)) => break Ok(()),
                Ok(VcpuExit::IoOut(_, _)) => continue,
                Ok(VcpuExit::IoIn(_, data)) => {
                    data.fill(0xff);
                    continue;
                }
                Ok(other) => unexpected_exit(&other),
                Err(err) if err.errno() == libc::EINTR => continue,
                Err(source) => break Err(GuestError::KvmRun { vcpu: id, source }.into()),
            };
            break Err(fault(&mut vcpu, id, unexpected));
        };
        // A failure is only recorded: the host finds it after the pass and
        // alone decides to stop (`done`). A vCPU setting `done` itself could
        // make another, still reading it after the last barrier, leave a
        // pass early and strand the rest at the next barrier.
        if let Err(why) = outcome {
            meeting
                .failure
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert(why);
        }
        meeting.barrier.wait(); // the pass is done
        meeting.barrier.wait(); // go on, or stop
        if meeting.done.load(Ordering::Relaxed) {
            tracing::debug!("dirty-log vCPU stops");
            events::unregister_vcpu_thread();
            return;
        }
    }
}

/// The host side: wait for the populate pass, enable logging, then each
/// pass read, clear and check the log. The caller lets the vCPUs go
/// however this ends.
fn host_passes(
    config: &Config,
    vm: &Vm,
    plan: PassPlan,
    shares_start: u64,
    meeting: &Meeting,
    result: &mut DirtyLog,
    metrics: &Metrics,
) -> Result<(), RunError> {
    let start = Instant::now();
    meeting.barrier.wait();
    result.populate_s = start.elapsed().as_secs_f64();
    meeting.check()?;
    let manual = config.mmu.manual_protect;
    let start = Instant::now();
    if manual && let Err(err) = vm.vm.enable_manual_dirty_log_protect(MANUAL_PROTECT_FLAGS) {
        return Err(RunError::Host {
            what: format!("mmu.manual_protect: {err}"),
            fix: "turn manual_protect off on this host".into(),
        });
    }
    let slots: Vec<(u32, &Arc<GuestRegion>)> = std::iter::once((0, &vm.region))
        .chain(vm.high.as_ref().map(|high| (1, high)))
        .collect();
    for &(slot, region) in &slots {
        vm.vm
            .bind(slot, region.clone(), KVM_MEM_LOG_DIRTY_PAGES)
            .map_err(RunError::kvm("enabling dirty logging"))?;
    }
    result.enable_dirty_log_s = start.elapsed().as_secs_f64();
    let vcpus = config.vcpus as usize;
    let progress = PassProgress::new(
        plan.iterations,
        plan.total_share_bytes(vcpus) * u64::from(plan.write_percent) / 100,
    );
    for iteration in 1..=plan.iterations {
        let start = Instant::now();
        meeting.barrier.wait(); // go
        meeting.barrier.wait(); // pass done
        let dirty_s = start.elapsed().as_secs_f64();
        meeting.check()?;
        metrics.passes.fetch_add(1, Ordering::Relaxed);
        let (log, get_s, clear_s) = read_log(vm, &slots, manual)?;
        verify_log(
            &log,
            shares_start,
            vcpus,
            plan.share_bytes,
            plan.write_percent,
            iteration,
        )?;
        result.iterations.push(Iteration {
            dirty_s,
            get_dirty_log_s: get_s,
            clear_dirty_log_s: clear_s,
            dirty_pages: log.iter().map(|w| u64::from(w.count_ones())).sum(),
        });
        progress.pass_done();
    }
    Ok(())
}

/// One bitmap over guest memory in order (slot 0, 3 GiB at most and a
/// whole number of 64-page words, then slot 1), cleared in manual mode;
/// with the seconds the get and the clear took.
fn read_log(
    vm: &Vm,
    slots: &[(u32, &Arc<GuestRegion>)],
    manual: bool,
) -> Result<(Vec<u64>, f64, f64), RunError> {
    let start = Instant::now();
    let mut log = Vec::new();
    for &(slot, region) in slots {
        log.extend(
            vm.vm
                .dirty_log(slot, region.size())
                .map_err(RunError::kvm("getting the dirty log"))?,
        );
    }
    let get_s = start.elapsed().as_secs_f64();
    if !manual {
        return Ok((log, get_s, 0.0));
    }
    let start = Instant::now();
    let mut word = 0;
    for &(slot, region) in slots {
        let pages = region.size() / 4096;
        let words = pages.div_ceil(64) as usize;
        vm.vm
            .clear_dirty_log(slot, 0, pages as u32, &mut log[word..word + words])
            .map_err(RunError::kvm("clearing the dirty log"))?;
        word += words;
    }
    Ok((log, get_s, start.elapsed().as_secs_f64()))
}
