//! guest_memfd on real KVM: a guest reads what the host wrote through the
//! guest_memfd's own mapping and writes back; memslot binding errors match
//! the kernel's. Skipped, with the reason, where the host has no KVM with
//! mappable guest_memfd.

mod common;

use std::os::fd::AsRawFd;
use std::sync::Arc;

use common::{SHARED_MMAP, guest_memfd_vm, host_allows};
use gmem::DirtyTracking;
use gmem::consts::{KVM_MEM_GUEST_MEMFD, KVM_MEM_LOG_DIRTY_PAGES};
use gmem::{
    Backend, Capability, GmemConfig, GuestMemFile, GuestRegion, KvmVm, SlotBinding, SlotRequest,
};
use kvm_bindings::kvm_userspace_memory_region2;
use kvm_ioctls::VcpuExit;

const MEM: u64 = 64 << 10;
const DATA: u64 = 0x1000;

/// Real mode at address 0: read the byte at 0x1000; if it is 0xaa write
/// 0xff there, else 0xee; halt.
const GUEST: [u8; 19] = [
    0xa0, 0x00, 0x10, // mov al, [0x1000]
    0x3c, 0xaa, // cmp al, 0xaa
    0x75, 0x06, // jne fail
    0xc6, 0x06, 0x00, 0x10, 0xff, // mov byte [0x1000], 0xff
    0xf4, // hlt
    0xc6, 0x06, 0x00, 0x10, 0xee, // fail: mov byte [0x1000], 0xee
    0xf4, // hlt
];

/// A VM, on any KVM, or `None` (the skip reported).
fn plain_vm_or_skip(what: &str) -> Option<Arc<KvmVm>> {
    host_allows(what, &[Capability::Kvm]).then(|| KvmVm::new().expect("the probe found KVM"))
}

/// Runs `GUEST` (at gpa 0, real mode) on a new vCPU until it halts.
fn run_guest_to_hlt(vm: &KvmVm) {
    let vcpu = vm.vm().create_vcpu(0).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    sregs.ds.base = 0;
    sregs.ds.selector = 0;
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = 0;
    regs.rflags = 2;
    vcpu.set_regs(&regs).unwrap();
    let mut vcpu = vcpu;
    match vcpu.run().unwrap() {
        VcpuExit::Hlt => {}
        other => panic!("unexpected exit {other:?}"),
    }
}

fn gmem_file(vm: &Arc<KvmVm>, size: u64) -> GuestMemFile {
    GuestMemFile::create(
        &Backend::Kvm(vm.clone()),
        GmemConfig {
            size,
            flags: SHARED_MMAP,
            huge_page_size_log2: 0,
        },
    )
    .expect("guest_memfd")
}

#[test]
fn a_guest_reads_and_writes_guest_memfd_memory() {
    let Some(vm) = guest_memfd_vm("guest run") else {
        return;
    };
    let file = gmem_file(&vm, MEM);
    let region = Arc::new(GuestRegion::new(&file, 0, MEM, 0, DirtyTracking::Off).unwrap());
    let view = region.view();
    view.write_at(0, &GUEST).unwrap();
    view.fill(DATA, 1, 0xaa).unwrap();
    vm.bind(0, region.clone(), 0).unwrap();

    run_guest_to_hlt(&vm);
    let mut byte = [0u8];
    region.view().read_at(DATA, &mut byte).unwrap();
    assert_eq!(byte[0], 0xff, "the guest saw 0xaa and wrote 0xff");
    vm.unbind(0).unwrap();
}

