//! The configuration: one serde struct, the only source of defaults.
//! Unknown fields are errors, and every check names the field.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Errors of configurations; each names the field and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The JSON does not fit the schema.
    #[error("{}: {}{message}", .path.display(), .field.as_ref().map(|f| format!("{f}: ")).unwrap_or_default())]
    Parse {
        /// The file (`<config>` for text given directly, `<stdin>`).
        path: PathBuf,
        /// The field, as a JSON path, when the problem is inside one.
        field: Option<String>,
        /// What is wrong, with line and column.
        message: String,
    },
    /// A value is out of range or a combination is refused.
    #[error("{}{field}: {message}", file_prefix(.file.as_deref()))]
    Invalid {
        /// The file, when the configuration came from one.
        file: Option<PathBuf>,
        /// The field, as a JSON path.
        field: &'static str,
        /// What is wrong and what to do.
        message: String,
    },
}

impl ConfigError {
    /// The configuration field the error is about, when it names one.
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::Invalid { field, .. } => Some(field),
            Self::Parse { field, .. } => field.as_deref(),
            Self::Read { .. } => None,
        }
    }
}

fn file_prefix(file: Option<&std::path::Path>) -> String {
    file.map(|file| format!("{}: ", file.display()))
        .unwrap_or_default()
}

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        file: None,
        field,
        message: message.into(),
    }
}

/// serde's words made a user's: no Rust type names (`struct MemoryConfig`,
/// `u64`), and no float notation for an integer that does not fit.
fn plain_words(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find("expected ") {
        out.push_str(&rest[..at + "expected ".len()]);
        rest = &rest[at + "expected ".len()..];
        let word_end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ' '))
            .unwrap_or(rest.len());
        let expected = &rest[..word_end];
        let (plain, used) = if let Some(name) = expected.strip_prefix("struct ") {
            let name_len = name.find(' ').unwrap_or(name.len());
            ("a JSON object", "struct ".len() + name_len)
        } else if let Some(kind) = ["u64", "u32", "u16", "u8", "usize"]
            .into_iter()
            .find(|kind| expected.starts_with(kind))
        {
            ("a whole number of at least 0", kind.len())
        } else if expected.starts_with("a boolean") {
            ("true or false", "a boolean".len())
        } else {
            ("", 0)
        };
        out.push_str(plain);
        rest = &rest[used..];
    }
    out.push_str(rest);
    // A large integer reaches serde as a float: say what it was.
    if let Some(start) = out.find("floating point `") {
        let end = out[start + 16..]
            .find('`')
            .map_or(out.len(), |e| start + 16 + e + 1);
        out.replace_range(start..end, "a number that is not a whole number in range");
    }
    out
}

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
    /// Refuse to run unless the memory gets transparent huge pages (the
    /// host's shmem THP mode allows them: gmem's anonymous and memfd
    /// memory are shmem). They are asked for wherever allowed either way.
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

/// The kinds of workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum WorkloadKind {
    Hello,
    DirtyLog,
    Counter,
    Convert,
    Binary,
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
    timeout_ms: Option<u64>,
}

impl TryFrom<RawWorkload> for WorkloadConfig {
    type Error = String;

    fn try_from(raw: RawWorkload) -> Result<Self, String> {
        let timeout_ms = raw.timeout_ms;
        if timeout_ms == Some(0) {
            return Err("`timeout_ms` must be at least 1 (leave it out for no limit)".into());
        }
        Ok(Self {
            kind: Workload::try_from(raw)?,
            timeout_ms,
        })
    }
}

impl TryFrom<RawWorkload> for Workload {
    type Error = String;

