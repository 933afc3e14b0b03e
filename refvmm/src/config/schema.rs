//! The configuration's sections as serde reads them: every field, its
//! default and its type; the workload is read loosely and checked against
//! its kind (which fields belong to which kind) here.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Which accelerator runs the VM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Accel {
    /// Real KVM.
    #[default]
    Kvm,
    /// The software MMU stack.
    Soft,
}

/// Where guest memory comes from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendName {
    /// Shared anonymous memory.
    #[default]
    Anonymous,
    /// memfd.
    Memfd,
    /// HugeTLB memfd.
    Hugetlb,
    /// memfd_secret.
    Secret,
    /// KVM guest_memfd.
    GuestMemfd,
}

impl BackendName {
    /// The name used in configurations.
    pub fn name(self) -> &'static str {
        match self {
            Self::Anonymous => "anonymous",
            Self::Memfd => "memfd",
            Self::Hugetlb => "hugetlb",
            Self::Secret => "secret",
            Self::GuestMemfd => "guest_memfd",
        }
    }
}

/// HugeTLB page size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePageSize {
    /// 2 MiB.
    #[default]
    #[serde(rename = "2M")]
    Size2M,
    /// 1 GiB.
    #[serde(rename = "1G")]
    Size1G,
}

impl HugePageSize {
    /// log2 of the size.
    pub fn log2(self) -> u8 {
        match self {
            Self::Size2M => 21,
            Self::Size1G => 30,
        }
    }
}

/// Guest memory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryConfig {
    /// Size in MiB.
    pub size_mib: u64,
    /// Backend.
    pub backend: BackendName,
    /// HugeTLB page size (hugetlb backend only).
    pub huge_page_size: HugePageSize,
    /// Populate all memory before the guest runs.
    pub prefault: bool,
    /// Threads for the prefault.
    pub prefault_threads: usize,
    /// The backend of a guest memory file that holds the VM's private
    /// memory (soft accelerator): with `tdx.enabled` a TD, otherwise a
    /// software-protected VM. `backend` stays the shared memory. The file
    /// is as big as the memory; HugeTLB uses `huge_page_size`.
    pub private_backend: Option<BackendName>,
    /// Refuse to run unless the memory gets transparent huge pages: the
    /// host's anonymous THP mode allows them for anonymous memory of a VM
    /// with no private pages (private anonymous memory), its shmem THP mode
    /// for memfd memory and for the anonymous memory of a VM with private
    /// pages (shared anonymous memory, which is shmem). They are asked for
    /// wherever allowed either way.
    pub require_transparent_huge_pages: bool,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            size_mib: 64,
            backend: BackendName::Anonymous,
            huge_page_size: HugePageSize::Size2M,
            prefault: false,
            prefault_threads: 2,
            private_backend: None,
            require_transparent_huge_pages: false,
        }
    }
}

/// The software MMU (soft accelerator).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MmuConfig {
    /// Split huge pages when dirty logging starts.
    pub eager_split: bool,
    /// Manual-protect dirty logging with "initially set".
    pub manual_protect: bool,
    /// Capacity of the per-vCPU caches.
    pub cache_capacity: usize,
}

impl Default for MmuConfig {
    fn default() -> Self {
        Self {
            eager_split: true,
            manual_protect: false,
            cache_capacity: 40,
        }
    }
}

/// When S-EPT pages become PAMT-backed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PamtPolicyName {
    /// Just before they are handed to the module.
    #[default]
    OnInstall,
    /// When they enter the MMU's cache.
    OnCacheEntry,
}

/// TDX (soft accelerator only).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TdxConfig {
    /// Run the guest memory as a TD over the software TDX module.
    pub enabled: bool,
    /// PAMT policy.
    pub pamt_policy: PamtPolicyName,
}

/// Processor mode a binary starts in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BinaryMode {
    /// 16-bit real mode.
    #[default]
    Real,
    /// 64-bit long mode with the first 1 GiB identity mapped.
    Long,
}

/// The `workload` section: what the guest runs, and for how long at most.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawWorkload")]
pub struct WorkloadConfig {
    /// What the guest runs (the section's `kind` and its fields).
    pub kind: Workload,
    /// Fail the run (exit 1, with the vCPUs' registers) when it has not
    /// ended after this many milliseconds; none by default.
    pub timeout_ms: Option<u64>,
}

impl std::ops::Deref for WorkloadConfig {
    type Target = Workload;

    fn deref(&self) -> &Workload {
        &self.kind
    }
}

impl From<Workload> for WorkloadConfig {
    fn from(kind: Workload) -> Self {
        Self {
            kind,
            timeout_ms: None,
        }
    }
}

