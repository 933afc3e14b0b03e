//! KVM binding: a VM, its guest_memfd files, and memslots registered with
//! `KVM_SET_USER_MEMORY_REGION2`.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_memory_attributes, kvm_userspace_memory_region2};
use kvm_ioctls::{Kvm, VmFd};

use crate::attrs::Attribute;
use crate::caps::KvmCaps;
use crate::consts::{
    GUEST_MEMFD_FLAG_NO_DIRECT_MAP, KVM_CAP_GUEST_MEMFD_FLAGS, KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_X86_TDX_VM,
};
use crate::file::{BackendKind, GuestMemFile, PAGE_SIZE, Protection};
use crate::region::GuestRegion;

/// Errors of the KVM binding. Each has the errno the kernel gives in the
/// same case ([`KvmError::errno`]).
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// `/dev/kvm` is missing or cannot be opened.
    #[error("KVM is not available: {0}")]
    NoKvm(String),
    /// An invalid slot (EINVAL).
    #[error("invalid memslot: {0}")]
    Invalid(String),
    /// The memory cannot back a KVM guest (EINVAL).
    #[error("{0}")]
    Refused(String),
    /// The host lacks a capability (EOPNOTSUPP).
    #[error("not supported by this host's KVM: {0}")]
    NotSupported(String),
    /// An ioctl failed.
    #[error("{op}: {source}")]
    Ioctl {
        /// The ioctl.
        op: &'static str,
        /// The kernel's error.
        source: std::io::Error,
    },
}

impl KvmError {
    /// The errno of this error.
    pub fn errno(&self) -> i32 {
        match self {
            Self::NoKvm(_) => libc::ENODEV,
            Self::Invalid(_) | Self::Refused(_) => libc::EINVAL,
            Self::NotSupported(_) => libc::EOPNOTSUPP,
            Self::Ioctl { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        }
    }

    fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Self {
        move |err| Self::Ioctl {
            op,
            source: std::io::Error::from_raw_os_error(err.errno()),
        }
    }
}

/// Checks that memory of `backend` with guest_memfd `flags` can back a VM
/// of `vm_type` on a KVM with `caps`:
/// - `secret` memory has no direct map, which KVM needs to map it into a
///   guest (unless the kernel offers NO_DIRECT_MAP guest_memfd, which is
///   then the way to ask for it);
/// - NO_DIRECT_MAP on a TDX VM is refused: TDX needs the direct map.
pub fn check_memory(
    backend: BackendKind,
    flags: u64,
    vm_type: u64,
    caps: &KvmCaps,
) -> Result<(), KvmError> {
    let no_direct_map = caps.guest_memfd_flags & GUEST_MEMFD_FLAG_NO_DIRECT_MAP != 0;
    if backend == BackendKind::Secret {
        return Err(KvmError::Refused(if no_direct_map {
            "memfd_secret memory cannot back a KVM memslot; this kernel offers \
             GUEST_MEMFD_FLAG_NO_DIRECT_MAP: use the guest_memfd backend with that flag"
                .into()
        } else {
            "memfd_secret memory has no kernel direct map, and KVM can only map guest \
             memory it can reach through the direct map; this kernel has no \
             GUEST_MEMFD_FLAG_NO_DIRECT_MAP, so use another backend"
                .into()
        }));
    }
    if flags & GUEST_MEMFD_FLAG_NO_DIRECT_MAP != 0 {
        if vm_type == KVM_X86_TDX_VM {
            return Err(KvmError::Refused(
                "GUEST_MEMFD_FLAG_NO_DIRECT_MAP with a TDX VM: TDX needs the direct map \
                 (the TDX module's page conversions and cache flushes go through it)"
                    .into(),
            ));
        }
        if !no_direct_map {
            return Err(KvmError::NotSupported(
                "GUEST_MEMFD_FLAG_NO_DIRECT_MAP (the kernel does not offer it)".into(),
            ));
        }
    }
    Ok(())
}

/// Picks what really backs guest memory of the `requested` kind on a KVM
/// VM: `secret` memory becomes guest_memfd with NO_DIRECT_MAP where the
/// kernel offers it (KVM cannot map memfd_secret memory), and is refused
/// with the reason otherwise. Returns the backend kind and the guest_memfd
/// flags to add.
pub fn choose_backend(
    requested: BackendKind,
    vm_type: u64,
    caps: &KvmCaps,
) -> Result<(BackendKind, u64), KvmError> {
    if requested == BackendKind::Secret
        && caps.guest_memfd_flags & GUEST_MEMFD_FLAG_NO_DIRECT_MAP != 0
    {
        check_memory(
            BackendKind::Kvm,
            GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
            vm_type,
            caps,
        )?;
        return Ok((BackendKind::Kvm, GUEST_MEMFD_FLAG_NO_DIRECT_MAP));
    }
    check_memory(requested, 0, vm_type, caps)?;
    Ok((requested, 0))
}

/// Where KVM learns which guest pages are private: `KVM_SET_MEMORY_ATTRIBUTES`
/// on a VM, or a stand-in.
pub trait MemoryAttributes {
    /// Whether the private attribute can be set at all.
    fn supports_private(&self) -> bool;

