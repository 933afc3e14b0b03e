//! Snapshot and restore of a one-vCPU KVM guest: vCPU registers, the
//! configuration (memory layout), guest memory and its attributes, with an
//! explicit format version and CRC-64 checksums.

use std::path::{Path, PathBuf};

use gmem::{Attribute, GuestRegion};
use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use crate::config::Config;

/// The format this refvmm writes and reads.
pub const FORMAT_VERSION: u32 = 1;
const STATE_FILE: &str = "snapshot.json";
const MEMORY_FILE: &str = "memory.bin";

/// The checksum of snapshots: CRC-64/XZ (ECMA-182 polynomial, reflected).
const CRC64: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_XZ);

/// CRC-64/XZ of `bytes`.
pub fn crc64(bytes: &[u8]) -> u64 {
    CRC64.checksum(bytes)
}

/// Guest memory moves between the guest and the memory file this much at a
/// time: no copy of all of it is ever held.
const CHUNK: u64 = 1 << 20;

/// Whether `dir` holds a snapshot already (one that a save would replace).
pub fn exists(dir: &Path) -> bool {
    dir.join(STATE_FILE).exists()
}

/// What a snapshot holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Snapshot {
    /// The format version.
    pub format_version: u32,
    /// The configuration the guest ran with (its memory layout).
    pub config: Config,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// Guest memory size.
    pub memory_bytes: u64,
    /// CRC-64 of the memory file.
    pub memory_crc64: u64,
    /// Private ranges of guest memory, `[start, end)` in bytes.
    pub private_ranges: Vec<(u64, u64)>,
    /// Where the snapshot was read from.
    #[serde(skip)]
    pub dir: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    format_version: u32,
    checksum: u64,
    body: String,
}

