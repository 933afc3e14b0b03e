//! The workloads where vCPU 0 runs a program (`hello`, `counter`,
//! `binary`, `idle`) and the others park: run here, migrated away
//! (`--migrate-to`), or resumed from a migration's state.

use std::io::Write;
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VcpuFd};
use migrate::KvmDirtyLog;

use super::boot::{long_mode_tables, protected_mode, real_mode, write_guest};
use super::{
    KvmOptions, STOPPED_BY_A_SIGNAL, Stops, Vm, park_secondary_vcpus, run_until_done, state,
};
use crate::config::{BinaryMode, Config, Workload, layout};
use crate::engine::{RunError, kvm_err};
use crate::events::{self, Metrics, STOP};
use crate::guest_error::GuestError;
use crate::migration::{self, Handover, SourcePlan, StateSections, Switch, WorkloadState};
use crate::report::Report;
use crate::{fill, programs, snapshot};

/// What a vCPU 0 exit says when a migration asked it to stop.
pub(super) const MIGRATION_POINT: &str = "stopped for the switch-over";

/// Loads the workload's program into vCPU 0 and memory.
fn load(config: &Config, vm: &Vm, vcpu: &VcpuFd) -> Result<(), RunError> {
    match &config.workload.kind {
        Workload::Hello => {
            write_guest(
                &vm.region,
                layout::CODE,
                &programs::hello(layout::CODE as u16),
            )?;
            real_mode(vcpu, layout::CODE)
        }
        Workload::Counter => {
            write_guest(&vm.region, layout::CODE, &programs::counter())?;
            real_mode(vcpu, layout::CODE)
        }
        Workload::Idle { fill, .. } => {
            write_guest(&vm.region, layout::CODE, &programs::idle())?;
            fill::write(&vm.memory_map(), *fill, layout::IDLE_FILL / 4096);
            real_mode(vcpu, layout::CODE)
        }
        Workload::Binary {
            path,
            load_gpa,
            entry_gpa,
            mode,
        } => {
            let bytes = std::fs::read(path).map_err(|err| RunError::Host {
                what: format!("workload.path {}: {err}", path.display()),
                fix: "give a readable flat binary".into(),
            })?;
            if *load_gpa + bytes.len() as u64 > config.memory_bytes() {
                return Err(RunError::Host {
                    what: "workload.path: the binary does not fit in guest memory".into(),
                    fix: "raise memory.size_mib or lower workload.load_gpa".into(),
                });
            }
            write_guest(&vm.region, *load_gpa, &bytes)?;
            match mode {
                BinaryMode::Real => real_mode(vcpu, *entry_gpa),
                BinaryMode::Long => {
                    long_mode_tables(&vm.region, config.memory_bytes())?;
                    protected_mode(vcpu, true)?;
                    let mut regs = vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
                    regs.rip = *entry_gpa;
                    regs.rflags = 2;
                    vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))
                }
            }
        }
        Workload::DirtyLog { .. } | Workload::Convert { .. } => {
            unreachable!("dirty_log has its own room; convert stays on the soft accelerator")
        }
    }
}

/// The parts of a program run: vCPU 0 and the parked ones.
struct Program<'a> {
    config: &'a Config,
    vcpu: VcpuFd,
    parked: Vec<VcpuFd>,
    serial: &'a mut dyn Write,
    serial_bytes: u64,
    metrics: &'a Metrics,
}

