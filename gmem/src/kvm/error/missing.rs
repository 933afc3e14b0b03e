//! Capabilities a host's KVM may lack.

/// A capability the host's KVM lacks.
#[derive(Debug, thiserror::Error)]
pub enum MissingCapability {
    /// `GUEST_MEMFD_FLAG_NO_DIRECT_MAP`.
    #[error("GUEST_MEMFD_FLAG_NO_DIRECT_MAP (the kernel does not offer it)")]
    NoDirectMap,
    /// `KVM_SET_MEMORY_ATTRIBUTES` with the private bit.
    #[error("KVM_SET_MEMORY_ATTRIBUTES (KVM_CAP_MEMORY_ATTRIBUTES has no private bit)")]
    PrivateAttribute,
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` with these flags.
    #[error("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 with flags {flags:#x} (KVM offers {offered:#x})")]
    ManualDirtyLogProtect {
        /// The flags asked for.
        flags: u64,
        /// The flags KVM offers.
        offered: u64,
    },
    /// A stand-in that refuses (tests and other VMMs' fakes).
    #[error("{0}")]
    Other(&'static str),
}
