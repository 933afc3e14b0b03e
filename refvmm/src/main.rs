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
    /// Run the VM described by this JSON file (`-`: standard input). With
    /// --check-host: check the host against what it needs instead. With
    /// --incoming: the fields this destination changes (where memory comes
    /// from: memory.backend, memory.huge_page_size, memory.prefault).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["print_config", "restore"])]
    config: Option<PathBuf>,
    /// Receive a VM migrating from another refvmm at ADDR (`unix:PATH` or
    /// `tcp:HOST:PORT`), and run the rest of its workload.
    #[arg(long, value_name = "ADDR", conflicts_with_all = ["print_config", "restore", "snapshot", "migrate_to", "check_host"])]
    incoming: Option<String>,
    /// Move the running VM to the refvmm listening at ADDR (`unix:PATH` or
    /// `tcp:HOST:PORT`), as the configuration's `migration` section says.
    /// Exit 0 once the destination took over; 3 when the migration failed
    /// and this process ran the workload to its end itself.
    #[arg(long, value_name = "ADDR", requires = "config", conflicts_with_all = ["snapshot", "restore"])]
    migrate_to: Option<String>,
    /// Report format.
    #[arg(long, value_enum, default_value_t = ReportFormat::Human)]
    report: ReportFormat,
    /// Print what this host offers, one capability a line (JSON with
    /// --report json); with --config, exit 2 when the host lacks what that
    /// configuration needs.
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
fn init_logs(log_file: Option<&std::path::Path>) -> std::io::Result<()> {
    use std::io::IsTerminal;
    let default_level = if log_file.is_some() { "debug" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match log_file {
        Some(path) => {
            let file = std::fs::File::create(path)?;
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

/// How a failed run ends: exit code, the field at fault (if any), and the
/// message; printed on stderr, and as one JSON object on stdout with
/// `--report json`.
struct Failure {
    code: u8,
    field: Option<String>,
    message: String,
    /// Where the guest stood, when a vCPU faulted or timed out.
    guest: Option<serde_json::Value>,
}

impl Failure {
    fn new(code: u8, message: impl std::fmt::Display) -> Self {
        Self {
            code,
            field: None,
            message: message.to_string(),
            guest: None,
        }
    }

    fn field(mut self, field: Option<&str>) -> Self {
        self.field = field.map(str::to_string);
        self
    }

    fn exit(self, json: bool) -> ExitCode {
        eprintln!("refvmm: {}", self.message);
        if json {
            let mut object = serde_json::json!({
                "exit": self.code,
                "error": { "field": self.field, "message": self.message },
            });
            if let Some(guest) = self.guest {
                object["error"]["guest"] = guest;
            }
            let _ = writeln!(std::io::stdout(), "{object}");
        }
        ExitCode::from(self.code)
    }
}

impl From<&RunError> for Failure {
    fn from(err: &RunError) -> Self {
        let mut failure = Failure::new(err.exit_code() as u8, err).field(err.field());
        if let RunError::GuestFault(fault) = err {
            failure.guest = serde_json::to_value(fault).ok();
        }
        failure
    }
}

/// `--check-host`: every capability by name, and with a configuration,
/// whether the host has what it needs (exit 2 when it does not).
fn check_host(config: Option<&Config>, json: bool) -> Result<ExitCode, Failure> {
    let caps = gmem::HostCaps::probe();
    let hidden = hidden_capability_names().map_err(|err| Failure::new(2, err))?;
    let needs = config.map(refvmm::engine::host_needs).unwrap_or_default();
    let verdict = config.map(|config| refvmm::engine::check_host(config, &caps));
    let failure = match &verdict {
        Some(Err(err)) => Some(Failure::from(err)),
        _ => None,
    };
    let mut out = std::io::stdout();
    if json {
        let capabilities: serde_json::Map<String, serde_json::Value> = gmem::Capability::ALL
            .iter()
            .map(|&cap| {
                (
                    cap.name().to_string(),
                    serde_json::json!({ "available": caps.has(cap), "detail": caps.detail(cap) }),
                )
            })
            .collect();
        let needs: Vec<serde_json::Value> = needs
            .iter()
            .map(|need| {
                serde_json::json!({
                    "capability": need.capability.name(),
                    "field": need.field,
                    "available": caps.has(need.capability),
                })
            })
            .collect();
        let mut object = serde_json::json!({ "capabilities": capabilities, "hidden": hidden });
        if let Some(verdict) = &verdict {
            object["config_needs"] = serde_json::Value::Array(needs);
            object["config_runs_here"] = serde_json::Value::Bool(verdict.is_ok());
        }
        // One object, whatever the verdict.
        object["exit"] = serde_json::json!(failure.as_ref().map_or(0, |f| f.code));
        if let Some(failure) = &failure {
            object["error"] =
                serde_json::json!({ "field": failure.field, "message": failure.message });
            eprintln!("refvmm: {}", failure.message);
        }
        let _ = writeln!(out, "{object}");
        return Ok(ExitCode::from(failure.map_or(0, |f| f.code)));
    }
    let _ = write!(out, "{caps}");
    for need in &needs {
        let answer = if caps.has(need.capability) {
            "yes"
        } else {
            "NO"
        };
        let _ = writeln!(
            out,
            "config needs {} (for {}): {answer}",
            need.capability, need.field
        );
    }
    match failure {
        Some(failure) => Err(failure),
        None => Ok(ExitCode::SUCCESS),
    }
}

/// The capabilities `MMUKIT_HIDE_CAPS` hides, by name; an unknown name is
/// an error.
fn hidden_capability_names() -> Result<Vec<&'static str>, String> {
    gmem::caps::hidden_from_env()
        .map(|hidden| hidden.iter().map(|cap| cap.name()).collect())
        .map_err(|err| err.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.report == ReportFormat::Json;
    match run(cli) {
        Ok(code) => code,
        Err(failure) => failure.exit(json),
    }
}

/// A configuration error: exit 2 (130 when a signal stopped the wait for
/// it), naming its field.
fn config_failure(err: refvmm::config::ConfigError) -> Failure {
    let code = match &err {
        refvmm::config::ConfigError::Read { .. }
            if events::STOP.load(std::sync::atomic::Ordering::Relaxed) =>
        {
            EXIT_INTERRUPTED
        }
        _ => 2,
    };
    let field = err.field().map(str::to_string);
    Failure::new(code, &err).field(field.as_deref())
}

fn run(cli: Cli) -> Result<ExitCode, Failure> {
    init_logs(cli.log_file.as_deref()).map_err(|err| {
        let path = cli.log_file.as_deref().unwrap_or(std::path::Path::new("-"));
        Failure::new(2, format!("--log-file {}: {err}", path.display())).field(Some("--log-file"))
    })?;
    let json = cli.report == ReportFormat::Json;
    if cli.check_host {
        let config = match &cli.config {
            Some(path) => Some(Config::load(path).map_err(config_failure)?),
            None => None,
        };
        return check_host(config.as_ref(), json);
    }
    if let Some(path) = &cli.print_config {
        let config = Config::load(path).map_err(config_failure)?;
        println!(
            "{}",
            serde_json::to_string_pretty(&config).expect("configs serialize")
        );
        return Ok(ExitCode::SUCCESS);
    }
    events::install_signal_handlers();
    if let Some(address) = &cli.incoming {
        return incoming(&cli, address, json);
    }
    let (config, restore) = match (&cli.config, &cli.restore) {
        (Some(path), None) => (Config::load(path).map_err(config_failure)?, None),
        (None, Some(dir)) => {
            let snapshot =
                snapshot::load(dir).map_err(|err| Failure::new(2, err).field(Some("--restore")))?;
            (snapshot.config.clone(), Some(snapshot))
        }
        _ => {
            return Err(Failure::new(
                2,
                "give --config FILE (or --restore DIR, --check-host, --print-config FILE); \
                 see --help",
            ));
        }
    };
    if let Some(dir) = &cli.snapshot {
        let refuse = |message: String| Failure::new(2, message).field(Some("--snapshot"));
        if !matches!(config.workload.kind, Workload::Counter) {
            return Err(refuse(
                "--snapshot: only the counter workload has a checkpoint".into(),
            ));
        }
        if snapshot::exists(dir) && !cli.overwrite {
            return Err(refuse(format!(
                "--snapshot: {} holds a snapshot already; give --overwrite to replace it",
                dir.display()
            )));
        }
    }
    let metrics = std::sync::Arc::new(events::Metrics::default());
    let snapshot_dir = cli.snapshot.clone();
    let metrics_file = open_metrics_file(cli.metrics_file.as_deref())?;
    let run_failure = |err: RunError| Failure::from(&err);
    let migration = match &cli.migrate_to {
        Some(address) => {
            let address: migrate::Address = address
                .parse()
                .map_err(|err| Failure::new(2, err).field(Some("--migrate-to")))?;
            config.check_migratable().map_err(config_failure)?;
            Some(refvmm::migration::SourcePlan::new(&config, address))
        }
        None => None,
    };
    // What the configuration needs from the host, before any guest runs.
    refvmm::engine::check_host(&config, &gmem::HostCaps::probe()).map_err(run_failure)?;
    tracing::debug!(accel = ?config.accel, workload = refvmm::workload_name(&config.workload), "run starts");
    let timeout = config
        .workload
        .timeout_ms
        .map(std::time::Duration::from_millis);
    let (result, live) =
        events::run_with_event_loop(metrics.clone(), metrics_file, timeout, || {
            let mut serial = serial_output(json);
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
                    migration.as_ref(),
                ),
                Accel::Soft => soft_run::run(&config, &metrics, migration.as_ref()),
            }
        })
        .map_err(|err| Failure::new(2, format!("event loop: {err}")))?;
    let stopped = events::STOP.load(std::sync::atomic::Ordering::Relaxed);
    let result = match result {
        // A signal stopped the run before the workload had anything to
        // report: report what it did.
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
    let mut report = result.map_err(|err| {
        if stopped {
            Failure::new(EXIT_INTERRUPTED, format!("{STOPPED}: {err}"))
        } else {
            run_failure(err)
        }
    })?;
    report.vcpu_exits = live.vcpu_exits;
    report.passes = live.passes;
    report.interrupted = stopped || report.exit == STOPPED;
    if report.interrupted {
        report.exit = STOPPED.into();
    }
    Ok(print_report(&report, json))
}

/// `--incoming ADDR`: receive a VM and run the rest of its workload.
fn incoming(cli: &Cli, address: &str, json: bool) -> Result<ExitCode, Failure> {
    use refvmm::migration::{Destination, Overrides};
    let address: migrate::Address = address
        .parse()
        .map_err(|err| Failure::new(2, err).field(Some("--incoming")))?;
    let overrides = match &cli.config {
        Some(path) => Overrides::load(path).map_err(config_failure)?,
        None => Overrides::default(),
    };
    let failure = |err: refvmm::migration::DestinationError| {
        Failure::new(err.exit_code(), &err).field(err.field().as_deref())
    };
    let destination = Destination::listen(address, overrides).map_err(failure)?;
    let metrics = std::sync::Arc::new(events::Metrics::default());
    let metrics_file = open_metrics_file(cli.metrics_file.as_deref())?;
    let (result, live) = events::run_with_event_loop(metrics.clone(), metrics_file, None, || {
        let mut serial = serial_output(json);
        destination.run(&mut *serial, &metrics)
    })
    .map_err(|err| Failure::new(2, format!("event loop: {err}")))?;
    let mut report = result.map_err(failure)?;
    report.vcpu_exits = live.vcpu_exits;
    report.passes = live.passes;
    report.interrupted = events::STOP.load(std::sync::atomic::Ordering::Relaxed);
    if report.interrupted {
        report.exit = STOPPED.into();
    }
    Ok(print_report(&report, json))
}

/// Prints `report` on stdout; the exit code it means: 130 when a signal
/// stopped the run, 3 when its migration failed, else 0.
fn print_report(report: &Report, json: bool) -> ExitCode {
    let text = if json {
        report.to_json()
    } else {
        report.to_human()
    };
    let _ = writeln!(std::io::stdout(), "{text}");
    let migration_failed = report
        .migration
        .as_ref()
        .is_some_and(|m| m.outcome != "completed");
    if report.interrupted {
        ExitCode::from(EXIT_INTERRUPTED)
    } else if migration_failed {
        ExitCode::from(refvmm::migration::EXIT_MIGRATION_FAILED)
    } else {
        ExitCode::SUCCESS
    }
}

/// Where the guest's serial output goes: stdout, or stderr when stdout
/// carries a JSON report.
fn serial_output(json: bool) -> Box<dyn Write + Send> {
    if json {
        Box::new(std::io::stderr())
    } else {
        Box::new(std::io::stdout())
    }
}

/// `--metrics-file`: created (truncated) before the run.
fn open_metrics_file(path: Option<&std::path::Path>) -> Result<Option<std::fs::File>, Failure> {
    path.map(|path| {
        std::fs::File::create(path).map_err(|err| {
            Failure::new(2, format!("--metrics-file {}: {err}", path.display()))
                .field(Some("--metrics-file"))
        })
    })
    .transpose()
}
