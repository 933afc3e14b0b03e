//! KVM binding: a VM, its guest_memfd files, and memslots registered with
//! `KVM_SET_USER_MEMORY_REGION2`.

mod dirty;
mod error;

pub use error::{KvmError, MemoryRefusal, MissingCapability, SlotError};

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_create_guest_memfd, kvm_memory_attributes, kvm_userspace_memory_region2};
use kvm_ioctls::{Kvm, VmFd};

use crate::attrs::Attribute;
use crate::caps::{Capability, KvmCaps};
use crate::consts::{
    GUEST_MEMFD_FLAG_NO_DIRECT_MAP, KVM_CAP_GUEST_MEMFD_FLAGS, KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_X86_TDX_VM,
};
use crate::file::{
    BackendKind, GmemConfig, GmemError, GuestMemFile, GuestMemfdVm, PAGE_SIZE, Protection,
};
use crate::region::GuestRegion;

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
        return Err(MemoryRefusal::SecretMemory {
            kernel_offers_no_direct_map: no_direct_map,
        }
        .into());
    }
    if flags & GUEST_MEMFD_FLAG_NO_DIRECT_MAP != 0 {
        if vm_type == u64::from(KVM_X86_TDX_VM) {
            return Err(MemoryRefusal::NoDirectMapOnTdx.into());
        }
        if !no_direct_map {
            return Err(MissingCapability::NoDirectMap.into());
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

    /// Gives `[gpa, gpa + size)` the memory attribute `attribute`.
    fn set_memory_attribute(
        &self,
        gpa: u64,
        size: u64,
        attribute: Attribute,
    ) -> Result<(), KvmError>;
}

impl MemoryAttributes for KvmVm {
    fn supports_private(&self) -> bool {
        self.supports_private_attributes()
    }

    fn set_memory_attribute(
        &self,
        gpa: u64,
        size: u64,
        attribute: Attribute,
    ) -> Result<(), KvmError> {
        KvmVm::set_memory_attribute(self, gpa, size, attribute)
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
        return Err(KvmError::OutsideRegion {
            gpa,
            size,
            region: region.guest_addr(),
        });
    }
    let offset = region.file_offset() + (gpa - region.guest_addr());
    let told_kvm = match kvm {
        Some(kvm) if kvm.supports_private() => {
            kvm.set_memory_attribute(gpa, size, to)?;
            true
        }
        _ => false,
    };
    region
        .file()
        .convert(offset, size, to)
        .map_err(KvmError::File)?;
    Ok(if told_kvm {
        Protection::HostViewAndKvm
    } else {
        Protection::HostViewOnly
    })
}

/// One `KVM_SET_USER_MEMORY_REGION2` call, as [`KvmVm::predict`] judges it.
#[derive(Clone, Debug)]
pub struct SlotRequest {
    /// The slot: address space in bits 31:16, id in 15:0.
    pub slot: u32,
    /// `KVM_MEM_LOG_DIRTY_PAGES`, `KVM_MEM_READONLY`, `KVM_MEM_GUEST_MEMFD`.
    pub flags: u32,
    /// The guest physical address.
    pub guest_addr: u64,
    /// The size in bytes (0 deletes the slot).
    pub size: u64,
    /// The host address of the slot's (shared) memory.
    pub userspace_addr: u64,
    /// With `KVM_MEM_GUEST_MEMFD`: the guest_memfd and the offset in it.
    pub guest_memfd: Option<(GuestMemFile, u64)>,
}

impl SlotRequest {
    /// The ioctl's argument.
    pub fn to_region2(&self) -> kvm_userspace_memory_region2 {
        let (guest_memfd, guest_memfd_offset) = match &self.guest_memfd {
            Some((file, offset)) => (
                file.fd().map_or(u32::MAX, |fd| fd.as_raw_fd() as u32),
                *offset,
            ),
            None => (0, 0),
        };
        kvm_userspace_memory_region2 {
            slot: self.slot,
            flags: self.flags,
            guest_phys_addr: self.guest_addr,
            memory_size: self.size,
            userspace_addr: self.userspace_addr,
            guest_memfd_offset,
            guest_memfd,
            ..Default::default()
        }
    }
}

/// What a memslot call changes, when the kernel takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotChange {
    /// A new slot.
    Create,
    /// A slot removed.
    Delete,
    /// A slot moved to another guest address.
    Move,
    /// A slot's flags (dirty logging) changed.
    FlagsOnly,
    /// The slot is bound as asked already.
    Nothing,
}