#[test]
fn binding_errors_are_einval_like_the_kernel() {
    let Some(vm) = guest_memfd_vm("binding errors") else {
        return;
    };
    let file = gmem_file(&vm, MEM);
    let good = SlotBinding {
        slot: 1,
        guest_addr: 0x10_0000,
        size: MEM,
        file_offset: 0,
        flags: 0,
    };
    assert!(vm.check_binding(&file, &good).is_ok());
    let bad = [
        (
            "unaligned offset",
            SlotBinding {
                file_offset: 0x800,
                size: MEM - 0x1000,
                ..good
            },
        ),
        (
            "past the end",
            SlotBinding {
                file_offset: 0x1000,
                ..good
            },
        ),
        (
            "dirty logging",
            SlotBinding {
                flags: KVM_MEM_LOG_DIRTY_PAGES,
                ..good
            },
        ),
    ];
    for (what, binding) in bad {
        let err = vm.check_binding(&file, &binding).unwrap_err();
        assert_eq!(err.errno(), libc::EINVAL, "{what}: {err}");
    }
    // The kernel agrees: the same slots go straight to the ioctl.
    let view = file.map_guest(0, MEM).unwrap();
    for (what, offset, size, flags) in [
        ("unaligned offset", 0x800, MEM - 0x1000, 0),
        ("past the end", 0x1000, MEM, 0),
        ("dirty logging", 0, MEM, KVM_MEM_LOG_DIRTY_PAGES),
    ] {
        let region = kvm_userspace_memory_region2 {
            slot: 2,
            flags: flags | KVM_MEM_GUEST_MEMFD,
            guest_phys_addr: 0x20_0000,
            memory_size: size,
            userspace_addr: view.as_ptr() as u64,
            guest_memfd_offset: offset,
            guest_memfd: file.fd().unwrap().as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: the userspace address is a live mapping of the file; the
        // call is expected to fail, and the slot is deleted if it does not.
        let result = unsafe { vm.vm().set_user_memory_region2(region) };
        assert_eq!(
            result.map_err(|e| e.errno()),
            Err(libc::EINVAL),
            "kernel: {what}"
        );
    }
}

#[test]
fn plain_backends_bind_as_ordinary_slots_and_secret_is_refused() {
    let Some(vm) = plain_vm_or_skip("plain slots") else {
        return;
    };
    let memfd = GuestMemFile::create(
        &Backend::Memfd,
        GmemConfig {
            size: MEM,
            flags: SHARED_MMAP,
            huge_page_size_log2: 0,
        },
    )
    .unwrap();
    let region = Arc::new(GuestRegion::new(&memfd, 0, MEM, 0x40_0000, DirtyTracking::Off).unwrap());
    vm.bind(3, region, KVM_MEM_LOG_DIRTY_PAGES).unwrap();
    vm.unbind(3).unwrap();
    if let Ok(secret) = GuestMemFile::create(
        &Backend::Secret,
        GmemConfig {
            size: MEM,
            flags: SHARED_MMAP,
            huge_page_size_log2: 0,
        },
    ) {
        let region =
            Arc::new(GuestRegion::new(&secret, 0, MEM, 0x80_0000, DirtyTracking::Off).unwrap());
        let err = vm.bind(4, region, 0).unwrap_err();
        assert_eq!(err.errno(), libc::EINVAL);
        assert!(err.to_string().contains("direct map"), "{err}");
    }
}

/// A stand-in for KVM_SET_MEMORY_ATTRIBUTES, which this host's KVM lacks.
#[derive(Default)]
struct RecordingAttributes {
    calls: std::sync::Mutex<Vec<(u64, u64, gmem::Attribute)>>,
    refuse: bool,
}

impl gmem::MemoryAttributes for RecordingAttributes {
    fn supports_private(&self) -> bool {
        true
    }

    fn set_memory_attribute(
        &self,
        gpa: u64,
        size: u64,
        attribute: gmem::Attribute,
    ) -> Result<(), gmem::KvmError> {
        if self.refuse {
            return Err(gmem::MissingCapability::Other("refused by the test").into());
        }
        self.calls.lock().unwrap().push((gpa, size, attribute));
        Ok(())
    }
}

#[test]
fn conversion_tells_kvm_where_it_can_and_says_so() {
    use gmem::{Attribute, Protection, convert_guest_range};
    let file = GuestMemFile::create(
        &Backend::Memfd,
        GmemConfig {
            size: MEM,
            flags: SHARED_MMAP,
            huge_page_size_log2: 0,
        },
    )
    .unwrap();
    let region = GuestRegion::new(&file, 0x4000, 0x8000, 0x10_0000, DirtyTracking::Off).unwrap();
    // With attributes (a stand-in): KVM is told the gpa range, the file the offset.
    let kvm = RecordingAttributes::default();
    let protection =
        convert_guest_range(&region, 0x10_1000, 0x2000, Attribute::Private, Some(&kvm)).unwrap();
    assert_eq!(protection, Protection::HostViewAndKvm);
    assert_eq!(
        *kvm.calls.lock().unwrap(),
        vec![(0x10_1000, 0x2000, Attribute::Private)]
    );
    assert_eq!(file.attribute(0x5000), Attribute::Private);
    assert_eq!(file.attribute(0x7000), Attribute::Shared);
    // A refusal changes nothing.
    let refusing = RecordingAttributes {
        refuse: true,
        ..Default::default()
    };
    assert!(
        convert_guest_range(
            &region,
            0x10_3000,
            0x1000,
            Attribute::Private,
            Some(&refusing)
        )
        .is_err()
    );
    assert_eq!(file.attribute(0x7000), Attribute::Shared);
    // Outside the region.
    assert!(convert_guest_range(&region, 0x10_7000, 0x2000, Attribute::Private, None).is_err());
    // This host's KVM has no memory attributes: only host views protect.
    if let Some(vm) = plain_vm_or_skip("the real VM part") {
        let protection =
            convert_guest_range(&region, 0x10_1000, 0x1000, Attribute::Shared, Some(&*vm)).unwrap();
        let expected = if vm.supports_private_attributes() {
            Protection::HostViewAndKvm
        } else {
            Protection::HostViewOnly
        };
        assert_eq!(protection, expected);
    }
}

/// A guest_memfd of `vm`, with or without GUEST_MEMFD_FLAG_MMAP.
fn gmem_file_with(vm: &Arc<KvmVm>, size: u64, flags: u64) -> GuestMemFile {
    GuestMemFile::create(
        &Backend::Kvm(vm.clone()),
        GmemConfig {
            size,
            flags,
            huge_page_size_log2: 0,
        },
    )
    .expect("guest_memfd")
}

/// Anonymous shared memory for `size` bytes at `gpa`.
fn shared_region(size: u64, gpa: u64) -> Arc<GuestRegion> {
    let file = GuestMemFile::create(
        &Backend::Anonymous,
        GmemConfig {
            size,
            flags: SHARED_MMAP,
            huge_page_size_log2: 0,
        },
    )
    .unwrap();
    Arc::new(GuestRegion::new(&file, 0, size, gpa, DirtyTracking::Off).unwrap())
}

/// `predict` and the kernel give the same verdict for each case: the
/// request is predicted, then sent straight to `KVM_SET_USER_MEMORY_REGION2`
/// on the same VM (a fresh one per case, with one guest_memfd slot bound
/// through `bind_private` first).
#[test]
fn predicted_memslot_verdicts_match_the_kernels() {
    if guest_memfd_vm("memslot verdicts").is_none() {
        return;
    }
    type Build = fn(&Arc<KvmVm>, &GuestMemFile, &Arc<KvmVm>, &GuestMemFile, u64) -> SlotRequest;
    let shared = shared_region(4 * MEM, 0);
    let host = shared.host_addr() as u64;
    let cases: [(&str, i32, Build); 12] = [
        ("a free slot and range", 0, |_, file, _, _, host| {
            SlotRequest {
                slot: 2,
                flags: KVM_MEM_GUEST_MEMFD,
                guest_addr: 0x100_0000,
                size: MEM,
                userspace_addr: host + MEM,
                guest_memfd: Some((file.clone(), MEM)),
            }
        }),
        ("overlapping GPA", libc::EEXIST, |_, _, _, _, host| {
            SlotRequest {
                slot: 2,
                flags: 0,
                guest_addr: 0x1000,
                size: MEM,
                userspace_addr: host + MEM,
                guest_memfd: None,
            }
        }),
        (
            "a guest_memfd range bound to another slot",
            libc::EINVAL,
            |_, file, _, _, host| SlotRequest {
                slot: 2,
                flags: KVM_MEM_GUEST_MEMFD,
                guest_addr: 0x100_0000,
                size: MEM,
                userspace_addr: host + MEM,
                guest_memfd: Some((file.clone(), 0x1000)),
            },
        ),
        (
            "another VM's guest_memfd",
            libc::EINVAL,
            |_, _, _, other, host| SlotRequest {
                slot: 2,
                flags: KVM_MEM_GUEST_MEMFD,
                guest_addr: 0x100_0000,
                size: MEM,
                userspace_addr: host + MEM,
                guest_memfd: Some((other.clone(), 0)),
            },
        ),
        (
            "changing a guest_memfd slot",
            libc::EINVAL,
            |_, file, _, _, host| SlotRequest {
                slot: 1,
                flags: KVM_MEM_GUEST_MEMFD,
                guest_addr: 0x100_0000,
                size: MEM,
                userspace_addr: host,
                guest_memfd: Some((file.clone(), 0)),
            },
        ),
        ("unaligned GPA", libc::EINVAL, |_, _, _, _, host| {
            SlotRequest {
                slot: 2,
                flags: 0,
                guest_addr: 0x100_0800,
                size: MEM,
                userspace_addr: host + MEM,
                guest_memfd: None,
            }
        }),
        (
            "a slot id beyond the limit",
            libc::EINVAL,
            |vm, _, _, _, host| SlotRequest {
                slot: vm.caps().nr_memslots as u32,
                flags: 0,
                guest_addr: 0x100_0000,
                size: MEM,
                userspace_addr: host + MEM,
                guest_memfd: None,
            },
        ),
        (
            "deleting a slot that is not there",
            libc::EINVAL,
            |_, _, _, _, _| SlotRequest {
                slot: 7,
                flags: 0,
                guest_addr: 0,
                size: 0,
                userspace_addr: 0,
                guest_memfd: None,
            },
        ),
        (
            "dirty logging on guest_memfd",
            libc::EINVAL,
            |_, file, _, _, host| SlotRequest {
                slot: 2,
                flags: KVM_MEM_GUEST_MEMFD | KVM_MEM_LOG_DIRTY_PAGES,
                guest_addr: 0x100_0000,
                size: MEM,
                userspace_addr: host + MEM,
                guest_memfd: Some((file.clone(), MEM)),
            },
        ),
        (
            "past the guest_memfd's end",
            libc::EINVAL,
            |_, file, _, _, host| SlotRequest {
                slot: 2,
                flags: KVM_MEM_GUEST_MEMFD,
                guest_addr: 0x100_0000,
                size: 2 * MEM,
                userspace_addr: host + MEM,
                guest_memfd: Some((file.clone(), 3 * MEM)),
            },
        ),
        (
            "an unaligned userspace address",
            libc::EINVAL,
            |_, _, _, _, host| SlotRequest {
                slot: 2,
                flags: 0,
                guest_addr: 0x100_0000,
                size: MEM,
                userspace_addr: host + 8,
                guest_memfd: None,
            },
        ),
        ("an unknown flag", libc::EINVAL, |_, _, _, _, host| {
            SlotRequest {
                slot: 2,
                flags: 1 << 5,
                guest_addr: 0x100_0000,
                size: MEM,
                userspace_addr: host + MEM,
                guest_memfd: None,
            }
        }),
    ];
    for (what, expected, build) in cases {
        let vm = KvmVm::new().unwrap();
        let other_vm = KvmVm::new().unwrap();
        let private = gmem_file_with(&vm, 4 * MEM, 0);
        let foreign = gmem_file_with(&other_vm, 4 * MEM, 0);
        let first = shared_region(MEM, 0);
        vm.bind_private(1, first, &private, 0, 0).unwrap();
        let request = build(&vm, &private, &other_vm, &foreign, host);
        let predicted = vm.predict(&request).err().map_or(0, |e| e.errno());
        // SAFETY: the userspace range is inside `shared`, alive for the test;
        // the VM is dropped (and the slot with it) before `shared`.
        let kernel = unsafe { vm.vm().set_user_memory_region2(request.to_region2()) }
            .err()
            .map_or(0, |e| e.errno());
        assert_eq!((predicted, kernel), (expected, expected), "{what}");
    }
}

/// The confidential-VM layout: a guest_memfd the host cannot map (no
/// GUEST_MEMFD_FLAG_MMAP) bound with a separate shared mapping as the
/// slot's userspace address. The kernel takes it, and a guest whose memory
/// is all shared (no memory attributes here) runs from the shared mapping.
#[test]
fn a_private_guest_memfd_binds_beside_a_shared_mapping() {
    let Some(vm) = guest_memfd_vm("confidential layout") else {
        return;
    };
    let private = gmem_file_with(&vm, MEM, 0);
    assert_eq!(
        private.map(0, MEM).unwrap_err().errno(),
        libc::ENODEV,
        "the host cannot map it"
    );
    let shared = shared_region(MEM, 0);
    let view = shared.view();
    view.write_at(0, &GUEST).unwrap();
    view.fill(DATA, 1, 0xaa).unwrap();
    vm.bind_private(0, shared.clone(), &private, 0, 0).unwrap();
    let err = vm
        .bind_private(0, shared.clone(), &private, 0, 0)
        .unwrap_err();
    assert_eq!(
        err.errno(),
        libc::EINVAL,
        "a guest_memfd slot cannot change"
    );
    run_guest_to_hlt(&vm);
    let mut byte = [0u8];
    view.read_at(DATA, &mut byte).unwrap();
    assert_eq!(byte[0], 0xff, "the guest ran from the shared mapping");
    vm.unbind(0).unwrap();
}
