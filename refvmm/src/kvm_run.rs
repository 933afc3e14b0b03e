//! The `kvm` accelerator: a real KVM VM over gmem memory.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::Instant;

use gmem::consts::{
    KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MEM_LOG_DIRTY_PAGES,
};
use gmem::{GuestRegion, KvmVm};
use kvm_bindings::kvm_segment;
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::config::{BinaryMode, Config, Workload, layout};
use crate::engine::{
    GuestFault, PassProgress, RunError, create_memory, kvm_err, open_kvm, prefault, verify_log,
};
use crate::events::{self, Metrics, STOP};
use crate::programs::{self, CHECKPOINT_PORT, PASS_PORT, SERIAL, SERIAL_LSR, SHUTDOWN_PORT};
use crate::report::{DirtyLog, Iteration, Report};
use crate::snapshot::{self, Snapshot};
use gmem::DirtyTracking;

/// What a loop a signal stopped says.
const STOPPED_BY_A_SIGNAL: &str = "stopped by a signal";
/// Manual protect, with every bit initially set.
const MANUAL_PROTECT_FLAGS: u64 =
    (KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET) as u64;
/// Page tables for long mode live here: the PML4, the PDPT, then one page
/// directory per GiB mapped (up to `layout::MAX_MAPPED_GIB`, below the
/// dirty-log shares at 1 MiB).
const LONG_MODE_TABLES: u64 = 0x9000;

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

struct Vm {
    vm: Arc<KvmVm>,
    /// Memory below the MMIO hole, at guest address 0 (memslot 0).
    region: Arc<GuestRegion>,
    /// Memory above it, from 4 GiB (memslot 1), when there is more than
    /// 3 GiB.
    high: Option<Arc<GuestRegion>>,
    prefault_gib_s: Option<f64>,
    thp: bool,
}

fn build(config: &Config) -> Result<Vm, RunError> {
    let vm = open_kvm()?;
    let file = create_memory(config, Some(&vm))?;
    let prefault_gib_s = prefault(config, &file)?;
    // Memory as real machines lay it out: up to 3 GiB from address 0, the
    // rest from 4 GiB, leaving the MMIO hole (local APIC, IOAPIC, PCI)
    // free.
    let low = file.size().min(layout::MMIO_HOLE_START);
    let region = Arc::new(
        GuestRegion::new(&file, 0, low, 0, DirtyTracking::Off)
            .map_err(|err| RunError::Kvm(format!("guest region: {err}")))?,
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
            .map_err(|err| RunError::Kvm(format!("guest region above 4 GiB: {err}")))?,
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

fn write_guest(region: &GuestRegion, gpa: u64, bytes: &[u8]) -> Result<(), RunError> {
    region
        .view()
        .write_at(gpa, bytes)
        .map_err(|err| RunError::Guest(format!("loading the program at {gpa:#x}: {err}")))
}

/// Real mode at linear address `entry`: CS holds the 64 KiB segment of
/// the entry point (so it may lie above 64 KiB), data segments start at 0.
fn real_mode(vcpu: &VcpuFd, entry: u64) -> Result<(), RunError> {
    if entry >= 1 << 20 {
        return Err(RunError::Host {
            what: format!("workload.entry_gpa {entry:#x} is above 1 MiB"),
            fix: "real mode reaches only the first 1 MiB; use \"mode\": \"long\"".into(),
        });
    }
    let mut sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    for segment in [
        &mut sregs.cs,
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.fs,
        &mut sregs.gs,
        &mut sregs.ss,
    ] {
        segment.base = 0;
        segment.selector = 0;
    }
    sregs.cs.base = entry & !0xffff;
    sregs.cs.selector = (sregs.cs.base >> 4) as u16;
    vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    let mut regs = vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
    regs.rip = entry & 0xffff;
    regs.rflags = 2;
    regs.rsp = 0x8000;
    vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))
}

fn flat_segments(long: bool) -> (kvm_segment, kvm_segment) {
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x8,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = kvm_segment {
        selector: 0x10,
        type_: 0x3,
        db: 1,
        l: 0,
        ..code
    };
    (code, data)
}

fn protected_mode(vcpu: &VcpuFd, long: bool) -> Result<(), RunError> {
    let mut sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    let (code, data) = flat_segments(long);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.cr0 |= 1;
    if long {
        sregs.cr3 = LONG_MODE_TABLES;
        sregs.cr4 |= 1 << 5; // PAE
        sregs.efer |= (1 << 8) | (1 << 10); // LME, LMA
        sregs.cr0 |= 1 << 31; // PG
    }
    vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))
}