    fn try_from(raw: RawWorkload) -> Result<Self, String> {
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
        let foreign = |fields: &[(&str, bool)], kind: &str| -> Result<(), String> {
            match fields.iter().find(|(_, set)| *set) {
                Some((name, _)) => Err(format!("`{name}` does not apply to kind \"{kind}\"")),
                None => Ok(()),
            }
        };
        let need = |value: Option<u64>, name: &str| {
            value.ok_or_else(|| format!("kind \"binary\" needs `{name}`"))
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
                workload
            }
            WorkloadKind::Convert => {
                foreign(&dirty_log_fields, "convert")?;
                foreign(&binary_fields, "convert")?;
                Self::Convert {
                    rounds: raw.rounds.unwrap_or(4),
                    huge_pages_per_vcpu: raw.huge_pages_per_vcpu.unwrap_or(2),
                }
            }
            WorkloadKind::DirtyLog => {
                foreign(&binary_fields, "dirty_log")?;
                foreign(&convert_fields, "dirty_log")?;
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
                Self::Binary {
                    path: raw
                        .path
                        .ok_or_else(|| "kind \"binary\" needs `path`".to_string())?,
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

/// A VM and what it runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// vCPUs.
    pub vcpus: u32,
    /// Accelerator.
    pub accel: Accel,
    /// Memory.
    pub memory: MemoryConfig,
    /// Software MMU.
    pub mmu: MmuConfig,
    /// TDX.
    pub tdx: TdxConfig,
    /// Workload.
    pub workload: WorkloadConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            vcpus: 2,
            accel: Accel::Kvm,
            memory: MemoryConfig::default(),
            mmu: MmuConfig::default(),
            tdx: TdxConfig::default(),
            workload: Workload::Hello.into(),
        }
    }
}

/// Guest-physical layout used by the built-in workloads.
pub mod layout {
    /// Where built-in programs are loaded.
    pub const CODE: u64 = 0x1000;
    /// Where the vCPUs after the first of a `hello`, `counter` or `binary`
    /// run park: one `hlt` instruction, below [`CODE`].
    pub const PARK: u64 = 0xff0;
    /// Where the dirty-log shares of the vCPUs start in guest memory of
    /// up to [`MMIO_HOLE_START`].
    pub const SHARES: u64 = 1 << 20;
    /// Guest memory is laid out as real machines lay it out: below this
    /// (3 GiB) at its own address, and the rest from [`HIGH_MEMORY`], past
    /// the MMIO hole (the local APIC, the IOAPIC, PCI windows).
    pub const MMIO_HOLE_START: u64 = 3 << 30;
    /// Where memory above the hole starts (4 GiB).
    pub const HIGH_MEMORY: u64 = 4 << 30;
    /// The most guest memory the KVM dirty-log guest maps (its page tables
    /// live below [`SHARES`]).
    pub const MAX_MAPPED_GIB: u64 = 240;

    /// Where the dirty-log shares start, in guest memory (not a guest
    /// physical address: above the hole they differ by 1 GiB). Memory of up
    /// to 3 GiB keeps them at [`SHARES`]; bigger memory puts them at its
    /// top, so that the guest writes past 4 GiB.
    pub fn shares_start(memory_bytes: u64, total_share_bytes: u64) -> u64 {
        if memory_bytes <= MMIO_HOLE_START {
            SHARES
        } else {
            (memory_bytes - total_share_bytes) & !((2 << 20) - 1)
        }
    }

