//! The dirty-log workload on KVM (the kernel's dirty_log_perf_test): the
//! vCPUs write their shares each pass, and the host reads, clears and
//! checks the log. It migrates at a pass boundary: every vCPU saves its
//! state there, and a destination restores them and runs the rest.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::Instant;

use gmem::GuestRegion;
use gmem::consts::{
    KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use migrate::KvmDirtyLog;

use super::boot::{long_mode_tables, protected_mode, write_guest};
use super::{Stop, Vm, fault, state, stop_requested, unexpected_exit};
use crate::config::{Config, layout};
use crate::engine::{PassPlan, PassProgress, RunError, kvm_err, verify_log};
use crate::events::{self, Metrics, STOP};
use crate::guest_error::GuestError;
use crate::migration::{self, Handover, SourcePlan, StateSections, Switch, WorkloadState};
use crate::programs::{self, PASS_PORT};
use crate::report::{DirtyLog, Iteration};

/// Manual protect, with every bit initially set.
const MANUAL_PROTECT_FLAGS: u64 =
    (KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET) as u64;

/// Where the host and the vCPU threads meet: the barrier that starts and
/// ends each pass, the stop flag, the first failure a vCPU met, and, for a
/// switch-over, the request that every vCPU save its state.
struct Meeting<'a> {
    barrier: Barrier,
    done: AtomicBool,
    failure: Mutex<Option<RunError>>,
    save: AtomicBool,
    saved: Mutex<Vec<(u64, Result<StateSections, RunError>)>>,
    switch: &'a Switch,
}

impl Meeting<'_> {
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

/// How the workload ended here.
pub(super) enum Ended {
    /// Every pass ran here (or a signal stopped it).
    Here,
    /// The destination took over.
    Migrated,
}

/// Runs the workload's passes from `start` (`None`: fresh, with the
/// populate pass; else the state a migration brought), migrating it by
/// `migration`.
pub(super) fn dirty_log(
    config: &Config,
    vm: &Vm,
    plan: PassPlan,
    metrics: &Metrics,
    start: Option<(&StateSections, WorkloadState)>,
    migration: Option<&SourcePlan>,
) -> Result<(DirtyLog, Ended, Option<Switch>), RunError> {
    let vcpus = config.vcpus as usize;
    let shares_start = layout::shares_start(config.memory_bytes(), plan.total_share_bytes(vcpus));
    let first_pass = start.map_or(0, |(_, workload)| workload.passes_done + 1);
    let mut result = DirtyLog::default();
    if first_pass > plan.iterations {
        // Every pass ran on the source: check what it left.
        verify_memory(vm, config, plan, shares_start)?;
        return Ok((result, Ended::Here, None));
    }
    let manual = config.mmu.manual_protect;
    if first_pass > 0 {
        // Resumed: the log is on before the vCPUs run their next pass.
        enable_logging(vm, manual, &mut result)?;
    }
    let fds = match start {
        None => create_vcpus(config, vm, plan, shares_start)?,
        Some((state, _)) => restore_vcpus(config, vm, state)?,
    };
    let switch = Switch::with_waker(events::kick_vcpus);
    let meeting = Meeting {
        barrier: Barrier::new(vcpus + 1),
        done: AtomicBool::new(false),
        failure: Mutex::new(None),
        save: AtomicBool::new(false),
        saved: Mutex::new(Vec::new()),
        switch: &switch,
    };
    let started = Instant::now();
    let outcome = std::thread::scope(|scope| {
        for (id, vcpu) in fds.into_iter().enumerate() {
            let meeting = &meeting;
            scope.spawn(move || vcpu_passes(vcpu, id as u64, meeting, metrics));
        }
        if let Some(plan) = migration {
            let switch = &switch;
            scope.spawn(move || {
                let map = vm.memory_map();
                let mut log = KvmDirtyLog::sharing(vm.vm.clone(), vm.slots(), manual);
                migration::send(plan, config, &map, &mut log, switch, started, metrics);
            });
        }
        let host = Host {
            config,
            vm,
            plan,
            shares_start,
            meeting: &meeting,
            metrics,
        };
        let outcome = host.passes(first_pass, &mut result, migration.is_some());
        // A migration still waiting for the workload stops waiting.
        switch.abandon();
        // Every other way out lets the vCPUs go: they leave at the next
        // barrier (after a take-over they left already).
        if !matches!(outcome, Ok(Ended::Migrated)) {
            meeting.done.store(true, Ordering::Relaxed);
            meeting.barrier.wait();
        }
        outcome
    });
    match outcome {
        Ok(ended) => {
            if matches!(ended, Ended::Here) && !STOP.load(Ordering::Relaxed) {
                verify_memory(vm, config, plan, shares_start)?;
            }
            Ok((result, ended, migration.map(|_| switch)))
        }
        // A signal stopped a pass: the report keeps the passes done (and
        // the populate and enable times).
        Err(RunError::Guest(why)) if STOP.load(Ordering::Relaxed) => {
            tracing::debug!(%why, passes = result.iterations.len(), "stopped by a signal");
            Ok((result, Ended::Here, migration.map(|_| switch)))
        }
        Err(err) => Err(err),
    }
}