/// Page tables for long mode over all of guest memory (up to
/// `layout::MAX_MAPPED_GIB`), with 2 MiB pages: virtual address V maps
/// guest memory offset V, so the first 3 GiB are identity-mapped and the
/// rest is found past the 4 GiB hole. Accessed and dirty bits are preset,
/// so the CPU never writes the tables (they stay out of the dirty log).
fn long_mode_tables(region: &GuestRegion, memory_bytes: u64) -> Result<(), RunError> {
    const PRESENT_WRITABLE: u64 = 0x3;
    const ACCESSED: u64 = 0x20;
    const DIRTY_HUGE: u64 = 0x40 | 0x80;
    let pml4 = LONG_MODE_TABLES;
    let pdpt = pml4 + 0x1000;
    let gib = memory_bytes
        .div_ceil(1 << 30)
        .clamp(1, layout::MAX_MAPPED_GIB);
    write_guest(
        region,
        pml4,
        &(pdpt | PRESENT_WRITABLE | ACCESSED).to_le_bytes(),
    )?;
    let mut pdpt_entries = Vec::with_capacity(gib as usize * 8);
    for i in 0..gib {
        let pd = pdpt + 0x1000 * (1 + i);
        pdpt_entries.extend_from_slice(&(pd | PRESENT_WRITABLE | ACCESSED).to_le_bytes());
        let mut entries = Vec::with_capacity(512 * 8);
        for j in 0..512u64 {
            let frame = layout::gpa_of((i << 30) + (j << 21));
            entries.extend_from_slice(
                &(frame | PRESENT_WRITABLE | ACCESSED | DIRTY_HUGE).to_le_bytes(),
            );
        }
        write_guest(region, pd, &entries)?;
    }
    write_guest(region, pdpt, &pdpt_entries)
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
    stop_at_checkpoint: bool,
    metrics: &Metrics,
) -> Result<String, RunError> {
    loop {
        match stop_requested(vcpu, id) {
            Some(Stop::Signal) => return Ok(STOPPED_BY_A_SIGNAL.into()),
            Some(Stop::Timeout(fault)) => return Err(fault),
            None => {}
        }
        let exit = vcpu.run();
        metrics.vcpu_exits.fetch_add(1, Ordering::Relaxed);
        let unexpected = match exit {
            Ok(VcpuExit::IoOut(SERIAL, data)) => {
                serial
                    .write_all(data)
                    .map_err(|err| RunError::Guest(format!("serial output: {err}")))?;
                *serial_bytes += data.len() as u64;
                metrics
                    .serial_bytes
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                continue;
            }
            Ok(VcpuExit::IoOut(SHUTDOWN_PORT, _)) => return Ok("shutdown port".into()),
            Ok(VcpuExit::IoOut(CHECKPOINT_PORT, _)) if stop_at_checkpoint => {
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
            Err(err) => return Err(RunError::Guest(format!("KVM_RUN: {err}"))),
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
            false,
            metrics,
        )?;
        if exit != "halted" {
            return Err(RunError::Guest(format!(
                "vCPU {id} did not park on its hlt: {exit}"
            )));
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
) -> Result<Report, RunError> {
    let vm = build(config)?;
    let mut report = base_report(config, &vm);
    match &config.workload.kind {
        Workload::DirtyLog {
            iterations,
            bytes_per_vcpu_mib,
            write_percent,
        } => {
            report.dirty_log = Some(dirty_log(
                config,
                &vm,
                *iterations,
                *bytes_per_vcpu_mib << 20,
                *write_percent,
                metrics,
            )?);
            report.exit = "iterations done".into();
        }
        workload => {
            let mut vcpu = vm
                .vm
                .vm()
                .create_vcpu(0)
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            // The others run too: each to a `hlt`, where it stays parked
            // (kept open until the run ends) while vCPU 0 runs the program.
            let parked = park_secondary_vcpus(config, &vm, metrics)?;
            report.vcpus_parked = parked.len() as u32;
            if let Some(snapshot) = &options.restore {
                snapshot::restore_into(snapshot, &vcpu, &vm.region)?;
            } else {
                match workload {
                    Workload::Hello => {
                        write_guest(
                            &vm.region,
                            layout::CODE,
                            &programs::hello(layout::CODE as u16),
                        )?;
                        real_mode(&vcpu, layout::CODE)?;
                    }
                    Workload::Counter => {
                        write_guest(&vm.region, layout::CODE, &programs::counter())?;
                        real_mode(&vcpu, layout::CODE)?;
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
                                what: "workload.path: the binary does not fit in guest memory"
                                    .into(),
                                fix: "raise memory.size_mib or lower workload.load_gpa".into(),
                            });
                        }
                        write_guest(&vm.region, *load_gpa, &bytes)?;
                        match mode {
                            BinaryMode::Real => real_mode(&vcpu, *entry_gpa)?,
                            BinaryMode::Long => {
                                long_mode_tables(&vm.region, config.memory_bytes())?;
                                protected_mode(&vcpu, true)?;
                                let mut regs = vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
                                regs.rip = *entry_gpa;
                                regs.rflags = 2;
                                vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
                            }
                        }
                    }
                    Workload::DirtyLog { .. } => unreachable!("handled above"),
                    Workload::Convert { .. } => {
                        unreachable!("validation keeps convert on the soft accelerator")
                    }
                }
            }
            let snapshot_here =
                options.snapshot_dir.is_some() && matches!(workload, Workload::Counter);
            let mut serial_bytes = 0;
            events::register_vcpu_thread();
            tracing::debug!(vcpu = 0, "vCPU starts");
            let exit = run_until_done(
                &mut vcpu,
                0,
                serial,
                &mut serial_bytes,
                snapshot_here,
                metrics,
            );
            tracing::debug!(vcpu = 0, ?exit, "vCPU stops");
            events::unregister_vcpu_thread();
            let exit = exit?;
            if exit == "checkpoint" {
                let dir = options.snapshot_dir.as_ref().expect("checked above");
                // Complete the pending port write, so that the saved state
                // resumes after it.
                vcpu.set_kvm_immediate_exit(1);
                let _ = vcpu.run();
                vcpu.set_kvm_immediate_exit(0);
                snapshot::save(dir, config, &vcpu, &vm.region, options.overwrite_snapshot)?;
                report.exit = format!("snapshot saved to {}", dir.display());
            } else {
                report.exit = exit;
            }
            report.serial_bytes = serial_bytes;
            serial
                .flush()
                .map_err(|err| RunError::Guest(format!("serial output: {err}")))?;
        }
    }
    Ok(report)
}