/// A bound memslot and what it keeps alive.
#[derive(Debug)]
struct BoundSlot {
    region: Arc<GuestRegion>,
    /// The guest_memfd of the confidential layout, when it is not the
    /// region's own file.
    private: Option<GuestMemFile>,
    guest_memfd: Option<(GuestMemFile, u64)>,
    memory: kvm_userspace_memory_region2,
}

/// Pages one memslot may hold (`KVM_MEM_MAX_NR_PAGES`).
const MAX_SLOT_PAGES: u64 = (1 << 31) - 1;

fn predict(
    caps: &KvmCaps,
    vm: &KvmVm,
    slots: &HashMap<u32, BoundSlot>,
    request: &SlotRequest,
) -> Result<SlotChange, KvmError> {
    let invalid = |why: SlotError| Err(KvmError::Slot(why));
    let id = u64::from(request.slot & 0xffff);
    let as_id = u64::from(request.slot >> 16);
    if id >= caps.nr_memslots {
        return invalid(SlotError::IdBeyond {
            id,
            slots: caps.nr_memslots,
        });
    }
    let gmem = request.flags & KVM_MEM_GUEST_MEMFD != 0;
    let mut valid = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_GUEST_MEMFD;
    if gmem {
        valid &= !KVM_MEM_LOG_DIRTY_PAGES;
    } else if caps.readonly_mem {
        valid |= KVM_MEM_READONLY;
    }
    if request.flags & !valid != 0 {
        return invalid(SlotError::Flags {
            flags: request.flags,
            guest_memfd: gmem,
        });
    }
    let aligned = |value: u64| value.is_multiple_of(PAGE_SIZE);
    if !aligned(request.size) {
        return invalid(SlotError::Size { size: request.size });
    }
    if !aligned(request.guest_addr) {
        return invalid(SlotError::GuestAddress {
            addr: request.guest_addr,
        });
    }
    if !aligned(request.userspace_addr)
        || request
            .userspace_addr
            .checked_add(request.size)
            .is_none_or(|end| end > USER_ADDRESS_END)
    {
        return invalid(SlotError::UserspaceAddress {
            addr: request.userspace_addr,
            size: request.size,
        });
    }
    let gmem_offset = request
        .guest_memfd
        .as_ref()
        .map_or(0, |(_, offset)| *offset);
    if gmem && (!aligned(gmem_offset) || gmem_offset.checked_add(request.size).is_none()) {
        return invalid(SlotError::GuestMemfdOffset {
            offset: gmem_offset,
        });
    }
    if as_id >= caps.address_spaces {
        return invalid(SlotError::AddressSpace { as_id });
    }
    if request.guest_addr.checked_add(request.size).is_none() {
        return invalid(SlotError::Wraps {
            addr: request.guest_addr,
            size: request.size,
        });
    }
    let npages = request.size / PAGE_SIZE;
    if npages > MAX_SLOT_PAGES {
        return invalid(SlotError::TooLarge { pages: npages });
    }
    let old = slots.get(&request.slot);
    if request.size == 0 {
        return match old {
            Some(_) => Ok(SlotChange::Delete),
            None => invalid(SlotError::NoSuchSlot { slot: request.slot }),
        };
    }
    let base_gfn = request.guest_addr / PAGE_SIZE;
    let change = match old {
        None => SlotChange::Create,
        Some(_) if gmem => {
            return invalid(SlotError::GuestMemfdSlotChange { slot: request.slot });
        }
        Some(old) => {
            let old = &old.memory;
            if request.userspace_addr != old.userspace_addr
                || request.size != old.memory_size
                || (request.flags ^ old.flags) & KVM_MEM_READONLY != 0
            {
                return invalid(SlotError::FixedFields { slot: request.slot });
            }
            if request.guest_addr != old.guest_phys_addr {
                SlotChange::Move
            } else if request.flags != old.flags {
                SlotChange::FlagsOnly
            } else {
                return Ok(SlotChange::Nothing);
            }
        }
    };
    if matches!(change, SlotChange::Create | SlotChange::Move) {
        let end = base_gfn + npages;
        let overlap = slots.iter().find(|&(&other, bound)| {
            other != request.slot
                && other >> 16 == request.slot >> 16
                && bound.memory.guest_phys_addr / PAGE_SIZE < end
                && base_gfn < (bound.memory.guest_phys_addr + bound.memory.memory_size) / PAGE_SIZE
        });
        if let Some((&other, _)) = overlap {
            return invalid(SlotError::Overlap {
                addr: request.guest_addr,
                size: request.size,
                other,
            });
        }
    }
    if gmem {
        let Some((file, offset)) = &request.guest_memfd else {
            return invalid(SlotError::NoGuestMemfd);
        };
        if file.backend() != BackendKind::Kvm {
            return invalid(SlotError::NotGuestMemfd {
                backend: file.backend().name(),
            });
        }
        if !file
            .vm()
            .is_some_and(|owner| std::ptr::addr_eq(Arc::as_ptr(owner), vm as *const KvmVm))
        {
            return invalid(SlotError::OtherVm);
        }
        if offset + request.size > file.size() {
            return invalid(SlotError::PastFileEnd {
                offset: *offset,
                size: request.size,
                file_size: file.size(),
            });
        }
        let taken = slots.iter().find(|(_, bound)| {
            bound
                .guest_memfd
                .as_ref()
                .is_some_and(|(bound_file, bound_offset)| {
                    bound_file.is_same_file(file)
                        && *bound_offset < offset + request.size
                        && *offset < bound_offset + bound.memory.memory_size
                })
        });
        if let Some((&other, _)) = taken {
            return invalid(SlotError::GuestMemfdTaken {
                offset: *offset,
                size: request.size,
                other,
            });
        }
    }
    Ok(change)
}

