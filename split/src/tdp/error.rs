//! Errors of the TDP MMU.

use mmu_cache::{CacheError, SlabError};

use crate::addr::{Gfn, Gpa};
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
    /// The paging depth is not 4 or 5.
    #[error("levels {levels}: the paging depth must be 4 or 5")]
    Levels {
        /// The depth asked for.
        levels: u8,
    },
    /// A cache capacity is below what one operation needs.
    #[error("{cache} {capacity}: must be at least {min}")]
    CacheCapacity {
        /// The configuration field.
        cache: &'static str,
        /// The capacity asked for.
        capacity: usize,
        /// The least that works.
        min: usize,
    },
    /// A TD's shared bit is not the top bit of its GPA width.
    #[error(
        "shared bit {shared_bit}: a TD's shared bit is the top GPA bit, {expected} with {levels}-level paging"
    )]
    SharedBit {
        /// The bit asked for.
        shared_bit: u8,
        /// The bit the paging depth gives.
        expected: u8,
        /// The paging depth.
        levels: u8,
    },
    /// A default VM (`KVM_X86_DEFAULT_VM`) has neither memory attributes
    /// nor private memory.
    #[error(
        "{what}: a default VM has no private memory (memory attributes need a software-protected VM or a TD)"
    )]
    NoPrivateMemory {
        /// What was asked.
        what: &'static str,
    },
    /// A private fault at a TD address with the shared bit set: such an
    /// access is shared by definition.
    #[error(
        "a private fault at {gpa}, whose shared bit is set: a TD's shared access is never private"
    )]
    PrivateWithSharedBit {
        /// The address as the guest used it.
        gpa: Gpa,
    },
    /// A memory attribute range that is empty or passes the address space.
    #[error(
        "memory attribute range {start}..{end} is empty or passes the {width}-bit address space"
    )]
    AttributeRange {
        /// The first frame.
        start: Gfn,
        /// The frame after the last.
        end: Gfn,
        /// The guest physical address width.
        width: u32,
    },
    /// The access's kind (private or shared) differs from the frame's
    /// memory attribute, a private access found no private memory, or a
    /// private access found no memslot: the vCPU exits to the VMM
    /// (`KVM_EXIT_MEMORY_FAULT`, with `KVM_MEMORY_EXIT_FLAG_PRIVATE` when
    /// `private`), which converts the range (or restores the slot) and runs
    /// the vCPU again.
    #[error("memory fault at {gpa}: a {} access to {} memory", if *.private { "private" } else { "shared" }, if *.private { "shared (or no private)" } else { "private" })]
    MemoryFault {
        /// The faulting page: `gfn_to_gpa(fault->gfn)`, page-aligned and,
        /// on a TD, without the shared bit (the fault's gfn has it
        /// stripped), as `kvm_mmu_prepare_memory_fault_exit()` reports it.
        gpa: Gpa,
        /// The size of the range to convert: one page (`PAGE_SIZE`).
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