    /// The guest physical address of guest memory offset `offset`.
    pub fn gpa_of(offset: u64) -> u64 {
        if offset < MMIO_HOLE_START {
            offset
        } else {
            offset - MMIO_HOLE_START + HIGH_MEMORY
        }
    }
}

/// The largest configuration refvmm reads.
pub const MAX_CONFIG_BYTES: usize = 1 << 20;

/// Reads a configuration from `path`, which may be a pipe or a FIFO: at
/// most [`MAX_CONFIG_BYTES`], and a SIGINT or SIGTERM while it waits for
/// input stops the read (`Interrupted`).
fn read_config_text(path: &std::path::Path) -> std::io::Result<String> {
    use std::io::{Error, ErrorKind, Read};
    use std::os::unix::fs::OpenOptionsExt;
    use std::sync::atomic::Ordering;

    // Non-blocking, so that opening a FIFO with no writer yet returns and
    // the wait below can see a signal.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if crate::events::STOP.load(Ordering::Relaxed) {
            return Err(Error::new(
                ErrorKind::Interrupted,
                "stopped by a signal while waiting for the configuration",
            ));
        }
        match file.read(&mut chunk) {
            Ok(0) => {
                // End of a file, or a FIFO whose writer closed it. A FIFO
                // that never had a writer also reads 0: wait for one.
                let is_fifo = file
                    .metadata()
                    .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_fifo(&m.file_type()));
                if !is_fifo || !bytes.is_empty() || fifo_had_writer(&file) {
                    break;
                }
                wait_readable(&file);
            }
            Ok(n) => {
                if bytes.len() + n > MAX_CONFIG_BYTES {
                    return Err(Error::new(
                        ErrorKind::InvalidData,
                        format!("larger than the {MAX_CONFIG_BYTES}-byte limit of a configuration"),
                    ));
                }
                bytes.extend_from_slice(&chunk[..n]);
            }
            Err(err) if err.kind() == ErrorKind::WouldBlock => wait_readable(&file),
            Err(err) if err.kind() == ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    String::from_utf8(bytes).map_err(|_| Error::new(ErrorKind::InvalidData, "not UTF-8 text"))
}

/// Whether a writer has opened the FIFO and gone (poll says POLLHUP).
fn fifo_had_writer(file: &std::fs::File) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let mut fds = [PollFd::new(file, PollFlags::IN)];
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    matches!(poll(&mut fds, Some(&now)), Ok(n) if n > 0)
        && fds[0].revents().contains(PollFlags::HUP)
}

/// Waits up to 100 ms for `file` to become readable (or hung up); a signal
/// ends the wait early.
fn wait_readable(file: &std::fs::File) {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let mut fds = [PollFd::new(file, PollFlags::IN)];
    let timeout = Timespec {
        tv_sec: 0,
        tv_nsec: 100_000_000,
    };
    let _ = poll(&mut fds, Some(&timeout));
}