/// Turns dirty logging on for every memslot (manual protect if asked).
fn enable_logging(vm: &Vm, manual: bool, result: &mut DirtyLog) -> Result<(), RunError> {
    let start = Instant::now();
    if manual && let Err(err) = vm.vm.enable_manual_dirty_log_protect(MANUAL_PROTECT_FLAGS) {
        return Err(RunError::Host {
            what: format!("mmu.manual_protect: {err}"),
            fix: "turn manual_protect off on this host".into(),
        });
    }
    for (slot, region) in vm.slots() {
        vm.vm
            .bind(slot, region, KVM_MEM_LOG_DIRTY_PAGES)
            .map_err(RunError::kvm("enabling dirty logging"))?;
    }
    if manual {
        // Initially set: clear once, so the first pass's log holds its own
        // writes only.
        read_log(vm, &vm.slots(), true)?;
    }
    result.enable_dirty_log_s = start.elapsed().as_secs_f64();
    Ok(())
}

/// `KVM_CREATE_VCPU` of vCPU `id`.
fn create_vcpu(vm: &Vm, id: u64) -> Result<VcpuFd, RunError> {
    vm.vm
        .vm()
        .create_vcpu(id)
        .map_err(kvm_err("KVM_CREATE_VCPU"))
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
            let vcpu = create_vcpu(vm, id)?;
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

/// The vCPUs of a migrated VM, with the state they had at the source's
/// pass boundary (memory, program and page tables came with memory).
fn restore_vcpus(config: &Config, vm: &Vm, state: &StateSections) -> Result<Vec<VcpuFd>, RunError> {
    (0..u64::from(config.vcpus))
        .map(|id| {
            let vcpu = create_vcpu(vm, id)?;
            state::restore(&vcpu, id, state).map_err(|why| RunError::Host {
                what: format!("the migrated vCPU state: {why}"),
                fix: "migrate between hosts whose KVM takes the same vCPU state".into(),
            })?;
            Ok(vcpu)
        })
        .collect()
}

/// One vCPU thread: a pass of its share, then the barriers, until the host
/// says stop; at a switch-over it saves its state at the boundary.
fn vcpu_passes(mut vcpu: VcpuFd, id: u64, meeting: &Meeting<'_>, metrics: &Metrics) {
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
        meeting.barrier.wait(); // go on, save, or stop
        if meeting.done.load(Ordering::Relaxed) {
            break;
        }
        if meeting.save.load(Ordering::Relaxed) {
            let saved = Kvm::new()
                .map_err(kvm_err("open /dev/kvm"))
                .and_then(|kvm| state::save(&kvm, &mut vcpu, id));
            meeting
                .saved
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((id, saved));
            meeting.barrier.wait(); // saved
            meeting.barrier.wait(); // the verdict
            if meeting.done.load(Ordering::Relaxed) {
                break;
            }
        }
    }
    tracing::debug!("dirty-log vCPU stops");
    events::unregister_vcpu_thread();
}

/// The host side's parts.
struct Host<'a> {
    config: &'a Config,
    vm: &'a Vm,
    plan: PassPlan,
    shares_start: u64,
    meeting: &'a Meeting<'a>,
    metrics: &'a Metrics,
}