/// The kernel's dirty_log_perf_test on KVM: the guest writes, KVM logs.
fn dirty_log(
    config: &Config,
    vm: &Vm,
    iterations: u32,
    share_bytes: u64,
    write_percent: u32,
    metrics: &Metrics,
) -> Result<DirtyLog, RunError> {
    let vcpus = config.vcpus as usize;
    let pages_per_share = share_bytes / 4096;
    // Long mode with paging over all of memory: shares may lie past 4 GiB.
    write_guest(&vm.region, layout::CODE, &programs::dirty_loop_64())?;
    long_mode_tables(&vm.region, config.memory_bytes())?;
    let shares_start = layout::shares_start(config.memory_bytes(), vcpus as u64 * share_bytes);
    let mut fds = Vec::with_capacity(vcpus);
    for id in 0..vcpus {
        let vcpu = vm
            .vm
            .vm()
            .create_vcpu(id as u64)
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        protected_mode(&vcpu, true)?;
        let mut regs = vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        regs.rip = layout::CODE;
        regs.rflags = 2;
        regs.rsi = shares_start + id as u64 * share_bytes;
        regs.rbx = pages_per_share;
        regs.rdx = u64::from(PASS_PORT);
        regs.rsp = u64::from(write_percent);
        regs.rax = 1;
        vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        fds.push(vcpu);
    }
    let barrier = Arc::new(Barrier::new(vcpus + 1));
    let done = Arc::new(AtomicBool::new(false));
    let failure: Arc<Mutex<Option<RunError>>> = Arc::default();
    let mut result = DirtyLog::default();
    let outcome = std::thread::scope(|scope| -> Result<(), RunError> {
        for (id, mut vcpu) in fds.into_iter().enumerate() {
            let (barrier, done, failure) = (barrier.clone(), done.clone(), failure.clone());
            let id = id as u64;
            scope.spawn(move || {
                events::register_vcpu_thread();
                loop {
                    let outcome = loop {
                        match stop_requested(&vcpu, id) {
                            Some(Stop::Signal) => {
                                break Err(RunError::Guest(STOPPED_BY_A_SIGNAL.into()));
                            }
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
                            Err(err) => break Err(RunError::Guest(format!("KVM_RUN: {err}"))),
                        };
                        break Err(fault(&mut vcpu, id, unexpected));
                    };
                    // A failure is only recorded: the main thread finds it
                    // after the pass and alone decides to stop (`done`). A
                    // vCPU setting `done` itself could make another, still
                    // reading it after the last barrier, leave a pass
                    // early and strand the rest at the next barrier.
                    if let Err(why) = outcome {
                        failure
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert(why);
                    }
                    barrier.wait(); // the pass is done
                    barrier.wait(); // go on, or stop
                    if done.load(Ordering::Relaxed) {
                        tracing::debug!("dirty-log vCPU stops");
                        events::unregister_vcpu_thread();
                        return;
                    }
                }
            });
        }
        let check_failure = || -> Result<(), RunError> {
            match failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
                Some(err) => Err(err),
                None => Ok(()),
            }
        };
        let finish = |done: &AtomicBool| {
            done.store(true, Ordering::Relaxed);
            barrier.wait();
        };
        let start = Instant::now();
        barrier.wait();
        result.populate_s = start.elapsed().as_secs_f64();
        if let Err(err) = check_failure() {
            finish(&done);
            return Err(err);
        }
        let manual = config.mmu.manual_protect;
        let start = Instant::now();
        if manual && let Err(err) = vm.vm.enable_manual_dirty_log_protect(MANUAL_PROTECT_FLAGS) {
            finish(&done);
            return Err(RunError::Host {
                what: format!("mmu.manual_protect: {err}"),
                fix: "turn manual_protect off on this host".into(),
            });
        }
        let slots: Vec<(u32, &Arc<GuestRegion>)> = std::iter::once((0, &vm.region))
            .chain(vm.high.as_ref().map(|high| (1, high)))
            .collect();
        for &(slot, region) in &slots {
            if let Err(err) = vm.vm.bind(slot, region.clone(), KVM_MEM_LOG_DIRTY_PAGES) {
                finish(&done);
                return Err(RunError::Kvm(format!("enabling dirty logging: {err}")));
            }
        }
        result.enable_dirty_log_s = start.elapsed().as_secs_f64();
        let progress = PassProgress::new(
            iterations,
            vcpus as u64 * share_bytes * u64::from(write_percent) / 100,
        );
        for iteration in 1..=iterations {
            let start = Instant::now();
            barrier.wait(); // go
            barrier.wait(); // pass done
            let dirty_s = start.elapsed().as_secs_f64();
            if let Err(err) = check_failure() {
                finish(&done);
                return Err(err);
            }
            metrics.passes.fetch_add(1, Ordering::Relaxed);
            let start = Instant::now();
            // One bitmap over guest memory in order: slot 0 (3 GiB, a whole
            // number of 64-page words) then slot 1.
            let mut log = Vec::new();
            for &(slot, region) in &slots {
                match vm.vm.dirty_log(slot, region.size()) {
                    Ok(part) => log.extend(part),
                    Err(err) => {
                        finish(&done);
                        return Err(RunError::Kvm(err.to_string()));
                    }
                }
            }
            let get_s = start.elapsed().as_secs_f64();
            let mut clear_s = 0.0;
            if manual {
                let start = Instant::now();
                let mut word = 0;
                for &(slot, region) in &slots {
                    let pages = region.size() / 4096;
                    let words = pages.div_ceil(64) as usize;
                    let bitmap = &mut log[word..word + words];
                    word += words;
                    if let Err(err) = vm.vm.clear_dirty_log(slot, 0, pages as u32, bitmap) {
                        finish(&done);
                        return Err(RunError::Kvm(err.to_string()));
                    }
                }
                clear_s = start.elapsed().as_secs_f64();
            }
            let dirty_pages: u64 = log.iter().map(|w| u64::from(w.count_ones())).sum();
            if let Err(err) = verify_log(
                &log,
                shares_start,
                vcpus,
                share_bytes,
                write_percent,
                iteration,
            ) {
                finish(&done);
                return Err(err);
            }
            result.iterations.push(Iteration {
                dirty_s,
                get_dirty_log_s: get_s,
                clear_dirty_log_s: clear_s,
                dirty_pages,
            });
            progress.pass_done();
        }
        finish(&done);
        Ok(())
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
