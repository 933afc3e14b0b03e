//! The `kvm` accelerator: a real KVM VM over gmem memory.

mod boot;
mod dirty_log;
mod program;
pub mod state;

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use gmem::{DirtyTracking, GuestRegion, KvmVm};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::config::{Config, Workload, layout};
use crate::engine::{GuestFault, PassPlan, RunError, create_memory, kvm_err, open_kvm, prefault};
use crate::events;
use crate::events::{Metrics, STOP};
use crate::guest_error::GuestError;
use crate::programs::{CHECKPOINT_PORT, SERIAL, SERIAL_LSR, SHUTDOWN_PORT};
use crate::report::Report;
use crate::snapshot::Snapshot;

use self::boot::{real_mode, write_guest};

/// What a loop a signal stopped says.
const STOPPED_BY_A_SIGNAL: &str = "stopped by a signal";

/// Where a vCPU loop stops besides the workload's end and signals.
#[derive(Clone, Copy, Debug, Default)]
struct Stops<'a> {
    /// At the counter's checkpoint.
    checkpoint: bool,
    /// Where this migration asks.
    migration: Option<&'a crate::migration::Switch>,
}

/// What the run does besides the workload.
#[derive(Debug, Default)]
pub struct KvmOptions {
    /// Save a snapshot here at the counter's checkpoint.
    pub snapshot_dir: Option<std::path::PathBuf>,
    /// Replace a snapshot already in `snapshot_dir`.
    pub overwrite_snapshot: bool,
    /// Resume from this snapshot.
    pub restore: Option<Snapshot>,
}

/// A KVM VM with its memory bound.
#[derive(Debug)]
pub struct Vm {
    vm: Arc<KvmVm>,
    /// Memory below the MMIO hole, at guest address 0 (memslot 0).
    region: Arc<GuestRegion>,
    /// Memory above it, from 4 GiB (memslot 1), when there is more than
    /// 3 GiB.
    high: Option<Arc<GuestRegion>>,
    prefault_gib_s: Option<f64>,
    thp: bool,
}

impl Vm {
    /// Guest memory in memslot order, as a migration reads and writes it.
    pub fn memory_map(&self) -> migrate::GuestMemoryMap {
        let mut owners: Vec<Arc<dyn migrate::HostMemory>> = vec![self.region.clone()];
        if let Some(high) = &self.high {
            owners.push(high.clone());
        }
        migrate::GuestMemoryMap::new(owners)
    }

    /// The memslots and their regions, in memory order.
    fn slots(&self) -> Vec<(u32, Arc<GuestRegion>)> {
        std::iter::once((0, self.region.clone()))
            .chain(self.high.clone().map(|high| (1, high)))
            .collect()
    }
}

/// Opens KVM, makes the memory `config` asks for and binds it.
pub fn build(config: &Config) -> Result<Vm, RunError> {
    let vm = open_kvm()?;
    let file = create_memory(config, Some(&vm))?;
    let prefault_gib_s = prefault(config, &file)?;
    // Memory as real machines lay it out: up to 3 GiB from address 0, the
    // rest from 4 GiB, leaving the MMIO hole (local APIC, IOAPIC, PCI)
    // free.
    let low = file.size().min(layout::MMIO_HOLE_START);
    let region = Arc::new(
        GuestRegion::new(&file, 0, low, 0, DirtyTracking::Off).map_err(|source| {
            RunError::Region {
                step: "mapping memory below 4 GiB",
                source,
            }
        })?,
    );
    let bind_error = |err: gmem::KvmError| RunError::Host {
        what: format!("memslot: {err}"),
        fix: "check the memory backend against the host's KVM (refvmm --check-host)".into(),
    };
    vm.bind(0, region.clone(), 0).map_err(bind_error)?;
    let high = if file.size() > low {
        let high = Arc::new(
            GuestRegion::new(
                &file,
                low,
                file.size() - low,
                layout::HIGH_MEMORY,
                DirtyTracking::Off,
            )
            .map_err(|source| RunError::Region {
                step: "mapping memory above 4 GiB",
                source,
            })?,
        );
        vm.bind(1, high.clone(), 0).map_err(bind_error)?;
        Some(high)
    } else {
        None
    };
    tracing::debug!(bytes = file.size(), low, "memory bound as memslots");
    Ok(Vm {
        vm,
        region,
        high,
        prefault_gib_s,
        thp: file.transparent_huge_pages(),
    })
}