impl Host<'_> {
    /// The passes from `first_pass` (0: the populate pass, then logging
    /// on), each checked against the log while no migration owns it; at a
    /// boundary where a migration asks, the switch-over.
    fn passes(
        &self,
        first_pass: u32,
        result: &mut DirtyLog,
        migrating: bool,
    ) -> Result<Ended, RunError> {
        let (meeting, plan, config) = (self.meeting, self.plan, self.config);
        let manual = config.mmu.manual_protect;
        let slots = self.vm.slots();
        // The vCPUs run their first pass as soon as they start.
        let start = Instant::now();
        meeting.barrier.wait();
        meeting.check()?;
        if first_pass == 0 {
            result.populate_s = start.elapsed().as_secs_f64();
            enable_logging(self.vm, manual, result)?;
        } else {
            let epoch = meeting.switch.epoch();
            self.pass_done(first_pass, start, manual, &slots, epoch, result)?;
        }
        meeting.switch.ready();
        let progress = PassProgress::new(
            plan.iterations,
            plan.total_share_bytes(config.vcpus as usize) * u64::from(plan.write_percent) / 100,
        );
        for iteration in first_pass.max(1) + u32::from(first_pass > 0)..=plan.iterations {
            if STOP.load(Ordering::Relaxed) {
                return Ok(Ended::Here);
            }
            let epoch = meeting.switch.epoch();
            let start = Instant::now();
            if meeting.switch.wants_stop() {
                if self.switch_over(iteration - 1)? {
                    return Ok(Ended::Migrated);
                }
            } else {
                meeting.barrier.wait(); // go
            }
            meeting.barrier.wait(); // pass done
            self.pass_done(iteration, start, manual, &slots, epoch, result)?;
            progress.pass_done();
        }
        // A migration still running switches over now, with every pass done.
        if migrating && !meeting.switch.over() && self.switch_over(plan.iterations)? {
            return Ok(Ended::Migrated);
        }
        Ok(Ended::Here)
    }

    /// Pass `iteration` ended: the failure check, and the log check unless
    /// a migration may have taken the log since `epoch`.
    fn pass_done(
        &self,
        iteration: u32,
        start: Instant,
        manual: bool,
        slots: &[(u32, std::sync::Arc<GuestRegion>)],
        epoch: u64,
        result: &mut DirtyLog,
    ) -> Result<(), RunError> {
        let dirty_s = start.elapsed().as_secs_f64();
        self.meeting.check()?;
        self.metrics.passes.fetch_add(1, Ordering::Relaxed);
        let mut pass = Iteration {
            dirty_s,
            ..Iteration::default()
        };
        let read = self
            .meeting
            .switch
            .unless_migrating(epoch, || read_log(self.vm, slots, manual));
        if let Some(read) = read {
            let (log, get_s, clear_s) = read?;
            verify_log(
                &log,
                self.shares_start,
                self.config.vcpus as usize,
                self.plan.share_bytes,
                self.plan.write_percent,
                iteration,
            )?;
            pass.get_dirty_log_s = get_s;
            pass.clear_dirty_log_s = clear_s;
            pass.dirty_pages = log.iter().map(|w| u64::from(w.count_ones())).sum();
        }
        result.iterations.push(pass);
        Ok(())
    }

    /// At the boundary after pass `passes_done`: every vCPU saves its state,
    /// the migration takes it; true when the destination took over (the
    /// vCPUs then leave), false when the source goes on (they run the next
    /// pass).
    fn switch_over(&self, passes_done: u32) -> Result<bool, RunError> {
        let meeting = self.meeting;
        meeting.save.store(true, Ordering::Relaxed);
        meeting.barrier.wait(); // go: save
        meeting.barrier.wait(); // saved
        meeting.save.store(false, Ordering::Relaxed);
        let mut saved =
            std::mem::take(&mut *meeting.saved.lock().unwrap_or_else(|p| p.into_inner()));
        saved.sort_by_key(|(id, _)| *id);
        let mut sections = vec![
            WorkloadState {
                passes_done,
                ..WorkloadState::default()
            }
            .section(),
        ];
        let mut failed = None;
        for (_, state) in saved {
            match state {
                Ok(state) => sections.extend(state),
                Err(err) => failed = Some(err),
            }
        }
        let migrated = match failed {
            // The state did not save: the migration fails, the source runs on.
            Some(err) => {
                tracing::warn!(%err, "saving a vCPU's state for the switch-over");
                meeting.switch.hand_over(Vec::new());
                false
            }
            None => matches!(meeting.switch.hand_over(sections), Handover::Migrated(_)),
        };
        if migrated {
            meeting.done.store(true, Ordering::Relaxed);
        }
        meeting.barrier.wait(); // the verdict
        Ok(migrated)
    }
}

/// One bitmap over guest memory in order (slot 0, 3 GiB at most and a
/// whole number of 64-page words, then slot 1), cleared in manual mode;
/// with the seconds the get and the clear took.
fn read_log(
    vm: &Vm,
    slots: &[(u32, std::sync::Arc<GuestRegion>)],
    manual: bool,
) -> Result<(Vec<u64>, f64, f64), RunError> {
    let start = Instant::now();
    let mut log = Vec::new();
    for (slot, region) in slots {
        log.extend(
            vm.vm
                .dirty_log(*slot, region.size())
                .map_err(RunError::kvm("getting the dirty log"))?,
        );
    }
    let get_s = start.elapsed().as_secs_f64();
    if !manual {
        return Ok((log, get_s, 0.0));
    }
    let start = Instant::now();
    let mut word = 0;
    for (slot, region) in slots {
        let pages = region.size() / 4096;
        let words = pages.div_ceil(64) as usize;
        vm.vm
            .clear_dirty_log(*slot, 0, pages as u32, &mut log[word..word + words])
            .map_err(RunError::kvm("clearing the dirty log"))?;
        word += words;
    }
    Ok((log, get_s, start.elapsed().as_secs_f64()))
}

/// The guest's own check at the end: every page it writes holds the value
/// of its last pass (the pass number plus one, as a 32-bit word).
fn verify_memory(
    vm: &Vm,
    config: &Config,
    plan: PassPlan,
    shares_start: u64,
) -> Result<(), RunError> {
    let memory = vm.memory_map();
    let expected = u64::from(plan.iterations) + 1;
    let mut page = vec![0u8; 4096];
    for vcpu in 0..u64::from(config.vcpus) {
        let first = (shares_start + vcpu * plan.share_bytes) / 4096;
        for i in 0..plan.share_bytes / 4096 {
            if i % 100 >= u64::from(plan.write_percent) {
                continue;
            }
            memory.read(first + i, &mut page);
            let found = u64::from(u32::from_ne_bytes(page[..4].try_into().expect("4 bytes")));
            if found != expected {
                return Err(GuestError::StaleMemory {
                    vcpu,
                    gpa: layout::gpa_of((first + i) * 4096),
                    found,
                    expected,
                }
                .into());
            }
        }
    }
    Ok(())
}