/// The end of x86-64 user memory with 4-level paging (`TASK_SIZE_MAX`).
const USER_ADDRESS_END: u64 = (1 << 47) - 4096;

impl GuestMemfdVm for KvmVm {
    /// `KVM_CREATE_GUEST_MEMFD` of `config`: the kernel checks the size and
    /// the flags and answers with its errno.
    fn create_guest_memfd(&self, config: GmemConfig) -> Result<OwnedFd, GmemError> {
        if Capability::GuestMemfd.is_hidden() {
            // What a kernel without guest_memfd answers: an unknown VM ioctl.
            return Err(GmemError::Os {
                op: "KVM_CREATE_GUEST_MEMFD",
                source: std::io::Error::from_raw_os_error(libc::ENOTTY),
            });
        }
        let raw = self
            .vm
            .create_guest_memfd(kvm_create_guest_memfd {
                size: config.size,
                flags: config.flags,
                reserved: [0; 6],
            })
            .map_err(|err| GmemError::Os {
                op: "KVM_CREATE_GUEST_MEMFD",
                source: std::io::Error::from_raw_os_error(err.errno()),
            })?;
        // SAFETY: the kernel just returned this descriptor; it is owned here
        // from now on and closed when the file is dropped.
        Ok(unsafe { OwnedFd::from_raw_fd(raw) })
    }