/// What an exit no workload expects says, in words.
fn unexpected_exit(exit: &VcpuExit) -> String {
    match exit {
        VcpuExit::Shutdown => "KVM_EXIT_SHUTDOWN: the guest shut down (a triple fault)".into(),
        VcpuExit::InternalError => "KVM_EXIT_INTERNAL_ERROR".into(),
        VcpuExit::FailEntry(reason, cpu) => {
            format!("KVM_EXIT_FAIL_ENTRY: hardware entry failure reason {reason:#x} on CPU {cpu}")
        }
        VcpuExit::MmioRead(gpa, data) => format!(
            "KVM_EXIT_MMIO: a {}-byte read at gpa {gpa:#x}, where no memory is",
            data.len()
        ),
        VcpuExit::MmioWrite(gpa, data) => format!(
            "KVM_EXIT_MMIO: a {}-byte write at gpa {gpa:#x}, where no memory is",
            data.len()
        ),
        other => format!("an exit no workload expects: {other:?}"),
    }
}

/// Why a vCPU loop stops before its guest is done.
enum Stop {
    /// SIGINT or SIGTERM: the run reports what it did, as interrupted.
    Signal,
    /// `workload.timeout_ms` passed: a fault, with the vCPU's registers.
    Timeout(RunError),
}

/// Whether vCPU `id`'s loop must stop now, and why.
fn stop_requested(vcpu: &VcpuFd, id: u64) -> Option<Stop> {
    if STOP.load(Ordering::Relaxed) {
        Some(Stop::Signal)
    } else if events::TIMED_OUT.load(Ordering::Relaxed) {
        Some(Stop::Timeout(GuestFault::of(
            vcpu,
            id,
            "workload.timeout_ms passed with the guest still running",
        )))
    } else {
        None
    }
}

/// The fault of vCPU `id` after the unexpected exit `exit`, with the
/// suberror of an internal error.
fn fault(vcpu: &mut VcpuFd, id: u64, exit: String) -> RunError {
    let run = vcpu.get_kvm_run();
    let suberror = if run.exit_reason == kvm_bindings::KVM_EXIT_INTERNAL_ERROR {
        // SAFETY: KVM filled `internal`, the union member its exit reason
        // names.
        Some(unsafe { run.__bindgen_anon_1.internal.suberror })
    } else {
        None
    };
    let mut err = GuestFault::of(vcpu, id, exit);
    if let RunError::GuestFault(fault) = &mut err {
        fault.suberror = suberror;
    }
    err
}

/// Runs KVM_RUN on vCPU `id` until the guest halts, writes the shutdown
/// port, or (`checkpoint`) reaches the counter's checkpoint; serial output
/// goes to `serial`. Returns the reason; an exit no workload expects, or
/// the timeout, is a [`GuestFault`].
fn run_until_done(
    vcpu: &mut VcpuFd,
    id: u64,
    serial: &mut dyn Write,
    serial_bytes: &mut u64,
    stops: Stops<'_>,
    metrics: &Metrics,
) -> Result<String, RunError> {
    loop {
        if stops.migration.is_some_and(|switch| switch.wants_stop()) {
            return Ok(program::MIGRATION_POINT.into());
        }
        match stop_requested(vcpu, id) {
            Some(Stop::Signal) => return Ok(STOPPED_BY_A_SIGNAL.into()),
            Some(Stop::Timeout(fault)) => return Err(fault),
            None => {}
        }
        let exit = vcpu.run();
        metrics.vcpu_exits.fetch_add(1, Ordering::Relaxed);
        let unexpected = match exit {
            Ok(VcpuExit::IoOut(SERIAL, data)) => {
                serial.write_all(data).map_err(GuestError::Serial)?;
                *serial_bytes += data.len() as u64;
                metrics
                    .serial_bytes
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                continue;
            }
            Ok(VcpuExit::IoOut(SHUTDOWN_PORT, _)) => return Ok("shutdown port".into()),
            Ok(VcpuExit::IoOut(CHECKPOINT_PORT, _)) if stops.checkpoint => {
                return Ok("checkpoint".into());
            }
            Ok(VcpuExit::IoOut(_, _)) => continue,
            Ok(VcpuExit::IoIn(port, data)) => {
                // A transmitter that is always ready; nothing else answers.
                data.fill(if port == SERIAL_LSR { 0x60 } else { 0xff });
                continue;
            }
            Ok(VcpuExit::Hlt) => return Ok("halted".into()),
            Ok(other) => unexpected_exit(&other),
            Err(err) if err.errno() == libc::EINTR => continue,
            Err(source) => return Err(GuestError::KvmRun { vcpu: id, source }.into()),
        };
        return Err(fault(vcpu, id, unexpected));
    }
}