    /// Sets (or clears) the private attribute of `[gpa, gpa + size)`.
    fn set_private(&self, gpa: u64, size: u64, private: bool) -> Result<(), KvmError>;
}

impl MemoryAttributes for KvmVm {
    fn supports_private(&self) -> bool {
        self.supports_private_attributes()
    }

    fn set_private(&self, gpa: u64, size: u64, private: bool) -> Result<(), KvmError> {
        KvmVm::set_private(self, gpa, size, private)
    }
}

/// Converts `[gpa, gpa + size)` of `region` to `to`: KVM's attributes first
/// (where `kvm` takes them; a refusal leaves everything unchanged), then the
/// file's. Says which protection is in force.
pub fn convert_guest_range(
    region: &GuestRegion,
    gpa: u64,
    size: u64,
    to: Attribute,
    kvm: Option<&dyn MemoryAttributes>,
) -> Result<Protection, KvmError> {
    let inside = gpa >= region.guest_addr()
        && gpa
            .checked_add(size)
            .is_some_and(|end| end <= region.guest_addr() + region.size());
    if !inside {
        return Err(KvmError::Invalid(format!(
            "range {gpa:#x}+{size:#x} is not inside the region at {:#x}",
            region.guest_addr()
        )));
    }
    let offset = region.file_offset() + (gpa - region.guest_addr());
    let told_kvm = match kvm {
        Some(kvm) if kvm.supports_private() => {
            kvm.set_private(gpa, size, to == Attribute::Private)?;
            true
        }
        _ => false,
    };
    region
        .file()
        .convert(offset, size, to)
        .map_err(|err| KvmError::Invalid(err.to_string()))?;
    Ok(if told_kvm {
        Protection::HostViewAndKvm
    } else {
        Protection::HostViewOnly
    })
}

/// Where a memslot goes and what backs it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotBinding {
    /// The memslot number.
    pub slot: u32,
    /// Its guest physical address.
    pub guest_addr: u64,
    /// Its size in bytes.
    pub size: u64,
    /// The file offset of its first byte.
    pub file_offset: u64,
    /// `KVM_MEM_LOG_DIRTY_PAGES` and/or `KVM_MEM_READONLY`.
    pub flags: u32,
}

/// A KVM VM and the guest memory bound to it.
#[derive(Debug)]
pub struct KvmVm {
    kvm: Kvm,
    vm: VmFd,
    vm_type: u64,
    caps: KvmCaps,
    slots: Mutex<HashMap<u32, Arc<GuestRegion>>>,
}

impl KvmVm {
    /// A default-type VM.
    pub fn new() -> Result<Arc<Self>, KvmError> {
        Self::with_type(0)
    }

