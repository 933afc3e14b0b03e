//! Live migration between two refvmm processes, composed from
//! `mmukit-migrate`: the source's migration thread ([`send`]) beside the
//! workload, which it meets through a [`Switch`]; the destination's side
//! in `destination.rs`.

mod destination;
mod figures;
mod switch;

use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use migrate::{
    Address, DirtyLog, GuestMemoryMap, Header, MigrateError, PassReport, SendOptions, SendReport,
    Sender,
};
use serde::{Deserialize, Serialize};

pub use destination::{Destination, DestinationError, OVERRIDABLE, Overrides};
pub use figures::{MigrationFigures, PassFigures};
pub use switch::{Handover, StateSections, Switch};

use crate::config::Config;
use crate::events::Metrics;

/// The exit code of a source whose migration failed: the source ran the
/// workload to its end itself.
pub const EXIT_MIGRATION_FAILED: u8 = 3;

/// The name of the workload's state section.
pub const WORKLOAD_SECTION: &str = "workload";

/// Where a workload stood when its vCPUs stopped for the switch-over.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadState {
    /// Dirty-log passes done (the populate pass not counted).
    pub passes_done: u32,
    /// Milliseconds the idle workload had idled.
    pub elapsed_ms: u64,
    /// Whether the program had ended (halted) when it moved.
    #[serde(default)]
    pub finished: bool,
    /// Bytes the guest wrote to the serial port so far.
    #[serde(default)]
    pub serial_bytes: u64,
}

impl WorkloadState {
    /// As a state section.
    pub fn section(&self) -> (String, Vec<u8>) {
        (
            WORKLOAD_SECTION.into(),
            serde_json::to_vec(self).expect("workload states serialize"),
        )
    }

    /// From the sections received; what is wrong, for the refusal.
    pub fn from_sections(state: &[(String, Vec<u8>)]) -> Result<Self, String> {
        let (_, bytes) = state
            .iter()
            .find(|(name, _)| name == WORKLOAD_SECTION)
            .ok_or("the stream carries no workload state")?;
        serde_json::from_slice(bytes).map_err(|err| format!("the workload state: {err}"))
    }
}

/// A source's migration: where to, and how.
#[derive(Clone, Debug)]
pub struct SourcePlan {
    /// The destination.
    pub address: Address,
    /// The configuration's `migration` section, as the sender's options.
    pub options: SendOptions,
    /// When to start, from the start of the workload.
    pub after: Duration,
}

impl SourcePlan {
    /// The plan of `config` to `address`.
    pub fn new(config: &Config, address: Address) -> Self {
        let m = &config.migration;
        Self {
            address,
            options: SendOptions {
                max_downtime: Duration::from_millis(m.max_downtime_ms),
                max_iterations: m.max_iterations,
                bandwidth: (m.bandwidth_mib_s > 0).then_some(m.bandwidth_mib_s << 20),
                streams: m.streams,
                ..SendOptions::default()
            },
            after: Duration::from_millis(m.after_ms),
        }
    }
}

/// The source's migration thread: waits for its time (or the workload's
/// end), sends memory while the workload runs, asks the workload to stop
/// its vCPUs, sends the rest and the state, and tells the workload how it
/// went through `switch`.
pub fn send(
    plan: &SourcePlan,
    config: &Config,
    memory: &GuestMemoryMap,
    log: &mut dyn DirtyLog,
    switch: &Switch,
    started: Instant,
    metrics: &Metrics,
) {
    switch.wait_to_start(started + plan.after);
    if switch.is_gone() {
        switch.finish(Err("the workload ended before the migration started".into()));
        return;
    }
    let outcome = send_all(plan, config, memory, log, switch, metrics);
    if let Err(err) = &outcome {
        tracing::warn!(%err, "migration failed; the source runs the workload to its end");
    }
    switch.finish(outcome.map_err(|err| err.to_string()));
}

