//! What a guest or its workload did wrong, seen from the host: the checks
//! the workloads make, and the ways a run stops before its end. Each is
//! exit 1 (see [`RunError::exit_code`](crate::engine::RunError::exit_code)).

use split::{MemoryAttribute, MmuError};

/// The guest or its workload failed.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// A page a vCPU wrote is missing from the dirty log.
    #[error("iteration {iteration}: vCPU {vcpu} wrote gpa {gpa:#x}, which is not in the dirty log")]
    NotInDirtyLog {
        /// The pass.
        iteration: u32,
        /// The vCPU that wrote it.
        vcpu: u64,
        /// The page's guest address.
        gpa: u64,
    },
    /// A software vCPU's access failed.
    #[error("vCPU {vcpu} at gpa {gpa:#x}: {source}")]
    Access {
        /// The vCPU.
        vcpu: u64,
        /// The address it accessed.
        gpa: u64,
        /// The MMU's error.
        source: MmuError,
    },
    /// The program could not be written into guest memory.
    #[error("loading the program at {gpa:#x}: {source}")]
    Load {
        /// Where the program goes.
        gpa: u64,
        /// The guest memory file's error.
        source: gmem::GmemError,
    },
    /// The guest's serial output could not be written.
    #[error("serial output: {0}")]
    Serial(#[source] std::io::Error),
    /// `KVM_RUN` failed (other than by a signal).
    #[error("KVM_RUN on vCPU {vcpu}: {source}")]
    KvmRun {
        /// The vCPU.
        vcpu: u64,
        /// The kernel's error.
        source: kvm_ioctls::Error,
    },
    /// A secondary vCPU ended somewhere other than its parking `hlt`.
    #[error("vCPU {vcpu} did not park on its hlt: {exit}")]
    NotParked {
        /// The vCPU.
        vcpu: u64,
        /// How it ended, in words.
        exit: String,
    },
    /// A failure of one vCPU's part of the workload.
    #[error("vCPU {vcpu}: {source}")]
    OnVcpu {
        /// The vCPU.
        vcpu: u64,
        /// What failed.
        source: Box<GuestError>,
    },
    /// Guest memory does not hold what the guest wrote last (checked at
    /// the end of a run, on a migration's destination above all).
    #[error(
        "vCPU {vcpu}'s memory at gpa {gpa:#x} holds {found:#x}, not {expected:#x}, what it wrote last"
    )]
    StaleMemory {
        /// The vCPU whose memory it is.
        vcpu: u64,
        /// Where.
        gpa: u64,
        /// What it holds.
        found: u64,
        /// What it should hold.
        expected: u64,
    },
    /// A signal stopped the run.
    #[error("stopped by a signal")]
    Stopped,
    /// `workload.timeout_ms` passed between two dirty-log passes.
    #[error("workload.timeout_ms passed after {done} of {passes} passes")]
    TimedOut {
        /// Passes finished.
        done: u32,
        /// Passes asked for.
        passes: u32,
    },
    /// `workload.timeout_ms` passed during a conversion round.
    #[error("workload.timeout_ms passed with vCPU {vcpu} at round {round} of {rounds}")]
    TimedOutInRound {
        /// The vCPU.
        vcpu: u64,
        /// Its round.
        round: u64,
        /// Rounds asked for.
        rounds: u32,
    },
    /// A conversion the workload asked for failed.
    #[error("converting gfn {start:#x}..{end:#x} to {to}: {source}")]
    Convert {
        /// The first frame.
        start: u64,
        /// The frame after the last.
        end: u64,
        /// The attribute asked for.
        to: MemoryAttribute,
        /// The private-memory VM's error.
        source: mmukit_private::PrivateError,
    },
    /// A guest access of the conversion workload failed.
    #[error("{attribute} {op} of gfn {gfn:#x}: {source}")]
    ConvertAccess {
        /// "read", "write", or "write after converting".
        op: &'static str,
        /// The kind of access.
        attribute: MemoryAttribute,
        /// The frame.
        gfn: u64,
        /// The MMU's error.
        source: MmuError,
    },
    /// Private memory read back something other than what was written.
    #[error("gfn {gfn:#x} reads {read:#x} as private memory, not {expected:#x}")]
    PrivateValue {
        /// The frame.
        gfn: u64,
        /// What it read.
        read: u64,
        /// What was written.
        expected: u64,
    },
    /// The host could not read a shared page.
    #[error("the host reading shared gfn {gfn:#x}: {source}")]
    HostRead {
        /// The frame.
        gfn: u64,
        /// The guest memory file's error.
        source: gmem::GmemError,
    },
    /// The host sees something other than what the guest wrote to shared
    /// memory.
    #[error("the host sees {seen:#x} at shared gfn {gfn:#x}, the guest wrote {wrote:#x}")]
    SharedValue {
        /// The frame.
        gfn: u64,
        /// What the host read.
        seen: u64,
        /// What the guest wrote.
        wrote: u64,
    },
}