    fn guest_memfd_flags(&self) -> u64 {
        self.caps.guest_memfd_flags
    }
}

/// Opens `/dev/kvm`, unless `MMUKIT_HIDE_CAPS` hides KVM.
fn open_kvm() -> Result<Kvm, KvmError> {
    if Capability::Kvm.is_hidden() {
        return Err(KvmError::KvmHidden);
    }
    Kvm::new().map_err(|err| KvmError::NoKvm(std::io::Error::from_raw_os_error(err.errno())))
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
    slots: Mutex<HashMap<u32, BoundSlot>>,
}

impl KvmVm {
    /// A default-type VM.
    pub fn new() -> Result<Arc<Self>, KvmError> {
        Self::with_type(0)
    }

    /// A VM of `vm_type` (`KVM_CREATE_VM`'s argument).
    pub fn with_type(vm_type: u64) -> Result<Arc<Self>, KvmError> {
        let kvm = open_kvm()?;
        let vm = kvm
            .create_vm_with_type(vm_type)
            .map_err(KvmError::ioctl("KVM_CREATE_VM"))?;
        Ok(Self::wrap(kvm, vm, vm_type))
    }

    /// The caller's own VM (a VMM that made it with `KVM_CREATE_VM`), of
    /// `vm_type`: guest_memfd files are created on it and memslots bound on
    /// it. The descriptor is duplicated, so the caller keeps and closes its
    /// own. Memslots the caller binds itself are not known to
    /// [`predict`](Self::predict); the kernel still judges them.
    pub fn from_vm_fd(
        vm_fd: std::os::fd::BorrowedFd<'_>,
        vm_type: u64,
    ) -> Result<Arc<Self>, KvmError> {
        use std::os::fd::{AsRawFd, IntoRawFd};
        let kvm = open_kvm()?;
        let owned = vm_fd
            .try_clone_to_owned()
            .map_err(|source| KvmError::VmDescriptor {
                what: "duplicating",
                source,
            })?;
        // A VM descriptor is the anonymous inode "kvm-vm".
        let target = std::fs::read_link(format!("/proc/self/fd/{}", owned.as_raw_fd())).map_err(
            |source| KvmError::VmDescriptor {
                what: "inspecting",
                source,
            },
        )?;
        if target.as_os_str() != "anon_inode:kvm-vm" {
            return Err(KvmError::NotAVm {
                fd: vm_fd.as_raw_fd(),
                target,
            });
        }
        // SAFETY: `owned` is a KVM VM descriptor (checked above), whose
        // ownership passes to the VmFd.
        let vm = unsafe { kvm.create_vmfd_from_rawfd(owned.into_raw_fd()) }
            .map_err(KvmError::ioctl("KVM_GET_VCPU_MMAP_SIZE"))?;
        Ok(Self::wrap(kvm, vm, vm_type))
    }