fn send_all(
    plan: &SourcePlan,
    config: &Config,
    memory: &GuestMemoryMap,
    log: &mut dyn DirtyLog,
    switch: &Switch,
    metrics: &Metrics,
) -> Result<SendReport, MigrateError> {
    let header = Header {
        streams: 0,
        session: 0,
        memory_bytes: memory.bytes(),
        config: serde_json::to_string(config).expect("configs serialize"),
    };
    tracing::debug!(address = %plan.address, "migration connects");
    let mut sender = Sender::connect(&plan.address, header, plan.options)?;
    switch.start_precopy();
    let progress = Progress::new();
    let precopy = sender.precopy(memory, log, &|| switch.workload_finished(), &|pass| {
        count(metrics, pass);
        progress.pass(pass);
    })?;
    let Some((stopped, state)) = switch.request_stop() else {
        return Err(MigrateError::Protocol(
            "the workload ended without stopping its vCPUs",
        ));
    };
    let report = sender.switch_over(memory, log, precopy, &state, stopped)?;
    if let Some(last) = report.passes.last() {
        count(metrics, last);
    }
    progress.done(&report);
    Ok(report)
}

/// Adds a pass to the live metrics.
fn count(metrics: &Metrics, pass: &PassReport) {
    metrics.migration_passes.fetch_add(1, Ordering::Relaxed);
    metrics
        .migration_pages
        .fetch_add(pass.pages, Ordering::Relaxed);
    metrics
        .migration_bytes
        .fetch_add(pass.bytes, Ordering::Relaxed);
}

/// One line per pass on a terminal.
struct Progress {
    terminal: bool,
}

impl Progress {
    fn new() -> Self {
        Self {
            terminal: std::io::stderr().is_terminal(),
        }
    }

    fn pass(&self, pass: &PassReport) {
        if self.terminal {
            eprintln!(
                "migration pass {}: {} pages, {} MiB at {:.0} MiB/s; the guest dirtied {:.0} pages/s",
                pass.pass,
                pass.pages,
                pass.bytes >> 20,
                pass.bytes as f64 / pass.seconds.max(1e-9) / f64::from(1 << 20),
                pass.dirty_pages_per_s
            );
        }
    }

    fn done(&self, report: &SendReport) {
        if self.terminal {
            eprintln!(
                "migration: the destination took over after {:.3} s, downtime {:.1} ms",
                report.total_s,
                report.downtime_s * 1e3
            );
        }
    }
}

/// The source's figures for a migration that went `outcome`.
pub fn source_figures(
    plan: &SourcePlan,
    outcome: Option<Result<SendReport, String>>,
) -> MigrationFigures {
    let mut figures = MigrationFigures {
        role: "source".into(),
        address: plan.address.to_string(),
        max_downtime_ms: plan.options.max_downtime.as_millis() as u64,
        streams: plan.options.streams,
        ..MigrationFigures::default()
    };
    match outcome {
        Some(Ok(report)) => {
            figures.outcome = "completed".into();
            figures.setup_s = report.setup_s;
            figures.total_s = report.total_s;
            figures.downtime_s = report.downtime_s;
            figures.converged = report.converged;
            figures.zero_pages_skipped = report.zero_pages_skipped;
            figures.pages = report.passes.iter().map(|p| p.pages).sum();
            figures.bytes = report.bytes;
            figures.throughput_mib_s = report.throughput() / f64::from(1 << 20);
            figures.passes = report
                .passes
                .iter()
                .map(|p| PassFigures {
                    pages: p.pages,
                    bytes: p.bytes,
                    seconds: p.seconds,
                    dirty_pages_per_s: p.dirty_pages_per_s,
                })
                .collect();
        }
        Some(Err(why)) => {
            figures.outcome = "failed".into();
            figures.why = Some(why);
        }
        None => {
            figures.outcome = "failed".into();
            figures.why = Some("the migration did not run".into());
        }
    }
    figures
}