impl Program<'_> {
    /// Runs vCPU 0 until its workload's end, a signal, or a stop the
    /// migration asked for; `idled` is the idle time already spent.
    fn drive(&mut self, stops: Stops<'_>, idled: Duration) -> Result<String, RunError> {
        let Workload::Idle { duration_ms, .. } = self.config.workload.kind else {
            return run_until_done(
                &mut self.vcpu,
                0,
                &mut *self.serial,
                &mut self.serial_bytes,
                stops,
                self.metrics,
            );
        };
        let started = Instant::now();
        loop {
            if STOP.load(std::sync::atomic::Ordering::Relaxed) {
                return Ok(STOPPED_BY_A_SIGNAL.into());
            }
            if stops.migration.is_some_and(|switch| switch.wants_stop()) {
                return Ok(MIGRATION_POINT.into());
            }
            if idled + started.elapsed() >= Duration::from_millis(duration_ms) {
                return Ok("idle time over".into());
            }
            let exit = run_until_done(
                &mut self.vcpu,
                0,
                &mut *self.serial,
                &mut self.serial_bytes,
                stops,
                self.metrics,
            )?;
            if exit != "halted" {
                return Ok(exit);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Every vCPU's state and the workload's, for the switch-over.
    fn state(&mut self, workload: WorkloadState) -> Result<StateSections, RunError> {
        let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
        let mut sections = vec![workload.section()];
        sections.extend(state::save(&kvm, &mut self.vcpu, 0)?);
        for (index, vcpu) in self.parked.iter_mut().enumerate() {
            sections.extend(state::save(&kvm, vcpu, index as u64 + 1)?);
        }
        Ok(sections)
    }
}

/// Runs the program workload of `config` on `vm`, migrating it by
/// `migration`.
pub(super) fn run(
    config: &Config,
    vm: &Vm,
    serial: &mut dyn Write,
    options: KvmOptions,
    metrics: &Metrics,
    migration: Option<&SourcePlan>,
    report: &mut Report,
) -> Result<(), RunError> {
    let vcpu = vm
        .vm
        .vm()
        .create_vcpu(0)
        .map_err(kvm_err("KVM_CREATE_VCPU"))?;
    // The others run too: each to a `hlt`, where it stays parked (kept
    // open until the run ends) while vCPU 0 runs the program.
    let parked = park_secondary_vcpus(config, vm, metrics)?;
    report.vcpus_parked = parked.len() as u32;
    if let Some(snapshot) = &options.restore {
        snapshot::restore_into(snapshot, &vcpu, &vm.region)?;
    } else {
        load(config, vm, &vcpu)?;
    }
    let mut program = Program {
        config,
        vcpu,
        parked,
        serial,
        serial_bytes: 0,
        metrics,
    };
    let snapshot_here =
        options.snapshot_dir.is_some() && matches!(config.workload.kind, Workload::Counter);
    let switch = Switch::with_waker(events::kick_vcpus);
    let started = Instant::now();
    events::register_vcpu_thread();
    tracing::debug!(vcpu = 0, "vCPU starts");
    let exit = std::thread::scope(|scope| {
        if let Some(plan) = migration {
            let switch = &switch;
            scope.spawn(move || {
                let map = vm.memory_map();
                let mut log = KvmDirtyLog::new(vm.vm.clone(), vm.slots());
                migration::send(plan, config, &map, &mut log, switch, started, metrics);
            });
        }
        switch.ready();
        let stops = Stops {
            // The counter switches over at its checkpoint.
            checkpoint: snapshot_here || migration.is_some(),
            migration: migration.map(|_| &switch),
        };
        let outcome = migrate_or_run(&mut program, stops, started, migration.is_some());
        // A migration still waiting for the workload stops waiting.
        switch.abandon();
        outcome
    });
    tracing::debug!(vcpu = 0, ?exit, "vCPU stops");
    events::unregister_vcpu_thread();
    let exit = exit?;
    if exit == "checkpoint" && snapshot_here {
        let dir = options.snapshot_dir.as_ref().expect("checked above");
        // Complete the pending port write, so that the saved state resumes
        // after it.
        program.vcpu.set_kvm_immediate_exit(1);
        let _ = program.vcpu.run();
        program.vcpu.set_kvm_immediate_exit(0);
        snapshot::save(
            dir,
            config,
            &program.vcpu,
            &vm.region,
            options.overwrite_snapshot,
        )?;
        report.exit = format!("snapshot saved to {}", dir.display());
    } else {
        report.exit = exit;
    }
    if let Some(plan) = migration {
        report.migration = Some(migration::source_figures(plan, switch.outcome()));
        if switch.outcome().is_some_and(|o| o.is_ok()) {
            report.exit = format!("migrated to {}", plan.address);
        }
    }
    report.serial_bytes = program.serial_bytes;
    program.serial.flush().map_err(GuestError::Serial)?;
    Ok(())
}

/// Runs vCPU 0; where a migration asks (or the counter reaches its
/// checkpoint, or the program ends while it sends), hands the VM over,
/// and runs on if the migration failed.
fn migrate_or_run(
    program: &mut Program<'_>,
    stops: Stops<'_>,
    started: Instant,
    migrating: bool,
) -> Result<String, RunError> {
    let Some(switch) = stops.migration else {
        return program.drive(stops, Duration::ZERO);
    };
    let mut stops = stops;
    loop {
        let exit = program.drive(stops, Duration::ZERO)?;
        if !migrating || switch.over() || exit == STOPPED_BY_A_SIGNAL {
            return Ok(exit);
        }
        let finished = !matches!(exit.as_str(), MIGRATION_POINT | "checkpoint");
        let workload = WorkloadState {
            elapsed_ms: started.elapsed().as_millis() as u64,
            finished,
            serial_bytes: program.serial_bytes,
            ..WorkloadState::default()
        };
        let sections = program.state(workload)?;
        match switch.hand_over(sections) {
            Handover::Migrated(_) => return Ok(MIGRATION_POINT.into()),
            Handover::Resume(why) => {
                tracing::debug!(%why, "the source resumes its guest");
                if finished {
                    return Ok(exit);
                }
                // Run to the end here, the checkpoint passed.
                stops.checkpoint = false;
            }
        }
    }
}

/// Resumes a migrated program workload on `vm` from `state`: vCPU 0 and
/// the parked ones get their registers back, and vCPU 0 runs on.
pub(super) fn resume(
    config: &Config,
    vm: &Vm,
    state: &StateSections,
    workload: WorkloadState,
    serial: &mut dyn Write,
    metrics: &Metrics,
    report: &mut Report,
) -> Result<(), RunError> {
    let create = |id: u64| {
        vm.vm
            .vm()
            .create_vcpu(id)
            .map_err(kvm_err("KVM_CREATE_VCPU"))
    };
    let restore = |vcpu: &VcpuFd, id: u64| {
        state::restore(vcpu, id, state).map_err(|why| RunError::Host {
            what: format!("the migrated vCPU state: {why}"),
            fix: "migrate between hosts whose KVM takes the same vCPU state".into(),
        })
    };
    if let Workload::Idle { fill, .. } = config.workload.kind {
        // The idle guest's check: its memory arrived as the source held it.
        fill::verify(&vm.memory_map(), fill, layout::IDLE_FILL / 4096)?;
    }
    let vcpu = create(0)?;
    restore(&vcpu, 0)?;
    let mut parked = Vec::new();
    for id in 1..u64::from(config.vcpus) {
        let vcpu = create(id)?;
        restore(&vcpu, id)?;
        parked.push(vcpu);
    }
    report.vcpus_parked = parked.len() as u32;
    let mut program = Program {
        config,
        vcpu,
        parked,
        serial,
        serial_bytes: workload.serial_bytes,
        metrics,
    };
    let exit = if workload.finished {
        "the program had ended on the source".to_string()
    } else {
        events::register_vcpu_thread();
        let stops = Stops {
            checkpoint: false,
            migration: None,
        };
        let exit = program.drive(stops, Duration::from_millis(workload.elapsed_ms));
        events::unregister_vcpu_thread();
        exit?
    };
    report.exit = exit;
    report.serial_bytes = program.serial_bytes;
    program.serial.flush().map_err(GuestError::Serial)?;
    Ok(())
}