    fn wrap(kvm: Kvm, vm: VmFd, vm_type: u64) -> Arc<Self> {
        let mut caps = KvmCaps::read(&kvm);
        // The VM's own answer is the one that counts for guest_memfd flags.
        let flags = vm.check_extension_raw(libc::c_ulong::from(KVM_CAP_GUEST_MEMFD_FLAGS));
        if flags >= 0 {
            caps.guest_memfd_flags = flags as u64;
            caps = caps.without_hidden();
        }
        Arc::new(Self {
            kvm,
            vm,
            vm_type,
            caps,
            slots: Mutex::new(HashMap::new()),
        })
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
    /// region of a guest_memfd file is bound with `KVM_MEM_GUEST_MEMFD`, its
    /// own mapping as the userspace address (the layout of a VM whose
    /// guest_memfd the host maps); the others are plain slots. Binding a
    /// slot id that is bound already changes that slot, as the kernel
    /// allows (a plain slot's flags or place; never a guest_memfd slot's).
    /// The VM keeps the region until [`unbind`](Self::unbind).
    pub fn bind(&self, slot: u32, region: Arc<GuestRegion>, flags: u32) -> Result<(), KvmError> {
        let file = region.file();
        let guest_memfd =
            (file.backend() == BackendKind::Kvm).then(|| (file.clone(), region.file_offset()));
        let request = SlotRequest {
            slot,
            flags: flags
                | if guest_memfd.is_some() {
                    KVM_MEM_GUEST_MEMFD
                } else {
                    0
                },
            guest_addr: region.guest_addr(),
            size: region.size(),
            userspace_addr: region.host_addr() as u64,
            guest_memfd,
        };
        check_memory(file.backend(), file.flags(), self.vm_type, &self.caps)?;
        self.set_slot(request, region, None)
    }

    /// The confidential-VM layout: memslot `slot` maps guest memory from
    /// `shared` (any backend: the userspace address, for shared pages) and
    /// from `private_file` at `private_offset` (a guest_memfd, typically
    /// created without GUEST_MEMFD_FLAG_MMAP, which the host cannot map; for
    /// private pages), as TDX and SNP VMMs bind memory. The slot covers
    /// `shared`'s guest range; the VM keeps both until
    /// [`unbind`](Self::unbind).
    pub fn bind_private(
        &self,
        slot: u32,
        shared: Arc<GuestRegion>,
        private_file: &GuestMemFile,
        private_offset: u64,
        flags: u32,
    ) -> Result<(), KvmError> {
        if private_file.backend() != BackendKind::Kvm {
            return Err(KvmError::PrivateNotGuestMemfd {
                backend: private_file.backend().name(),
            });
        }
        let file = shared.file();
        check_memory(file.backend(), file.flags(), self.vm_type, &self.caps)?;
        check_memory(
            BackendKind::Kvm,
            private_file.flags(),
            self.vm_type,
            &self.caps,
        )?;
        let request = SlotRequest {
            slot,
            flags: flags | KVM_MEM_GUEST_MEMFD,
            guest_addr: shared.guest_addr(),
            size: shared.size(),
            userspace_addr: shared.host_addr() as u64,
            guest_memfd: Some((private_file.clone(), private_offset)),
        };
        self.set_slot(request, shared, Some(private_file.clone()))
    }

    fn set_slot(
        &self,
        request: SlotRequest,
        region: Arc<GuestRegion>,
        private: Option<GuestMemFile>,
    ) -> Result<(), KvmError> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let change = predict(&self.caps, self, &slots, &request)?;
        if change == SlotChange::Nothing {
            return Ok(());
        }
        let memory = request.to_region2();
        // SAFETY: the userspace range is the region's own mapping, which the
        // VM keeps alive (it holds the region) until the slot is deleted.
        unsafe { self.vm.set_user_memory_region2(memory) }
            .map_err(KvmError::ioctl("KVM_SET_USER_MEMORY_REGION2"))?;
        slots.insert(
            request.slot,
            BoundSlot {
                region,
                private,
                guest_memfd: request.guest_memfd,
                memory,
            },
        );
        Ok(())
    }

    /// Checks a memslot over `file` as KVM would, and builds the ioctl's
    /// argument (without the userspace address): `secret` memory and
    /// NO_DIRECT_MAP on TDX are refused (see [`check_memory`]), then
    /// [`predict`](Self::predict) gives the kernel's verdict for the slot as
    /// [`bind`](Self::bind) would make it.
    pub fn check_binding(
        &self,
        file: &GuestMemFile,
        binding: &SlotBinding,
    ) -> Result<kvm_userspace_memory_region2, KvmError> {
        check_memory(file.backend(), file.flags(), self.vm_type, &self.caps)?;
        let guest_memfd =
            (file.backend() == BackendKind::Kvm).then(|| (file.clone(), binding.file_offset));
        let request = SlotRequest {
            slot: binding.slot,
            flags: binding.flags
                | if guest_memfd.is_some() {
                    KVM_MEM_GUEST_MEMFD
                } else {
                    0
                },
            guest_addr: binding.guest_addr,
            size: binding.size,
            userspace_addr: 0,
            guest_memfd,
        };
        self.predict(&request)?;
        Ok(request.to_region2())
    }

