//! The configuration: one serde struct, the only source of defaults.
//! Unknown fields are errors, and every check names the field.

mod input;
pub mod layout;
mod schema;
#[cfg(test)]
mod tests;
mod validate;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use self::input::MAX_CONFIG_BYTES;
use self::input::read_config_text;
pub use self::schema::{
    Accel, BackendName, BinaryMode, Fill, HugePageSize, MemoryConfig, MigrationConfig, MmuConfig,
    PamtPolicyName, TdxConfig, Workload, WorkloadConfig,
};

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

pub(super) fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
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
    /// Live migration (with `--migrate-to`).
    pub migration: MigrationConfig,
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
            migration: MigrationConfig::default(),
        }
    }
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
            for section in ["memory", "mmu", "tdx", "workload", "migration"] {
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
}
