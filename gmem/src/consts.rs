//! KVM constants in one place: those kvm-bindings 0.14 lacks, and the ones
//! it has that gmem uses, re-exported.

/// `KVM_CAP_GUEST_MEMFD_FLAGS`: the guest_memfd flags the VM accepts.
pub const KVM_CAP_GUEST_MEMFD_FLAGS: u32 = 244;
/// guest_memfd flag: the file can be mapped by the host.
pub const GUEST_MEMFD_FLAG_MMAP: u64 = 1 << 0;
/// guest_memfd flag: pages start shared (host-accessible) instead of private.
pub const GUEST_MEMFD_FLAG_INIT_SHARED: u64 = 1 << 1;
/// guest_memfd flag (proposed): pages are removed from the kernel direct map.
pub const GUEST_MEMFD_FLAG_NO_DIRECT_MAP: u64 = 1 << 2;

pub use kvm_bindings::{
    KVM_CAP_DIRTY_LOG_RING, KVM_CAP_GUEST_MEMFD, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_CAP_MEMORY_ATTRIBUTES, KVM_CAP_MULTI_ADDRESS_SPACE, KVM_CAP_NR_MEMSLOTS,
    KVM_CAP_READONLY_MEM, KVM_CAP_USER_MEMORY2, KVM_CAP_VM_TYPES, KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MEM_GUEST_MEMFD, KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY, KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_X86_SW_PROTECTED_VM, KVM_X86_TDX_VM,
};
