//! The destination: `refvmm --incoming ADDR [--config partial.json]`.
//! It listens on exactly that address, reads the VM's configuration from
//! the stream, lets a partial configuration change where memory comes from
//! (and nothing else), makes the memory, receives it and the state, and
//! runs the rest of the workload. Whatever is refused is refused before
//! the guest runs, and the source is told (it resumes).

use std::path::{Path, PathBuf};
use std::time::Instant;

use migrate::{Address, Incoming, Limits, Listener, MigrateError};

use super::{MigrationFigures, WorkloadState};
use crate::config::{Accel, Config, ConfigError};
use crate::engine::RunError;
use crate::events::Metrics;
use crate::kvm_run;
use crate::report::Report;
use crate::soft_run::{self, SoftMemory, Start};

/// The fields a destination's configuration may set: where memory comes
/// from.
pub const OVERRIDABLE: [&str; 3] = ["memory.backend", "memory.huge_page_size", "memory.prefault"];

/// Why a destination did not run the VM.
#[derive(Debug, thiserror::Error)]
pub enum DestinationError {
    /// The address cannot be listened on.
    #[error("--incoming {address}: {source}")]
    Listen {
        /// The address.
        address: String,
        /// The system's error.
        source: std::io::Error,
    },
    /// The destination's configuration, or the VM's with it, is refused.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// This host cannot run the VM.
    #[error("{0}")]
    Host(RunError),
    /// The stream failed: the source stopped, or sent something damaged.
    #[error("incoming migration: {0}")]
    Stream(#[from] MigrateError),
    /// The state received does not fit the workload.
    #[error("incoming migration: {0}")]
    State(String),
    /// The workload failed after the take-over.
    #[error("{0}")]
    Run(RunError),
}

impl DestinationError {
    /// The exit code: 2 for what was refused before receiving, 1 for a
    /// stream that stopped or a guest that failed.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Listen { .. } | Self::Config(_) => 2,
            Self::Host(err) | Self::Run(err) => err.exit_code() as u8,
            Self::Stream(_) | Self::State(_) => 1,
        }
    }

    /// The field at fault, when there is one.
    pub fn field(&self) -> Option<String> {
        match self {
            Self::Listen { .. } => Some("--incoming".into()),
            Self::Config(err) => err.field().map(str::to_string),
            Self::Host(err) | Self::Run(err) => err.field().map(str::to_string),
            Self::Stream(_) | Self::State(_) => None,
        }
    }
}

/// A destination's partial configuration.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    fields: serde_json::Map<String, serde_json::Value>,
    path: Option<PathBuf>,
}

impl Overrides {
    /// Reads `path`: one JSON object that sets only [`OVERRIDABLE`]
    /// fields.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let parse_error = |field: Option<String>, message: String| ConfigError::Parse {
            path: path.to_owned(),
            field,
            message,
        };
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|err| parse_error(None, err.to_string()))?;
        let serde_json::Value::Object(fields) = value else {
            return Err(parse_error(
                None,
                "a destination's configuration is one JSON object".into(),
            ));
        };
        for (section, value) in &fields {
            let leaves: Vec<String> = match value {
                serde_json::Value::Object(inner) => {
                    inner.keys().map(|key| format!("{section}.{key}")).collect()
                }
                _ => vec![section.clone()],
            };
            if let Some(field) = leaves.iter().find(|f| !OVERRIDABLE.contains(&f.as_str())) {
                return Err(parse_error(
                    Some(field.clone()),
                    format!(
                        "a destination may change only where memory comes from ({}); the rest \
                         of the configuration travels with the VM",
                        OVERRIDABLE.join(", ")
                    ),
                ));
            }
        }
        Ok(Self {
            fields,
            path: Some(path.to_owned()),
        })
    }

    /// The VM's configuration (`source`, as the stream carries it) with
    /// these fields set, checked whole.
    pub fn apply(&self, source: &str) -> Result<Config, ConfigError> {
        let mut config: serde_json::Value =
            serde_json::from_str(source).map_err(|err| ConfigError::Parse {
                path: PathBuf::from("<stream>"),
                field: None,
                message: format!("the stream's configuration: {err}"),
            })?;
        for (section, value) in &self.fields {
            match (config.get_mut(section), value) {
                (Some(serde_json::Value::Object(target)), serde_json::Value::Object(inner)) => {
                    for (key, value) in inner {
                        target.insert(key.clone(), value.clone());
                    }
                }
                _ => {
                    config[section] = value.clone();
                }
            }
        }
        Config::parse(&config.to_string()).map_err(|err| match (err, &self.path) {
            (ConfigError::Invalid { field, message, .. }, Some(path)) => ConfigError::Invalid {
                file: Some(path.clone()),
                field,
                message,
            },
            (err, _) => err,
        })
    }
}