impl Serialize for WorkloadConfig {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        /// The section as written: the kind's fields, then the timeout.
        #[derive(Serialize)]
        struct Section<'a> {
            #[serde(flatten)]
            kind: &'a Workload,
            #[serde(skip_serializing_if = "Option::is_none")]
            timeout_ms: Option<u64>,
        }
        Section {
            kind: &self.kind,
            timeout_ms: self.timeout_ms,
        }
        .serialize(serializer)
    }
}

/// What the guest runs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Workload {
    /// Prints a line on the serial port and halts.
    #[default]
    Hello,
    /// The kernel's dirty_log_perf_test.
    DirtyLog {
        /// Passes after the populating one.
        iterations: u32,
        /// Memory each vCPU writes, in MiB.
        bytes_per_vcpu_mib: u64,
        /// Percentage of pages written (the rest are read).
        write_percent: u32,
    },
    /// Prints 0 to 9, with a checkpoint after 4 (snapshot and restore).
    Counter,
    /// vCPU threads convert their memory between private and shared the
    /// way a TD guest does with MapGPA (a 4 KiB page inside a 2 MiB page,
    /// and a whole 2 MiB page, each way), writing and checking data on both
    /// sides (soft accelerator, with `memory.private_backend`).
    Convert {
        /// Rounds per vCPU.
        rounds: u32,
        /// 2 MiB pages each vCPU owns (at least 2).
        huge_pages_per_vcpu: u64,
    },
    /// The vCPUs halt until the VM is migrated or `duration_ms` passes;
    /// guest memory holds `fill` (the idle guest of a migration).
    Idle {
        /// How long the guest idles, at most.
        duration_ms: u64,
        /// What guest memory holds before the guest starts.
        fill: Fill,
    },
    /// A flat binary from a file.
    Binary {
        /// The file.
        path: PathBuf,
        /// Where it is loaded.
        load_gpa: u64,
        /// Where execution starts.
        entry_gpa: u64,
        /// Processor mode.
        mode: BinaryMode,
    },
}

/// What guest memory holds before an `idle` guest starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fill {
    /// Zeros: what fresh memory holds.
    #[default]
    Zero,
    /// Pseudo-random bytes in every page (no page is zero); on `kvm`,
    /// every page from [`layout::IDLE_FILL`](super::layout::IDLE_FILL),
    /// above the guest's program.
    Random,
}

/// The kinds of workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum WorkloadKind {
    Hello,
    DirtyLog,
    Counter,
    Convert,
    Binary,
    Idle,
}

/// The workload as written: every field named on its own (so that a wrong
/// type names its field), checked against the kind afterwards.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkload {
    kind: WorkloadKind,
    iterations: Option<u32>,
    bytes_per_vcpu_mib: Option<u64>,
    write_percent: Option<u32>,
    path: Option<PathBuf>,
    load_gpa: Option<u64>,
    entry_gpa: Option<u64>,
    mode: Option<BinaryMode>,
    rounds: Option<u32>,
    huge_pages_per_vcpu: Option<u64>,
    duration_ms: Option<u64>,
    fill: Option<Fill>,
    timeout_ms: Option<u64>,
}

/// A workload whose fields do not fit its kind (serde reports it at the
/// `workload` field).
#[derive(Debug, thiserror::Error)]
pub enum WorkloadShapeError {
    /// `timeout_ms` of 0.
    #[error("`timeout_ms` must be at least 1 (leave it out for no limit)")]
    ZeroTimeout,
    /// A field of another kind.
    #[error("`{field}` does not apply to kind \"{kind}\"")]
    Foreign {
        /// The field.
        field: &'static str,
        /// The kind.
        kind: &'static str,
    },
    /// A field the kind needs.
    #[error("kind \"binary\" needs `{field}`")]
    Missing {
        /// The field.
        field: &'static str,
    },
}

impl TryFrom<RawWorkload> for WorkloadConfig {
    type Error = WorkloadShapeError;

    fn try_from(raw: RawWorkload) -> Result<Self, WorkloadShapeError> {
        let timeout_ms = raw.timeout_ms;
        if timeout_ms == Some(0) {
            return Err(WorkloadShapeError::ZeroTimeout);
        }
        Ok(Self {
            kind: Workload::try_from(raw)?,
            timeout_ms,
        })
    }
}

impl TryFrom<RawWorkload> for Workload {
    type Error = WorkloadShapeError;

