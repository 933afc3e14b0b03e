//! # refvmm
//!
//! The reference VMM of mmukit. `refvmm --config vm.json` runs one VM and
//! exits: 0 when the run succeeded, 1 when the guest or the workload
//! failed, 2 on a configuration or host error (the message names the field
//! or the missing host feature).
//!
//! - `accel: "kvm"` boots a small guest on real KVM with memory from a gmem
//!   backend (guest_memfd slots bound with `KVM_SET_USER_MEMORY_REGION2`).
//! - `accel: "soft"` drives split's TDP MMU (and tdx-ext's mirror over the
//!   software TDX module when `tdx.enabled`) through the kernel's
//!   dirty_log_perf_test with software vCPU threads.
//!
//! `refvmm --check-host` says what this host offers; `refvmm --print-config
//! FILE` prints a configuration with every default filled in.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};

use refvmm::config::{Accel, Config, Workload};
use refvmm::engine::RunError;
use refvmm::report::Report;
use refvmm::{events, kvm_run, snapshot, soft_run};

/// How the report is printed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
enum ReportFormat {
    /// Text for people (serial output goes to stdout).
    #[default]
    Human,
    /// One JSON object on stdout (serial output goes to stderr).
    Json,
}

/// The reference VMM of mmukit: runs one VM from a configuration file.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Run the VM described by this JSON file.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["check_host", "print_config", "restore"])]
    config: Option<PathBuf>,
    /// Report format.
    #[arg(long, value_enum, default_value_t = ReportFormat::Human)]
    report: ReportFormat,
    /// Print what this host offers, one line each.
    #[arg(long)]
    check_host: bool,
    /// Print the configuration in FILE with every default filled in.
    #[arg(long, value_name = "FILE")]
    print_config: Option<PathBuf>,
    /// Save a snapshot here when the counter workload reaches its checkpoint.
    #[arg(long, value_name = "DIR", requires = "config")]
    snapshot: Option<PathBuf>,
    /// Replace the snapshot the --snapshot directory holds already (without
    /// it, a run that would overwrite one is refused before it starts).
    #[arg(long, requires = "snapshot")]
    overwrite: bool,
    /// Resume the guest saved in this snapshot directory.
    #[arg(long, value_name = "DIR")]
    restore: Option<PathBuf>,
    /// Write logs to this file instead of stderr (level `debug` unless
    /// RUST_LOG says otherwise).
    #[arg(long, value_name = "PATH")]
    log_file: Option<PathBuf>,
    /// Write the live metrics (exits, serial bytes, passes, faults, splits,
    /// conversions) to this file as JSON lines, every second and at the end.
    #[arg(long, value_name = "PATH")]
    metrics_file: Option<PathBuf>,
}

/// Logs to `log_file` (plain text) or to stderr (colours only on a
/// terminal), filtered by RUST_LOG or else `default_level`.
fn init_logs(log_file: Option<&std::path::Path>) -> Result<(), String> {
    use std::io::IsTerminal;
    let default_level = if log_file.is_some() { "debug" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match log_file {
        Some(path) => {
            let file = std::fs::File::create(path)
                .map_err(|err| format!("--log-file {}: {err}", path.display()))?;
            builder
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(file))
                .init();
        }
        None => builder
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .init(),
    }
    Ok(())
}

/// The exit code of a run a signal stopped (128 + SIGINT, as shells use).
const EXIT_INTERRUPTED: u8 = 130;
/// What the report says of such a run.
const STOPPED: &str = "stopped by a signal";

fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("refvmm: {message}");
    ExitCode::from(code)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(why) = init_logs(cli.log_file.as_deref()) {
        return fail(2, why);
    }
    if cli.check_host {
        println!("{}", gmem::HostCaps::probe());
        return ExitCode::SUCCESS;
    }
    if let Some(path) = &cli.print_config {
        return match Config::load(path) {
            Ok(config) => {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&config).expect("configs serialize")
                );
                ExitCode::SUCCESS
            }
            Err(err) => fail(2, err),
        };
    }
    events::install_signal_handlers();
    let (config, restore) = match (&cli.config, &cli.restore) {
        (Some(path), None) => match Config::load(path) {
            Ok(config) => (config, None),
            Err(err @ refvmm::config::ConfigError::Read { .. })
                if events::STOP.load(std::sync::atomic::Ordering::Relaxed) =>
            {
                return fail(EXIT_INTERRUPTED, err);
            }
            Err(err) => return fail(2, err),
        },
        (None, Some(dir)) => match snapshot::load(dir) {
            Ok(snapshot) => (snapshot.config.clone(), Some(snapshot)),
            Err(err) => return fail(2, err),
        },
        _ => {
            return fail(
                2,
                "give --config FILE (or --restore DIR, --check-host, --print-config FILE); \
                 see --help",
            );
        }
    };
    if let Some(dir) = &cli.snapshot {
        if !matches!(config.workload, Workload::Counter) {
            return fail(2, "--snapshot: only the counter workload has a checkpoint");
        }
        if snapshot::exists(dir) && !cli.overwrite {
            return fail(
                2,
                format!(
                    "--snapshot: {} holds a snapshot already; give --overwrite to replace it",
                    dir.display()
                ),
            );
        }
    }
    let json = cli.report == ReportFormat::Json;
    let metrics = std::sync::Arc::new(events::Metrics::default());
    let snapshot_dir = cli.snapshot.clone();
    let metrics_file = match &cli.metrics_file {
        Some(path) => match std::fs::File::create(path) {
            Ok(file) => Some(file),
            Err(err) => return fail(2, format!("--metrics-file {}: {err}", path.display())),
        },
        None => None,
    };
    // What the configuration needs from the host, before any guest runs.
    if let Err(err) = refvmm::engine::check_host(&config, &gmem::HostCaps::probe()) {
        return fail(2, err);
    }
    tracing::debug!(accel = ?config.accel, workload = refvmm::workload_name(&config.workload), "run starts");
    let outcome = events::run_with_event_loop(metrics.clone(), metrics_file, || {
        let mut serial: Box<dyn Write + Send> = if json {
            Box::new(std::io::stderr())
        } else {
            Box::new(std::io::stdout())
        };
        match config.accel {
            Accel::Kvm => kvm_run::run(
                &config,
                &mut *serial,
                kvm_run::KvmOptions {
                    snapshot_dir,
                    overwrite_snapshot: cli.overwrite,
                    restore,
                },
                &metrics,
            ),
            Accel::Soft => soft_run::run(&config, &metrics),
        }
    });
    let (result, live) = match outcome {
        Ok(outcome) => outcome,
        Err(err) => return fail(2, format!("event loop: {err}")),
    };
    let stopped = events::STOP.load(std::sync::atomic::Ordering::Relaxed);
    let result = match result {
        // A signal stopped the run part-way: report what it did.
        Err(RunError::Guest(why)) if stopped => {
            tracing::debug!(%why, "the run stopped on a signal");
            Ok(Report {
                accel: format!("{:?}", config.accel).to_lowercase(),
                backend: config.memory.backend.name().into(),
                vcpus: config.vcpus,
                memory_bytes: config.memory_bytes(),
                workload: refvmm::workload_name(&config.workload).into(),
                exit: STOPPED.into(),
                ..Report::default()
            })
        }
        other => other,
    };
    let result = result.map(|mut report| {
        report.vcpu_exits = live.vcpu_exits;
        report.passes = live.passes;
        report.interrupted = stopped || report.exit == STOPPED;
        if report.interrupted {
            report.exit = STOPPED.into();
        }
        report
    });
    match result {
        Ok(report) => {
            let text = if json {
                report.to_json()
            } else {
                report.to_human()
            };
            let mut out = std::io::stdout();
            let _ = writeln!(out, "{text}");
            if report.interrupted {
                ExitCode::from(EXIT_INTERRUPTED)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(err) => fail(err.exit_code() as u8, &err as &RunError),
    }
}