/// Creates vCPUs 1.. of `config` and runs each until it halts on the `hlt`
/// at [`layout::PARK`]; returns them, parked.
fn park_secondary_vcpus(
    config: &Config,
    vm: &Vm,
    metrics: &Metrics,
) -> Result<Vec<VcpuFd>, RunError> {
    if config.vcpus < 2 {
        return Ok(Vec::new());
    }
    write_guest(&vm.region, layout::PARK, &[0xf4])?;
    let mut parked = Vec::with_capacity(config.vcpus as usize - 1);
    for id in 1..u64::from(config.vcpus) {
        let mut vcpu = vm
            .vm
            .vm()
            .create_vcpu(id)
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        real_mode(&vcpu, layout::PARK)?;
        let mut ignored = std::io::sink();
        let mut serial_bytes = 0;
        let exit = run_until_done(
            &mut vcpu,
            id,
            &mut ignored,
            &mut serial_bytes,
            Stops::default(),
            metrics,
        )?;
        if exit != "halted" {
            return Err(GuestError::NotParked { vcpu: id, exit }.into());
        }
        parked.push(vcpu);
    }
    tracing::debug!(parked = parked.len(), "secondary vCPUs parked");
    Ok(parked)
}

fn base_report(config: &Config, vm: &Vm) -> Report {
    Report {
        accel: "kvm".into(),
        backend: config.memory.backend.name().into(),
        vcpus: config.vcpus,
        memory_bytes: config.memory_bytes(),
        prefault_gib_s: vm.prefault_gib_s,
        transparent_huge_pages: vm.thp,
        workload: crate::workload_name(&config.workload).into(),
        ..Report::default()
    }
}

/// Runs `config` on KVM.
pub fn run(
    config: &Config,
    serial: &mut dyn Write,
    options: KvmOptions,
    metrics: &Metrics,
    migration: Option<&crate::migration::SourcePlan>,
) -> Result<Report, RunError> {
    let vm = build(config)?;
    let mut report = base_report(config, &vm);
    match &config.workload.kind {
        Workload::DirtyLog {
            iterations,
            bytes_per_vcpu_mib,
            write_percent,
        } => {
            let plan = PassPlan {
                iterations: *iterations,
                share_bytes: *bytes_per_vcpu_mib << 20,
                write_percent: *write_percent,
            };
            let (log, ended, switch) =
                dirty_log::dirty_log(config, &vm, plan, metrics, None, migration)?;
            report.dirty_log = Some(log);
            report.exit = match ended {
                dirty_log::Ended::Here => "iterations done".into(),
                dirty_log::Ended::Migrated => format!(
                    "migrated to {}",
                    migration.map_or_else(String::new, |p| p.address.to_string())
                ),
            };
            if let (Some(plan), Some(switch)) = (migration, switch) {
                report.migration = Some(crate::migration::source_figures(plan, switch.outcome()));
            }
        }
        _ => program::run(
            config,
            &vm,
            serial,
            options,
            metrics,
            migration,
            &mut report,
        )?,
    }
    report.memory_pages = Some(crate::report::MemoryPages::of(vm.region.file()));
    Ok(report)
}

/// Resumes a VM that migrated here: `vm` holds its memory (received), and
/// `state` its vCPUs' and workload's state.
pub fn resume(
    config: &Config,
    vm: &Vm,
    state: &crate::migration::StateSections,
    workload: crate::migration::WorkloadState,
    serial: &mut dyn Write,
    metrics: &Metrics,
) -> Result<Report, RunError> {
    let mut report = base_report(config, vm);
    if let Workload::DirtyLog {
        iterations,
        bytes_per_vcpu_mib,
        write_percent,
    } = config.workload.kind
    {
        let plan = PassPlan {
            iterations,
            share_bytes: bytes_per_vcpu_mib << 20,
            write_percent,
        };
        let (log, _, _) =
            dirty_log::dirty_log(config, vm, plan, metrics, Some((state, workload)), None)?;
        report.dirty_log = Some(log);
        report.exit = "iterations done".into();
    } else {
        program::resume(config, vm, state, workload, serial, metrics, &mut report)?;
    }
    report.memory_pages = Some(crate::report::MemoryPages::of(vm.region.file()));
    Ok(report)
}