impl Config {
    /// Reads and checks a configuration file (a pipe or FIFO too, and `-`
    /// for standard input): at most 1 MiB, one JSON object and nothing
    /// after it. Every error names the file.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let stdin = path.as_os_str() == "-";
        let shown = if stdin {
            PathBuf::from("<stdin>")
        } else {
            path.to_owned()
        };
        let text = if stdin {
            read_config_text(std::path::Path::new("/dev/stdin"))
        } else {
            read_config_text(path)
        }
        .map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        let in_file = |err| match err {
            ConfigError::Parse { field, message, .. } => ConfigError::Parse {
                path: shown.clone(),
                field,
                message,
            },
            ConfigError::Invalid { field, message, .. } => ConfigError::Invalid {
                file: Some(shown.clone()),
                field,
                message,
            },
            other => other,
        };
        let mut config = Self::parse_unchecked(&text).map_err(in_file)?;
        // A binary named by a relative path lies next to the configuration.
        if let Workload::Binary { path: binary, .. } = &mut config.workload.kind
            && binary.is_relative()
            && !stdin
            && let Some(dir) = path.parent()
        {
            *binary = dir.join(&*binary);
        }
        config.validate().map_err(in_file)?;
        Ok(config)
    }

    /// Parses and checks configuration text: one JSON object, and nothing
    /// but white space after it.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config = Self::parse_unchecked(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Parses configuration text without the range and combination checks.
    fn parse_unchecked(text: &str) -> Result<Self, ConfigError> {
        let parse_error = |field: Option<String>, message: String| ConfigError::Parse {
            path: PathBuf::from("<config>"),
            field,
            message,
        };
        if text.trim().is_empty() {
            return Err(parse_error(
                None,
                "the configuration is empty: it is one JSON object, such as {\"workload\": \
                 {\"kind\": \"hello\"}}"
                    .into(),
            ));
        }
        if text.starts_with('\u{feff}') {
            return Err(parse_error(
                None,
                "the file starts with a UTF-8 byte-order mark: save it as plain UTF-8".into(),
            ));
        }
        if !text.trim_start().starts_with('{') {
            return Err(parse_error(
                None,
                "the configuration is one JSON object: it starts with `{`".into(),
            ));
        }
        let deserializer = &mut serde_json::Deserializer::from_str(text);
        let config: Self = serde_path_to_error::deserialize(&mut *deserializer).map_err(|err| {
            let field = err.path().to_string();
            let message = plain_words(&err.into_inner().to_string());
            // serde_path_to_error writes `?` where it has no field (a
            // syntax error) and `.` for the whole object.
            let field = (field != "." && field != "?").then_some(field);
            parse_error(field, message)
        })?;
        deserializer.end().map_err(|err| {
            parse_error(None, format!("text after the configuration object: {err}"))
        })?;
        // serde takes a struct from an array of its fields in order; a
        // configuration names them.
        if let Ok(serde_json::Value::Object(fields)) = serde_json::from_str(text) {
            for section in ["memory", "mmu", "tdx", "workload"] {
                if fields.get(section).is_some_and(|v| !v.is_object()) {
                    return Err(parse_error(
                        Some(section.into()),
                        "must be a JSON object".into(),
                    ));
                }
            }
        }
        Ok(config)
    }

    /// Memory size in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.memory.size_mib << 20
    }

    /// Checks ranges and combinations, naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=64).contains(&self.vcpus) {
            return Err(invalid("vcpus", "must be between 1 and 64"));
        }
        if self.memory.size_mib == 0 {
            return Err(invalid("memory.size_mib", "must be at least 1"));
        }
        if self.memory.size_mib > 1 << 20 {
            return Err(invalid(
                "memory.size_mib",
                "must be at most 1 TiB (1048576)",
            ));
        }
        if self.memory.backend == BackendName::Hugetlb {
            let huge_mib = (1u64 << self.memory.huge_page_size.log2()) >> 20;
            if !self.memory.size_mib.is_multiple_of(huge_mib) {
                return Err(invalid(
                    "memory.size_mib",
                    format!(
                        "{} MiB is not a multiple of the {} MiB huge page size",
                        self.memory.size_mib, huge_mib
                    ),
                ));
            }
        }
        if self.memory.prefault_threads == 0 || self.memory.prefault_threads > 256 {
            return Err(invalid(
                "memory.prefault_threads",
                "must be between 1 and 256",
            ));
        }
        if self.mmu.cache_capacity < 5 || self.mmu.cache_capacity > 4096 {
            return Err(invalid(
                "mmu.cache_capacity",
                "must be between 5 (one 5-level walk) and 4096",
            ));
        }
        if self.tdx.enabled && self.accel == Accel::Kvm {
            return Err(invalid(
                "tdx.enabled",
                "TDX needs TDX hardware, which this host does not have; use \"accel\": \"soft\" \
                 to run the TD over the software TDX module",
            ));
        }
        if self.accel == Accel::Kvm && self.memory.backend == BackendName::Secret {
            return Err(invalid(
                "memory.backend",
                "memfd_secret memory has no kernel direct map, and KVM can only map guest memory \
                 it reaches through the direct map; use another backend",
            ));
        }
        match &self.workload.kind {
            Workload::DirtyLog {
                iterations,
                bytes_per_vcpu_mib,
                write_percent,
            } => {
                if *iterations == 0 || *iterations > 1000 {
                    return Err(invalid("workload.iterations", "must be between 1 and 1000"));
                }
                if *bytes_per_vcpu_mib == 0 {
                    return Err(invalid("workload.bytes_per_vcpu_mib", "must be at least 1"));
                }
                if *write_percent > 100 {
                    return Err(invalid("workload.write_percent", "must be at most 100"));
                }
                let needed = (layout::SHARES >> 20) + u64::from(self.vcpus) * bytes_per_vcpu_mib;
                if needed > self.memory.size_mib {
                    return Err(invalid(
                        "memory.size_mib",
                        format!(
                            "{} MiB is too small: the dirty_log shares start at 1 MiB and need \
                             {} vCPUs x {} MiB, so at least {needed} MiB",
                            self.memory.size_mib, self.vcpus, bytes_per_vcpu_mib
                        ),
                    ));
                }
                if self.accel == Accel::Kvm && self.memory.size_mib > layout::MAX_MAPPED_GIB << 10 {
                    return Err(invalid(
                        "memory.size_mib",
                        format!(
                            "the KVM dirty_log guest maps at most {} GiB with its page tables",
                            layout::MAX_MAPPED_GIB
                        ),
                    ));
                }
                if self.accel == Accel::Kvm && self.memory.backend == BackendName::GuestMemfd {
                    return Err(invalid(
                        "memory.backend",
                        "KVM does not log dirty pages of guest_memfd slots; use anonymous, memfd \
                         or hugetlb memory for dirty_log",
                    ));
                }
            }
            Workload::Binary {
                path,
                load_gpa,
                entry_gpa,
                ..
            } => {
                if !path.is_file() {
                    return Err(invalid(
                        "workload.path",
                        format!("{} is not a readable file", path.display()),
                    ));
                }
                let length = std::fs::metadata(path).map_or(0, |m| m.len());
                if length == 0 {
                    return Err(invalid(
                        "workload.path",
                        format!("{} is empty: there is nothing to run", path.display()),
                    ));
                }
                if self.vcpus > 1 && (*load_gpa..load_gpa + length).contains(&layout::PARK) {
                    return Err(invalid(
                        "workload.load_gpa",
                        format!(
                            "with {} vCPUs the others park on a `hlt` at {:#x}, which the \
                             binary ({length} bytes at {load_gpa:#x}) would cover: load it \
                             elsewhere, or run one vCPU",
                            self.vcpus,
                            layout::PARK
                        ),
                    ));
                }
                let outside_memory = |field, gpa: u64| {
                    (gpa >= self.memory_bytes()).then(|| {
                        invalid(
                            field,
                            format!(
                                "{gpa:#x} is outside the {} MiB of guest memory",
                                self.memory.size_mib
                            ),
                        )
                    })
                };
                if let Some(err) = outside_memory("workload.load_gpa", *load_gpa) {
                    return Err(err);
                }
                if self.accel == Accel::Kvm && *load_gpa >= layout::MMIO_HOLE_START {
                    return Err(invalid(
                        "workload.load_gpa",
                        "binaries load into the memory below the 3 GiB MMIO hole",
                    ));
                }
                if let Some(err) = outside_memory("workload.entry_gpa", *entry_gpa) {
                    return Err(err);
                }
            }
            Workload::Convert {
                rounds,
                huge_pages_per_vcpu,
            } => {
                if *rounds == 0 || *rounds > 10_000 {
                    return Err(invalid("workload.rounds", "must be between 1 and 10000"));
                }
                if *huge_pages_per_vcpu < 2 {
                    return Err(invalid(
                        "workload.huge_pages_per_vcpu",
                        "must be at least 2 (one for 4 KiB conversions, one converted whole)",
                    ));
                }
                let needed = 2 * u64::from(self.vcpus) * huge_pages_per_vcpu;
                if needed > self.memory.size_mib {
                    return Err(invalid(
                        "memory.size_mib",
                        format!(
                            "{} MiB is too small: convert gives each of {} vCPUs {} pages of \
                             2 MiB, so at least {needed} MiB",
                            self.memory.size_mib, self.vcpus, huge_pages_per_vcpu
                        ),
                    ));
                }
                if self.memory.private_backend.is_none() {
                    return Err(invalid(
                        "memory.private_backend",
                        "convert needs private memory: name its backend (memfd, hugetlb, secret \
                         or anonymous)",
                    ));
                }
            }
            Workload::Hello | Workload::Counter => {}
        }
        if let Some(private) = self.memory.private_backend {
            if self.accel != Accel::Soft {
                return Err(invalid(
                    "memory.private_backend",
                    "private memory runs on the soft accelerator (this host's KVM has no \
                     SW-protected VMs or TDX); use \"accel\": \"soft\"",
                ));
            }
            if private == BackendName::GuestMemfd {
                return Err(invalid(
                    "memory.private_backend",
                    "the soft accelerator has no KVM VM to make a guest_memfd on; use memfd, \
                     hugetlb, secret or anonymous",
                ));
            }
            if private == BackendName::Hugetlb {
                let huge_mib = (1u64 << self.memory.huge_page_size.log2()) >> 20;
                if !self.memory.size_mib.is_multiple_of(huge_mib) {
                    return Err(invalid(
                        "memory.size_mib",
                        format!(
                            "{} MiB is not a multiple of the {} MiB huge page size of the \
                             private memory",
                            self.memory.size_mib, huge_mib
                        ),
                    ));
                }
            }
            if matches!(self.workload.kind, Workload::DirtyLog { .. }) {
                return Err(invalid(
                    "memory.private_backend",
                    "dirty logging covers shared memory only; run dirty_log without \
                     private_backend, or the convert workload",
                ));
            }
        }
        if self.accel == Accel::Soft
            && !matches!(
                self.workload.kind,
                Workload::DirtyLog { .. } | Workload::Convert { .. }
            )
        {
            return Err(invalid(
                "workload.kind",
                "the soft accelerator runs no guest code: only \"dirty_log\" and \"convert\" \
                 run on it",
            ));
        }
        if self.accel == Accel::Kvm && matches!(self.workload.kind, Workload::Convert { .. }) {
            return Err(invalid(
                "workload.kind",
                "convert runs on the soft accelerator; use \"accel\": \"soft\"",
            ));
        }
        if self.accel == Accel::Kvm && self.memory.size_mib < 2 {
            return Err(invalid("memory.size_mib", "guests need at least 2 MiB"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_object_is_the_default_config() {
        assert_eq!(Config::parse("{}").unwrap(), Config::default());
    }

    #[test]
    fn unknown_fields_and_bad_values_name_the_field() {
        let cases = [
            (r#"{"vcpu": 2}"#, "vcpu"),
            (r#"{"memory": {"size": 4}}"#, "size"),
            (r#"{"memory": {"size_mib": 0}}"#, "memory.size_mib"),
            (r#"{"vcpus": "two"}"#, "vcpus"),
            (
                r#"{"memory": {"backend": "hugetlb", "size_mib": 3}}"#,
                "memory.size_mib",
            ),
            (r#"{"tdx": {"enabled": true}}"#, "tdx.enabled"),
            (r#"{"memory": {"backend": "secret"}}"#, "memory.backend"),
            (r#"{"accel": "soft"}"#, "workload.kind"),
            (
                r#"{"workload": {"kind": "dirty_log", "write_percent": 101}}"#,
                "workload.write_percent",
            ),
            (
                r#"{"workload": {"kind": "binary", "path": "/nonexistent", "load_gpa": 0, "entry_gpa": 0}}"#,
                "workload.path",
            ),
        ];
        for (text, field) in cases {
            let err = Config::parse(text).unwrap_err().to_string();
            assert!(err.contains(field), "{text}: {err}");
        }
    }
}

#[cfg(test)]
mod bad_input {
    use super::*;

    /// Sets `path` (dotted) to `value` in a valid dirty_log config.
    fn with(path: &str, value: serde_json::Value) -> String {
        let mut config = serde_json::json!({
            "vcpus": 1,
            "accel": "kvm",
            "memory": {"size_mib": 64, "backend": "anonymous", "huge_page_size": "2M",
                       "prefault": false, "prefault_threads": 2},
            "mmu": {"eager_split": true, "manual_protect": false, "cache_capacity": 40},
            "tdx": {"enabled": false, "pamt_policy": "on_install"},
            "workload": {"kind": "dirty_log", "iterations": 1, "bytes_per_vcpu_mib": 1,
                         "write_percent": 100}
        });
        let mut at = &mut config;
        let parts: Vec<&str> = path.split('.').collect();
        for part in &parts[..parts.len() - 1] {
            at = &mut at[*part];
        }
        at[parts[parts.len() - 1]] = value;
        config.to_string()
    }

    #[test]
    fn every_field_with_a_wrong_type_is_named() {
        let fields = [
            "vcpus",
            "accel",
            "memory.size_mib",
            "memory.backend",
            "memory.huge_page_size",
            "memory.prefault",
            "memory.prefault_threads",
            "mmu.eager_split",
            "mmu.manual_protect",
            "mmu.cache_capacity",
            "tdx.enabled",
            "tdx.pamt_policy",
            "workload.iterations",
            "workload.bytes_per_vcpu_mib",
            "workload.write_percent",
        ];
        for field in fields {
            for wrong in [serde_json::json!([1]), serde_json::json!({"x": 1})] {
                let err = Config::parse(&with(field, wrong.clone()))
                    .unwrap_err()
                    .to_string();
                let leaf = field.rsplit('.').next().unwrap();
                assert!(err.contains(leaf), "{field} = {wrong}: {err}");
            }
        }
        for (text, named) in [
            (
                r#"{"workload": {"kind": "hello", "iterations": 3}}"#,
                "iterations",
            ),
            (
                r#"{"workload": {"kind": "binary", "path": "/bin/true"}}"#,
                "load_gpa",
            ),
            (
                r#"{"workload": {"kind": "dirty_log", "mode": "long"}}"#,
                "mode",
            ),
            (
                r#"{"workload": {"kind": "counter", "colour": 1}}"#,
                "colour",
            ),
        ] {
            let err = Config::parse(text).unwrap_err().to_string();
            assert!(err.contains(named), "{text}: {err}");
        }
        let err = Config::parse(&with("workload.kind", serde_json::json!("dance")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("workload") && err.contains("dance"), "{err}");
    }

    #[test]
    fn out_of_range_values_are_named() {
        let cases = [
            ("vcpus", serde_json::json!(0), "vcpus"),
            ("vcpus", serde_json::json!(65), "vcpus"),
            ("vcpus", serde_json::json!(-1), "vcpus"),
            ("memory.size_mib", serde_json::json!(0), "memory.size_mib"),
            (
                "memory.size_mib",
                serde_json::json!(u64::MAX),
                "memory.size_mib",
            ),
            (
                "memory.prefault_threads",
                serde_json::json!(0),
                "memory.prefault_threads",
            ),
            (
                "mmu.cache_capacity",
                serde_json::json!(4),
                "mmu.cache_capacity",
            ),
            (
                "workload.iterations",
                serde_json::json!(0),
                "workload.iterations",
            ),
            (
                "workload.bytes_per_vcpu_mib",
                serde_json::json!(0),
                "workload.bytes_per_vcpu_mib",
            ),
            (
                "workload.bytes_per_vcpu_mib",
                serde_json::json!(1u64 << 40),
                "memory.size_mib",
            ),
            (
                "workload.write_percent",
                serde_json::json!(101),
                "workload.write_percent",
            ),
        ];
        for (field, value, named) in cases {
            let err = Config::parse(&with(field, value.clone()))
                .unwrap_err()
                .to_string();
            assert!(err.contains(named), "{field} = {value}: {err}");
        }
    }
}
