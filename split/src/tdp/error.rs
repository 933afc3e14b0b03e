//! Errors of the TDP MMU.

use mmu_cache::{CacheError, SlabError};

use crate::addr::Gpa;
use crate::ept;
use crate::hooks::HookError;
use crate::memslot::MemslotError;

/// Errors of the TDP MMU.
#[derive(Debug, thiserror::Error)]
pub enum MmuError {
    /// No memslot holds the guest frame (an MMIO access in KVM terms).
    #[error("no memslot holds gpa {gpa:#x}")]
    NoSlot {
        /// The guest physical address.
        gpa: Gpa,
    },
    /// The address is beyond what the paging depth translates.
    #[error("gpa {gpa:#x} is beyond the {levels}-level address space")]
    AddressTooWide {
        /// The guest physical address.
        gpa: Gpa,
        /// The paging depth.
        levels: u8,
    },
    /// A topup of the MMU's caches failed.
    #[error("topping up the MMU caches: {0}")]
    Cache(#[from] CacheError),
    /// A memslot operation failed.
    #[error(transparent)]
    Memslot(#[from] MemslotError),
    /// An external page-table hook failed; the tree is unchanged there.
    #[error(transparent)]
    Hook(#[from] HookError),
    /// A leaf could not be encoded (a frame not aligned to its level).
    #[error("building a leaf: {0}")]
    Entry(#[from] ept::EptError),
    /// The header slab could not be created.
    #[error(transparent)]
    Slab(#[from] SlabError),
    /// The configuration is invalid, or the VM's type does not allow the
    /// operation.
    #[error("invalid MMU configuration: {0}")]
    Config(&'static str),
    /// The access's kind (private or shared) differs from the frame's
    /// memory attribute, or a private access found no private memory: the
    /// vCPU exits to the VMM (`KVM_EXIT_MEMORY_FAULT`, with
    /// `KVM_MEMORY_EXIT_FLAG_PRIVATE` when `private`), which converts the
    /// range and runs the vCPU again.
    #[error("memory fault at {gpa}: a {} access to {} memory", if *.private { "private" } else { "shared" }, if *.private { "shared (or no private)" } else { "private" })]
    MemoryFault {
        /// The faulting address (with a TD's shared bit, as the guest used it).
        gpa: Gpa,
        /// The size of the range to convert.
        size: u64,
        /// Whether the access was private.
        private: bool,
    },
    /// The slot's private memory could not give a frame.
    #[error("private memory of {gpa}: {source}")]
    PrivateMemory {
        /// The faulting address.
        gpa: Gpa,
        /// The provider's error.
        source: crate::memslot::PrivateMemoryError,
    },
}