    /// What `KVM_SET_USER_MEMORY_REGION2` with `request` would do on this VM
    /// now, from the kernel's checks in the kernel's order
    /// (`kvm_vm_ioctl_set_memory_region`, `__kvm_set_memory_region`,
    /// `kvm_gmem_bind`), without calling it: the change it makes, or the
    /// error with the kernel's errno.
    ///
    /// - A slot id at or above the VM's user memslots (`KVM_CAP_NR_MEMSLOTS`),
    ///   or in an address space the VM lacks: EINVAL.
    /// - Flags: dirty logging is not for guest_memfd slots, read-only not
    ///   for guest_memfd slots (nor where the VM has no read-only memory),
    ///   unknown flags: EINVAL.
    /// - A size, guest address, userspace address or guest_memfd offset not
    ///   page aligned, a range that wraps, or more pages than a slot holds:
    ///   EINVAL.
    /// - Deleting a slot that does not exist: EINVAL.
    /// - Changing a bound slot: never a guest_memfd one, and never its
    ///   userspace address, size or read-only flag (EINVAL); binding it
    ///   again as it is changes nothing.
    /// - A new or moved slot overlapping another's guest range: EEXIST.
    /// - guest_memfd: a descriptor that is not a guest_memfd, or another
    ///   VM's, a range past the file's end, or a range of it already bound
    ///   to a slot: EINVAL.
    pub fn predict(&self, request: &SlotRequest) -> Result<SlotChange, KvmError> {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        predict(&self.caps, self, &slots, request)
    }

    /// Deletes memslot `slot` and returns the region it held.
    pub fn unbind(&self, slot: u32) -> Result<Arc<GuestRegion>, KvmError> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let bound = slots.get(&slot).ok_or(KvmError::NotBound { slot })?;
        let memory = kvm_userspace_memory_region2 {
            slot,
            flags: bound.memory.flags & KVM_MEM_GUEST_MEMFD,
            ..Default::default()
        };
        // SAFETY: a zero-sized region deletes the slot; no memory is named.
        unsafe { self.vm.set_user_memory_region2(memory) }
            .map_err(KvmError::ioctl("KVM_SET_USER_MEMORY_REGION2"))?;
        let bound = slots.remove(&slot).expect("found above");
        drop(bound.private);
        Ok(bound.region)
    }

    /// Gives `[gpa, gpa + size)` the memory attribute `attribute`
    /// (`KVM_SET_MEMORY_ATTRIBUTES`: private sets
    /// `KVM_MEMORY_ATTRIBUTE_PRIVATE`, shared clears it).
    pub fn set_memory_attribute(
        &self,
        gpa: u64,
        size: u64,
        attribute: Attribute,
    ) -> Result<(), KvmError> {
        if !self.supports_private_attributes() {
            return Err(MissingCapability::PrivateAttribute.into());
        }
        self.vm
            .set_memory_attributes(kvm_memory_attributes {
                address: gpa,
                size,
                attributes: match attribute {
                    Attribute::Private => u64::from(KVM_MEMORY_ATTRIBUTE_PRIVATE),
                    Attribute::Shared => 0,
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
        assert!(choose_backend(BackendKind::Secret, u64::from(KVM_X86_TDX_VM), &caps(7)).is_err());
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
        let err =
            check_memory(BackendKind::Kvm, flag, u64::from(KVM_X86_TDX_VM), &caps(7)).unwrap_err();
        assert!(err.to_string().contains("TDX"), "{err}");
        assert!(check_memory(BackendKind::Memfd, 1, 0, &caps(3)).is_ok());
    }
}
