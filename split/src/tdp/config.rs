//! What an MMU is built with: its configuration and the kind of VM it
//! serves.

use crate::ept::MemType;

/// What kind of VM the MMU serves (KVM's `vm_type`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum VmType {
    /// Every frame shared (`KVM_X86_DEFAULT_VM`): no memory attributes;
    /// every fault maps the memslot's host frames in the one tree.
    #[default]
    Default,
    /// `KVM_X86_SW_PROTECTED_VM`: per-frame memory attributes; a fault is
    /// private when its frame is (the attributes are the source of truth,
    /// as the kernel sets `PFERR_PRIVATE_ACCESS` from them), and private
    /// faults take their frames from the slot's private memory. One tree.
    SoftwareProtected,
    /// A TD: an access is shared when the GPA has bit `shared_bit` set
    /// (47 with 4-level paging, 51 with 5). Private frames are mapped in the
    /// main tree, which the hooks mirror (the S-EPT), shared ones in a
    /// second, direct tree the hooks never see. The frame number is the GPA
    /// without the shared bit.
    Td {
        /// The GPA bit that marks a shared access.
        shared_bit: u8,
    },
}

impl VmType {
    /// A TD with the shared bit of `levels`-level paging: the top bit of
    /// its GPA width (GPAW 48 or 52).
    pub fn td(levels: u8) -> Self {
        Self::Td {
            shared_bit: Self::td_shared_bit(levels),
        }
    }

    pub(super) fn td_shared_bit(levels: u8) -> u8 {
        if levels >= 5 { 51 } else { 47 }
    }

    /// Whether the VM has memory attributes and private memory.
    pub fn has_private_memory(self) -> bool {
        self != Self::Default
    }
}

/// Configuration of a [`TdpMmu`](super::TdpMmu).
#[derive(Clone, Copy, Debug)]
pub struct MmuConfig {
    /// Paging depth: 4 or 5.
    pub levels: u8,
    /// Split huge pages when dirty logging starts (or at the first clear in
    /// manual mode). Off: writes split lazily, one fault at a time.
    pub eager_split: bool,
    /// Capacity of the split caches (tables topped up per lock hold while
    /// splitting).
    pub split_cache_capacity: usize,
    /// Memory type of leaves.
    pub memtype: MemType,
    /// Capacity of each vCPU cache (objects per topup, at least 5).
    pub vcpu_cache_capacity: usize,
    /// The kind of VM: whether it has private memory, and how a fault
    /// says it is private.
    pub vm_type: VmType,
}

impl Default for MmuConfig {
    fn default() -> Self {
        Self {
            levels: 4,
            eager_split: true,
            split_cache_capacity: 256,
            memtype: MemType::Wb,
            vcpu_cache_capacity: mmu_cache::DEFAULT_CAPACITY,
            vm_type: VmType::Default,
        }
    }
}