/// Where a received VM runs.
enum Machine {
    /// The soft accelerator's memory.
    Soft(SoftMemory),
    /// A KVM VM with its memory bound.
    Kvm(kvm_run::Vm),
}

/// A destination waiting for its VM.
#[derive(Debug)]
pub struct Destination {
    address: Address,
    listener: Listener,
    overrides: Overrides,
}

impl Destination {
    /// Listens on `address`.
    pub fn listen(address: Address, overrides: Overrides) -> Result<Self, DestinationError> {
        let listener = Listener::bind(&address).map_err(|source| DestinationError::Listen {
            address: address.to_string(),
            source,
        })?;
        Ok(Self {
            address,
            listener,
            overrides,
        })
    }

    /// The most memory a stream may bring: what the host has available,
    /// in ordinary pages and in its HugeTLB pools.
    fn memory_limit() -> u64 {
        let caps = gmem::HostCaps::get();
        let huge: u64 = [2u64 << 20, 1 << 30]
            .iter()
            .filter_map(|&size| caps.pool(size).map(|pool| pool.available * size))
            .sum();
        caps.mem_available
            .map_or(u64::MAX, |available| available + huge)
    }

    /// Receives the VM and runs the rest of its workload (its serial
    /// output to `serial`).
    pub fn run(
        self,
        serial: &mut dyn std::io::Write,
        metrics: &Metrics,
    ) -> Result<Report, DestinationError> {
        let limits = Limits {
            max_memory_bytes: Self::memory_limit(),
            ..Limits::default()
        };
        let incoming = Incoming::accept(&self.listener, limits)?;
        let started = Instant::now();
        let config = match self.judge(incoming.header().config.as_str()) {
            Ok(config) => config,
            Err(err) => {
                incoming.refuse(&err.to_string());
                return Err(err);
            }
        };
        tracing::debug!(accel = ?config.accel, "incoming VM accepted");
        let machine = match config.accel {
            Accel::Soft => SoftMemory::create(&config).map(Machine::Soft),
            Accel::Kvm => kvm_run::build(&config).map(Machine::Kvm),
        };
        let machine = match machine {
            Ok(machine) => machine,
            Err(err) => {
                incoming.refuse(&err.to_string());
                return Err(DestinationError::Host(err));
            }
        };
        let map = match &machine {
            Machine::Soft(memory) => memory.map(),
            Machine::Kvm(vm) => vm.memory_map(),
        };
        // SAFETY: no vCPU exists yet: nothing else touches the memory.
        let received = unsafe { incoming.receive(&map) }?;
        drop(map);
        let state = match WorkloadState::from_sections(&received.state) {
            Ok(state) => state,
            Err(why) => {
                received.refuse(&why);
                return Err(DestinationError::State(why));
            }
        };
        let figures = MigrationFigures {
            role: "destination".into(),
            address: self.address.to_string(),
            outcome: "completed".into(),
            total_s: started.elapsed().as_secs_f64(),
            pages: received.report.pages,
            bytes: received.report.bytes,
            throughput_mib_s: received.report.bytes as f64
                / received.report.seconds.max(1e-9)
                / f64::from(1 << 20),
            pages_changed_in_flight: received.report.pages_changed_in_flight,
            ..MigrationFigures::default()
        };
        // The source stops only once it hears this; a destination that
        // cannot say it runs nothing (the source resumes).
        let sections = received.state.clone();
        received.taken_over()?;
        tracing::debug!(?state, "the destination took over");
        let mut report = match machine {
            Machine::Soft(memory) => {
                soft_run::run_on(&config, metrics, memory, Start::Resumed(state), None)
            }
            Machine::Kvm(vm) => kvm_run::resume(&config, &vm, &sections, state, serial, metrics),
        }
        .map_err(DestinationError::Run)?;
        report.migration = Some(figures);
        Ok(report)
    }

    /// The VM's configuration with this destination's fields, checked
    /// against what migrates and what this host has.
    fn judge(&self, source: &str) -> Result<Config, DestinationError> {
        let config = self.overrides.apply(source)?;
        config.check_migratable()?;
        crate::engine::check_host(&config, gmem::HostCaps::get())
            .map_err(DestinationError::Host)?;
        Ok(config)
    }
}