    /// A VM of `vm_type` (`KVM_CREATE_VM`'s argument).
    pub fn with_type(vm_type: u64) -> Result<Arc<Self>, KvmError> {
        let kvm = Kvm::new().map_err(|err| KvmError::NoKvm(format!("/dev/kvm: {err}")))?;
        let vm = kvm
            .create_vm_with_type(vm_type)
            .map_err(KvmError::ioctl("KVM_CREATE_VM"))?;
        let mut caps = KvmCaps::read(&kvm);
        // The VM's own answer is the one that counts for guest_memfd flags.
        let flags = vm.check_extension_raw(libc::c_ulong::from(KVM_CAP_GUEST_MEMFD_FLAGS));
        if flags >= 0 {
            caps.guest_memfd_flags = flags as u64;
        }
        Ok(Arc::new(Self {
            kvm,
            vm,
            vm_type,
            caps,
            slots: Mutex::new(HashMap::new()),
        }))
    }

    /// The VM file descriptor.
    pub fn vm(&self) -> &VmFd {
        &self.vm
    }

    /// The `/dev/kvm` handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM type.
    pub fn vm_type(&self) -> u64 {
        self.vm_type
    }

    /// The capabilities.
    pub fn caps(&self) -> &KvmCaps {
        &self.caps
    }

    /// Whether the VM takes `KVM_SET_MEMORY_ATTRIBUTES` with the private bit.
    pub fn supports_private_attributes(&self) -> bool {
        self.caps.memory_attributes & u64::from(KVM_MEMORY_ATTRIBUTE_PRIVATE) != 0
    }

    /// Registers `region` as memslot `slot` with `flags` (`KVM_MEM_*`). A
    /// guest_memfd region is bound with `KVM_MEM_GUEST_MEMFD`, its file
    /// offset, and its own mapping as the userspace address; other backends
    /// are plain slots. The VM keeps the region until [`unbind`](Self::unbind).
    pub fn bind(&self, slot: u32, region: Arc<GuestRegion>, flags: u32) -> Result<(), KvmError> {
        let binding = SlotBinding {
            slot,
            guest_addr: region.guest_addr(),
            size: region.size(),
            file_offset: region.file_offset(),
            flags,
        };
        let mut memory = self.check_binding(region.file(), &binding)?;
        memory.userspace_addr = region.host_addr() as u64;
        // SAFETY: the userspace range is the region's own mapping, which the
        // VM keeps alive (it holds the region) until the slot is deleted.
        unsafe { self.vm.set_user_memory_region2(memory) }
            .map_err(KvmError::ioctl("KVM_SET_USER_MEMORY_REGION2"))?;
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(slot, region);
        Ok(())
    }

    /// Checks a memslot over `file` as KVM would, and builds the ioctl's
    /// argument (without the userspace address): guest_memfd slots take no
    /// dirty logging or read-only flag, a page-aligned offset, and a range
    /// inside the file; secret memory and NO_DIRECT_MAP on TDX are refused.
    pub fn check_binding(
        &self,
        file: &GuestMemFile,
        binding: &SlotBinding,
    ) -> Result<kvm_userspace_memory_region2, KvmError> {
        check_memory(file.backend(), file.flags(), self.vm_type, &self.caps)?;
        let flags = binding.flags;
        if flags & !(KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY) != 0 {
            return Err(KvmError::Invalid(format!(
                "unknown memslot flags {flags:#x}"
            )));
        }
        if binding.size == 0 || !binding.size.is_multiple_of(PAGE_SIZE) {
            return Err(KvmError::Invalid(format!(
                "memslot size {:#x} is not a non-zero multiple of the page size",
                binding.size
            )));
        }
        let mut memory = kvm_userspace_memory_region2 {
            slot: binding.slot,
            flags,
            guest_phys_addr: binding.guest_addr,
            memory_size: binding.size,
            ..Default::default()
        };
        if file.backend() == BackendKind::Kvm {
            if flags & (KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY) != 0 {
                return Err(KvmError::Invalid(
                    "dirty logging and read-only are not supported on a guest_memfd slot".into(),
                ));
            }
            let offset = binding.file_offset;
            if !offset.is_multiple_of(PAGE_SIZE) {
                return Err(KvmError::Invalid(format!(
                    "guest_memfd offset {offset:#x} is not page aligned"
                )));
            }
            if offset
                .checked_add(binding.size)
                .is_none_or(|end| end > file.size())
            {
                return Err(KvmError::Invalid(format!(
                    "guest_memfd range {offset:#x}+{:#x} passes the file's end {:#x}",
                    binding.size,
                    file.size()
                )));
            }
            memory.flags |= KVM_MEM_GUEST_MEMFD;
            memory.guest_memfd =
                file.fd().expect("guest_memfd has a descriptor").as_raw_fd() as u32;
            memory.guest_memfd_offset = offset;
        }
        Ok(memory)
    }