    fn try_from(raw: RawWorkload) -> Result<Self, WorkloadShapeError> {
        let dirty_log_fields = [
            ("iterations", raw.iterations.is_some()),
            ("bytes_per_vcpu_mib", raw.bytes_per_vcpu_mib.is_some()),
            ("write_percent", raw.write_percent.is_some()),
        ];
        let binary_fields = [
            ("path", raw.path.is_some()),
            ("load_gpa", raw.load_gpa.is_some()),
            ("entry_gpa", raw.entry_gpa.is_some()),
            ("mode", raw.mode.is_some()),
        ];
        let convert_fields = [
            ("rounds", raw.rounds.is_some()),
            ("huge_pages_per_vcpu", raw.huge_pages_per_vcpu.is_some()),
        ];
        let idle_fields = [
            ("duration_ms", raw.duration_ms.is_some()),
            ("fill", raw.fill.is_some()),
        ];
        let foreign = |fields: &[(&'static str, bool)], kind: &'static str| match fields
            .iter()
            .find(|(_, set)| *set)
        {
            Some(&(field, _)) => Err(WorkloadShapeError::Foreign { field, kind }),
            None => Ok(()),
        };
        let need = |value: Option<u64>, field: &'static str| {
            value.ok_or(WorkloadShapeError::Missing { field })
        };
        Ok(match raw.kind {
            WorkloadKind::Hello | WorkloadKind::Counter => {
                let (kind, workload) = match raw.kind {
                    WorkloadKind::Hello => ("hello", Self::Hello),
                    _ => ("counter", Self::Counter),
                };
                foreign(&dirty_log_fields, kind)?;
                foreign(&binary_fields, kind)?;
                foreign(&convert_fields, kind)?;
                foreign(&idle_fields, kind)?;
                workload
            }
            WorkloadKind::Idle => {
                foreign(&dirty_log_fields, "idle")?;
                foreign(&binary_fields, "idle")?;
                foreign(&convert_fields, "idle")?;
                Self::Idle {
                    duration_ms: raw.duration_ms.unwrap_or(10_000),
                    fill: raw.fill.unwrap_or_default(),
                }
            }
            WorkloadKind::Convert => {
                foreign(&dirty_log_fields, "convert")?;
                foreign(&binary_fields, "convert")?;
                foreign(&idle_fields, "convert")?;
                Self::Convert {
                    rounds: raw.rounds.unwrap_or(4),
                    huge_pages_per_vcpu: raw.huge_pages_per_vcpu.unwrap_or(2),
                }
            }
            WorkloadKind::DirtyLog => {
                foreign(&binary_fields, "dirty_log")?;
                foreign(&convert_fields, "dirty_log")?;
                foreign(&idle_fields, "dirty_log")?;
                Self::DirtyLog {
                    iterations: raw.iterations.unwrap_or_else(default_iterations),
                    bytes_per_vcpu_mib: raw
                        .bytes_per_vcpu_mib
                        .unwrap_or_else(default_bytes_per_vcpu_mib),
                    write_percent: raw.write_percent.unwrap_or_else(default_write_percent),
                }
            }
            WorkloadKind::Binary => {
                foreign(&dirty_log_fields, "binary")?;
                foreign(&convert_fields, "binary")?;
                foreign(&idle_fields, "binary")?;
                Self::Binary {
                    path: raw
                        .path
                        .ok_or(WorkloadShapeError::Missing { field: "path" })?,
                    load_gpa: need(raw.load_gpa, "load_gpa")?,
                    entry_gpa: need(raw.entry_gpa, "entry_gpa")?,
                    mode: raw.mode.unwrap_or_default(),
                }
            }
        })
    }
}

fn default_iterations() -> u32 {
    3
}

fn default_bytes_per_vcpu_mib() -> u64 {
    8
}

fn default_write_percent() -> u32 {
    100
}

/// The `migration` section: how the VM moves when `--migrate-to` is given.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MigrationConfig {
    /// When the migration starts, from the start of the workload.
    pub after_ms: u64,
    /// The downtime allowed: switch over once what is left would take
    /// less to send (QEMU's default, 300 ms).
    pub max_downtime_ms: u64,
    /// Passes after the full copy before switching over, converged or not.
    pub max_iterations: u32,
    /// MiB per second at most; 0 for no limit.
    pub bandwidth_mib_s: u64,
    /// Connections that carry memory (as QEMU's multifd channels).
    pub streams: u32,
}

impl Default for MigrationConfig {
    fn default() -> Self {
        Self {
            after_ms: 0,
            max_downtime_ms: 300,
            max_iterations: 30,
            bandwidth_mib_s: 0,
            streams: 1,
        }
    }
}