/// Why a snapshot could not be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A snapshot is in the directory already.
    #[error("{} holds a snapshot already (give --overwrite to replace it)", dir.display())]
    Exists {
        /// The directory.
        dir: PathBuf,
    },
    /// A file of the snapshot could not be read or written.
    #[error("{}: {source}", path.display())]
    File {
        /// The file (or directory).
        path: PathBuf,
        /// The system's error.
        source: std::io::Error,
    },
    /// Guest memory could not be read (save) or written (restore).
    #[error("{op} guest memory at {offset:#x}: {source}")]
    Memory {
        /// "reading" or "writing".
        op: &'static str,
        /// The offset in guest memory.
        offset: u64,
        /// The guest memory file's error.
        source: gmem::GmemError,
    },
    /// The state could not be encoded.
    #[error("encoding the state: {0}")]
    Encode(#[source] serde_json::Error),
    /// The state file is not a refvmm snapshot.
    #[error("not a refvmm snapshot: {0}")]
    NotASnapshot(#[source] serde_json::Error),
    /// The state inside the envelope does not parse.
    #[error("state: {0}")]
    State(#[source] serde_json::Error),
    /// A format version this refvmm does not read.
    #[error("format version {found} is unknown (this refvmm reads version {FORMAT_VERSION})")]
    Version {
        /// The version found.
        found: u32,
    },
    /// The state's version disagrees with its envelope's.
    #[error("the state's format version disagrees with its envelope")]
    VersionMismatch,
    /// A checksum that does not match: the snapshot is damaged.
    #[error("the {part} checksum does not match: the snapshot is damaged")]
    Checksum {
        /// "state" or "memory".
        part: &'static str,
    },
    /// The memory file's length disagrees with the state or the guest.
    #[error(
        "{}: {length} bytes, the snapshot says {recorded} and the guest has {guest}",
        path.display()
    )]
    MemoryLength {
        /// The memory file.
        path: PathBuf,
        /// Its length.
        length: u64,
        /// The length the state records.
        recorded: u64,
        /// The guest's memory size.
        guest: u64,
    },
    /// The vCPU's registers could not be read (save) or set (restore).
    #[error("{op}: {source}")]
    Registers {
        /// The ioctl.
        op: &'static str,
        /// The kernel's error.
        source: kvm_ioctls::Error,
    },
    /// The private ranges could not be made private again.
    #[error("restoring attributes: {0}")]
    Attributes(#[source] gmem::GmemError),
}

/// A register ioctl's error.
fn registers(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> SnapshotError {
    move |source| SnapshotError::Registers { op, source }
}

/// A file error of `path`.
fn file_error(path: &Path) -> impl Fn(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::File {
        path: path.to_owned(),
        source,
    }
}

/// Saves the vCPU, the configuration and guest memory to `dir`. A snapshot
/// already there is refused unless `overwrite`. Memory is streamed to the
/// file a chunk at a time, the checksum computed on the way.
pub fn save(
    dir: &Path,
    config: &Config,
    vcpu: &VcpuFd,
    region: &GuestRegion,
    overwrite: bool,
) -> Result<(), SnapshotError> {
    use std::io::Write;
    if exists(dir) && !overwrite {
        return Err(SnapshotError::Exists {
            dir: dir.to_owned(),
        });
    }
    std::fs::create_dir_all(dir).map_err(file_error(dir))?;
    let size = region.size();
    let memory_path = dir.join(MEMORY_FILE);
    let memory_error = file_error(&memory_path);
    let mut out =
        std::io::BufWriter::new(std::fs::File::create(&memory_path).map_err(&memory_error)?);
    let mut digest = CRC64.digest();
    let mut chunk = vec![0u8; CHUNK.min(size) as usize];
    let view = region.view();
    for offset in (0..size).step_by(CHUNK as usize) {
        let bytes = &mut chunk[..(size - offset).min(CHUNK) as usize];
        view.read_at(offset, bytes)
            .map_err(|source| SnapshotError::Memory {
                op: "reading",
                offset,
                source,
            })?;
        digest.update(bytes);
        out.write_all(bytes).map_err(&memory_error)?;
    }
    out.flush().map_err(&memory_error)?;
    let private_ranges = region
        .file()
        .attribute_runs(0, size)
        .into_iter()
        .filter(|run| run.2 == Attribute::Private)
        .map(|(start, end, _)| (start, end))
        .collect();
    let snapshot = Snapshot {
        format_version: FORMAT_VERSION,
        config: config.clone(),
        regs: vcpu.get_regs().map_err(registers("KVM_GET_REGS"))?,
        sregs: vcpu.get_sregs().map_err(registers("KVM_GET_SREGS"))?,
        memory_bytes: size,
        memory_crc64: digest.finalize(),
        private_ranges,
        dir: dir.to_owned(),
    };
    let body = serde_json::to_string(&snapshot).map_err(SnapshotError::Encode)?;
    let envelope = Envelope {
        format_version: FORMAT_VERSION,
        checksum: crc64(body.as_bytes()),
        body,
    };
    let text = serde_json::to_string_pretty(&envelope).map_err(SnapshotError::Encode)?;
    let state_path = dir.join(STATE_FILE);
    std::fs::write(&state_path, text).map_err(file_error(&state_path))?;
    Ok(())
}

/// Reads a snapshot, refusing unknown versions and bad checksums.
pub fn load(dir: &Path) -> Result<Snapshot, SnapshotError> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(file_error(&path))?;
    decode(&text, dir)
}

/// Decodes the state file's text (`dir` locates the memory file).
pub fn decode(text: &str, dir: &Path) -> Result<Snapshot, SnapshotError> {
    let envelope: Envelope = serde_json::from_str(text).map_err(SnapshotError::NotASnapshot)?;
    if envelope.format_version != FORMAT_VERSION {
        return Err(SnapshotError::Version {
            found: envelope.format_version,
        });
    }
    if crc64(envelope.body.as_bytes()) != envelope.checksum {
        return Err(SnapshotError::Checksum { part: "state" });
    }
    let mut snapshot: Snapshot =
        serde_json::from_str(&envelope.body).map_err(SnapshotError::State)?;
    if snapshot.format_version != FORMAT_VERSION {
        return Err(SnapshotError::VersionMismatch);
    }
    snapshot.dir = dir.to_owned();
    Ok(snapshot)
}

/// Loads the snapshot's memory and registers into a fresh vCPU and region.
pub fn restore_into(
    snapshot: &Snapshot,
    vcpu: &VcpuFd,
    region: &GuestRegion,
) -> Result<(), SnapshotError> {
    use std::io::Read;
    let path = snapshot.dir.join(MEMORY_FILE);
    let memory_error = file_error(&path);
    let mut file = std::fs::File::open(&path).map_err(&memory_error)?;
    let length = file.metadata().map_err(&memory_error)?.len();
    if length != snapshot.memory_bytes || length != region.size() {
        return Err(SnapshotError::MemoryLength {
            path: path.clone(),
            length,
            recorded: snapshot.memory_bytes,
            guest: region.size(),
        });
    }
    // Streamed into guest memory a chunk at a time; the guest runs only
    // once the whole file has matched its checksum.
    let mut digest = CRC64.digest();
    let mut chunk = vec![0u8; CHUNK.min(length) as usize];
    let view = region.view();
    for offset in (0..length).step_by(CHUNK as usize) {
        let bytes = &mut chunk[..(length - offset).min(CHUNK) as usize];
        file.read_exact(bytes).map_err(&memory_error)?;
        digest.update(bytes);
        view.write_at(offset, bytes)
            .map_err(|source| SnapshotError::Memory {
                op: "writing",
                offset,
                source,
            })?;
    }
    if digest.finalize() != snapshot.memory_crc64 {
        return Err(SnapshotError::Checksum { part: "memory" });
    }
    for &(start, end) in &snapshot.private_ranges {
        region
            .file()
            .convert(start, end - start, Attribute::Private)
            .map_err(SnapshotError::Attributes)?;
    }
    vcpu.set_sregs(&snapshot.sregs)
        .map_err(registers("KVM_SET_SREGS"))?;
    vcpu.set_regs(&snapshot.regs)
        .map_err(registers("KVM_SET_REGS"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc64_matches_the_xz_check_value() {
        assert_eq!(crc64(b"123456789"), 0x995D_C9BB_DF19_39FA);
    }

    #[test]
    fn damaged_or_foreign_snapshots_are_refused() {
        let dir = Path::new("/nonexistent");
        assert!(
            decode("not json", dir)
                .unwrap_err()
                .to_string()
                .contains("not a refvmm")
        );
        let wrong_version = r#"{"format_version": 9, "checksum": 0, "body": "{}"}"#;
        assert!(
            decode(wrong_version, dir)
                .unwrap_err()
                .to_string()
                .contains("version 9")
        );
        let bad_sum = r#"{"format_version": 1, "checksum": 1, "body": "{}"}"#;
        assert!(
            decode(bad_sum, dir)
                .unwrap_err()
                .to_string()
                .contains("checksum")
        );
    }
}