    /// Deletes memslot `slot` and lets its region go.
    pub fn unbind(&self, slot: u32) -> Result<Arc<GuestRegion>, KvmError> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let region = slots
            .get(&slot)
            .cloned()
            .ok_or_else(|| KvmError::Invalid(format!("memslot {slot} is not bound")))?;
        let mut memory = kvm_userspace_memory_region2 {
            slot,
            ..Default::default()
        };
        if region.file().backend() == BackendKind::Kvm {
            memory.flags = KVM_MEM_GUEST_MEMFD;
        }
        // SAFETY: a zero-sized region deletes the slot; no memory is named.
        unsafe { self.vm.set_user_memory_region2(memory) }
            .map_err(KvmError::ioctl("KVM_SET_USER_MEMORY_REGION2"))?;
        slots.remove(&slot);
        Ok(region)
    }

    /// Sets or clears the private attribute of `[gpa, gpa + size)`.
    pub fn set_private(&self, gpa: u64, size: u64, private: bool) -> Result<(), KvmError> {
        if !self.supports_private_attributes() {
            return Err(KvmError::NotSupported(
                "KVM_SET_MEMORY_ATTRIBUTES (KVM_CAP_MEMORY_ATTRIBUTES has no private bit)".into(),
            ));
        }
        self.vm
            .set_memory_attributes(kvm_memory_attributes {
                address: gpa,
                size,
                attributes: if private {
                    u64::from(KVM_MEMORY_ATTRIBUTE_PRIVATE)
                } else {
                    0
                },
                flags: 0,
            })
            .map_err(KvmError::ioctl("KVM_SET_MEMORY_ATTRIBUTES"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(flags: u64) -> KvmCaps {
        KvmCaps {
            guest_memfd: true,
            guest_memfd_flags: flags,
            ..KvmCaps::default()
        }
    }

    #[test]
    fn secret_memory_is_refused_with_the_reason() {
        let err = check_memory(BackendKind::Secret, 0, 0, &caps(3)).unwrap_err();
        assert_eq!(err.errno(), libc::EINVAL);
        assert!(err.to_string().contains("direct map"), "{err}");
        let err = check_memory(BackendKind::Secret, 0, 0, &caps(7)).unwrap_err();
        assert!(err.to_string().contains("NO_DIRECT_MAP"), "{err}");
    }

    #[test]
    fn secret_becomes_no_direct_map_guest_memfd_where_offered() {
        assert_eq!(
            choose_backend(BackendKind::Secret, 0, &caps(7)).unwrap(),
            (BackendKind::Kvm, GUEST_MEMFD_FLAG_NO_DIRECT_MAP)
        );
        assert!(choose_backend(BackendKind::Secret, 0, &caps(3)).is_err());
        assert!(choose_backend(BackendKind::Secret, KVM_X86_TDX_VM, &caps(7)).is_err());
        assert_eq!(
            choose_backend(BackendKind::Hugetlb, 0, &caps(3)).unwrap(),
            (BackendKind::Hugetlb, 0)
        );
    }

    #[test]
    fn no_direct_map_needs_the_cap_and_no_tdx() {
        let flag = GUEST_MEMFD_FLAG_NO_DIRECT_MAP;
        assert!(check_memory(BackendKind::Kvm, flag, 0, &caps(7)).is_ok());
        let err = check_memory(BackendKind::Kvm, flag, 0, &caps(3)).unwrap_err();
        assert_eq!(err.errno(), libc::EOPNOTSUPP);
        let err = check_memory(BackendKind::Kvm, flag, KVM_X86_TDX_VM, &caps(7)).unwrap_err();
        assert!(err.to_string().contains("TDX"), "{err}");
        assert!(check_memory(BackendKind::Memfd, 1, 0, &caps(3)).is_ok());
    }
}
