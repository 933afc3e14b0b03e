//! Private memory: attributes, memory-fault exits, frames from the slot's
//! private memory, the leaf-level rule, and a TD's two trees.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use common::{MIB_PAGES, checked_stats, mmu};
use split::AccessKind;
use split::{
    Gfn, Gpa, Level, MemoryAttribute, Memslot, MmuConfig, MmuError, Pfn, PrivateMemory,
    PrivateMemoryError, PrivatePage, VmType,
};

/// Host frames of the slot's shared memory.
const SHARED_HOST: u64 = 0x10_0000;
/// Host frames of the slot's private memory.
const PRIVATE_HOST: u64 = 0x40_0000;

/// Private memory whose pages are `order` big, with a record of the pages
/// asked for; `split` marks 2 MiB ranges whose page is split (order 0).
#[derive(Debug)]
struct FakeFile {
    order: u8,
    split: Mutex<Vec<u64>>,
    calls: AtomicU64,
}

impl FakeFile {
    fn new(order: u8) -> Arc<Self> {
        Arc::new(Self {
            order,
            split: Mutex::new(Vec::new()),
            calls: AtomicU64::new(0),
        })
    }
}

impl PrivateMemory for FakeFile {
    fn get_pfn(&self, slot_page: u64) -> Result<PrivatePage, PrivateMemoryError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if slot_page >= 64 * MIB_PAGES {
            return Err("past the end of the file".into());
        }
        let split = self.split.lock().unwrap().contains(&(slot_page >> 9));
        Ok(PrivatePage {
            pfn: Pfn(PRIVATE_HOST + slot_page),
            order: if split { 0 } else { self.order },
        })
    }
}

fn protected(vm_type: VmType, file: Arc<FakeFile>) -> split::TdpMmu {
    let (_, mmu) = mmu(MmuConfig {
        vm_type,
        ..MmuConfig::default()
    });
    mmu.add_memslot(
        Memslot::new(0, Gfn(0), 64 * MIB_PAGES, Pfn(SHARED_HOST))
            .unwrap()
            .with_private_memory(file),
    )
    .unwrap();
    mmu
}

#[test]
fn a_default_vm_has_no_attributes_and_no_private_faults() {
    let (_, mmu) = mmu(MmuConfig::default());
    mmu.add_memslot(Memslot::new(0, Gfn(0), 1024, Pfn(SHARED_HOST)).unwrap())
        .unwrap();
    assert!(matches!(
        mmu.set_memory_attributes(Gfn(0), Gfn(1), MemoryAttribute::Private),
        Err(MmuError::NoPrivateMemory { .. })
    ));
    let mut vcpu = mmu.new_vcpu_caches();
    assert!(matches!(
        mmu.fault_as(
            &mut vcpu,
            Gpa(0),
            AccessKind::Write,
            MemoryAttribute::Private
        ),
        Err(MmuError::NoPrivateMemory { .. })
    ));
    assert_eq!(mmu.memory_attribute(Gfn(0)), MemoryAttribute::Shared);
}

#[test]
fn a_mismatched_access_exits_with_a_memory_fault_and_the_kind_of_access() {
    let mmu = protected(VmType::SoftwareProtected, FakeFile::new(9));
    let mut vcpu = mmu.new_vcpu_caches();
    // Memory starts shared: a private access exits.
    let err = mmu
        .fault_as(
            &mut vcpu,
            Gpa(0x5123),
            AccessKind::Write,
            MemoryAttribute::Private,
        )
        .unwrap_err();
    // The exit names the faulting page, not the byte:
    // kvm_mmu_prepare_memory_fault_exit() reports gfn_to_gpa(fault->gfn)
    // with PAGE_SIZE.
    assert!(
        matches!(
            err,
            MmuError::MemoryFault {
                gpa: Gpa(0x5000),
                size: 4096,
                private: true
            }
        ),
        "{err}"
    );
    mmu.set_memory_attributes(Gfn(5), Gfn(6), MemoryAttribute::Private)
        .unwrap();
    let err = mmu
        .fault_as(
            &mut vcpu,
            Gpa(0x5000),
            AccessKind::Read,
            MemoryAttribute::Shared,
        )
        .unwrap_err();
    assert!(matches!(err, MmuError::MemoryFault { private: false, .. }));
    assert_eq!(mmu.counters().memory_faults, 2);
    // The kind the attributes say (what the kernel does for these VMs).
    let t = mmu
        .fault(&mut vcpu, Gpa(0x5000), AccessKind::Write)
        .unwrap();
    assert_eq!(t.hpa, Pfn(PRIVATE_HOST + 5).hpa());
    let t = mmu
        .fault(&mut vcpu, Gpa(0x6000), AccessKind::Write)
        .unwrap();
    assert_eq!(t.hpa, Pfn(SHARED_HOST + 6).hpa());
}

#[test]
fn a_private_leaf_is_no_bigger_than_its_page_the_slot_and_the_uniform_range() {
    let file = FakeFile::new(9);
    let mmu = protected(VmType::SoftwareProtected, file.clone());
    let mut vcpu = mmu.new_vcpu_caches();
    mmu.set_memory_attributes(Gfn(0), Gfn(8 * MIB_PAGES), MemoryAttribute::Private)
        .unwrap();
    // 2 MiB pages, the 1 GiB range mixed (the rest of it is shared): 2M.
    let t = mmu
        .fault(&mut vcpu, Gpa(0x20_3000), AccessKind::Write)
        .unwrap();
    assert_eq!(
        (t.level, t.hpa),
        (Level::L2M, Pfn(PRIVATE_HOST + 0x203).hpa())
    );
    // A split page: 4K.
    file.split.lock().unwrap().push(2);
    let t = mmu
        .fault(&mut vcpu, Gpa(0x40_5000), AccessKind::Write)
        .unwrap();
    assert_eq!(
        (t.level, t.hpa),
        (Level::L4K, Pfn(PRIVATE_HOST + 0x405).hpa())
    );
    // One shared page inside a 2 MiB range makes it mixed: 4K leaves there,
    // and the huge leaf over it was zapped whole.
    let change = mmu
        .set_memory_attributes(Gfn(0x210), Gfn(0x211), MemoryAttribute::Shared)
        .unwrap();
    assert_eq!((change.frames, change.zapped, change.splits), (1, 1, 0));
    assert!(mmu.translate(Gpa(0x20_3000)).is_none());
    let t = mmu
        .fault(&mut vcpu, Gpa(0x20_3000), AccessKind::Read)
        .unwrap();
    assert_eq!(t.level, Level::L4K);
    let t = mmu
        .fault(&mut vcpu, Gpa(0x21_0000), AccessKind::Read)
        .unwrap();
    assert_eq!(
        (t.level, t.hpa),
        (Level::L4K, Pfn(SHARED_HOST + 0x210).hpa())
    );
    // Back to uniform: a software-protected VM maps huge again after a zap.
    mmu.set_memory_attributes(Gfn(0x200), Gfn(0x400), MemoryAttribute::Private)
        .unwrap();
    let t = mmu
        .fault(&mut vcpu, Gpa(0x20_3000), AccessKind::Read)
        .unwrap();
    assert_eq!(t.level, Level::L2M);
    checked_stats(&mmu);
}

#[test]
fn a_private_page_not_aligned_like_the_guest_frame_maps_4k() {
    #[derive(Debug)]
    struct Skewed;
    impl PrivateMemory for Skewed {
        fn get_pfn(&self, slot_page: u64) -> Result<PrivatePage, PrivateMemoryError> {
            Ok(PrivatePage {
                pfn: Pfn(PRIVATE_HOST + 1 + slot_page),
                order: 9,
            })
        }
    }
    let (_, mmu) = mmu(MmuConfig {
        vm_type: VmType::SoftwareProtected,
        ..MmuConfig::default()
    });
    mmu.add_memslot(
        Memslot::new(0, Gfn(0), 4 * MIB_PAGES, Pfn(SHARED_HOST))
            .unwrap()
            .with_private_memory(Arc::new(Skewed)),
    )
    .unwrap();
    mmu.set_memory_attributes(Gfn(0), Gfn(4 * MIB_PAGES), MemoryAttribute::Private)
        .unwrap();
    let mut vcpu = mmu.new_vcpu_caches();
    let t = mmu.fault(&mut vcpu, Gpa(0x1000), AccessKind::Read).unwrap();
    assert_eq!((t.level, t.hpa), (Level::L4K, Pfn(PRIVATE_HOST + 2).hpa()));
}

#[test]
fn private_memory_errors_and_missing_private_memory_are_reported() {
    let mmu = protected(VmType::SoftwareProtected, FakeFile::new(0));
    let (_, plain) = common::mmu(MmuConfig {
        vm_type: VmType::SoftwareProtected,
        ..MmuConfig::default()
    });
    plain
        .add_memslot(Memslot::new(0, Gfn(0), 16, Pfn(SHARED_HOST)).unwrap())
        .unwrap();
    plain
        .set_memory_attributes(Gfn(0), Gfn(16), MemoryAttribute::Private)
        .unwrap();
    let mut vcpu = plain.new_vcpu_caches();
    assert!(matches!(
        plain.fault(&mut vcpu, Gpa(0), AccessKind::Write),
        Err(MmuError::MemoryFault { private: true, .. })
    ));
    // The provider's error reaches the caller with the address.
    #[derive(Debug)]
    struct Broken;
    impl PrivateMemory for Broken {
        fn get_pfn(&self, _: u64) -> Result<PrivatePage, PrivateMemoryError> {
            Err("the file has no page there".into())
        }
    }
    mmu.add_memslot(
        Memslot::new(1, Gfn(64 * MIB_PAGES), 16, Pfn(SHARED_HOST))
            .unwrap()
            .with_private_memory(Arc::new(Broken)),
    )
    .unwrap();
    mmu.set_memory_attributes(
        Gfn(64 * MIB_PAGES),
        Gfn(64 * MIB_PAGES + 16),
        MemoryAttribute::Private,
    )
    .unwrap();
    let mut vcpu = mmu.new_vcpu_caches();
    let err = mmu
        .fault(&mut vcpu, Gfn(64 * MIB_PAGES + 3).gpa(), AccessKind::Read)
        .unwrap_err();
    assert!(matches!(err, MmuError::PrivateMemory { .. }));
    assert!(
        err.to_string().contains("the file has no page there"),
        "{err}"
    );
    assert!(matches!(
        mmu.set_memory_attributes(Gfn(3), Gfn(3), MemoryAttribute::Private),
        Err(MmuError::AttributeRange { .. })
    ));
}

#[test]
fn a_td_maps_shared_accesses_in_its_shared_tree_and_private_ones_in_the_main_tree() {
    let file = FakeFile::new(9);
    let mmu = protected(VmType::td(4), file);
    assert!(mmu.shared_root_hpa().is_some());
    let shared_bit = 1u64 << 47;
    let mut vcpu = mmu.new_vcpu_caches();
    // All shared at first: a private access exits.
    assert!(matches!(
        mmu.fault(&mut vcpu, Gpa(0x20_0000), AccessKind::Write),
        Err(MmuError::MemoryFault { private: true, .. })
    ));
    let t = mmu
        .fault(&mut vcpu, Gpa(shared_bit | 0x20_0000), AccessKind::Write)
        .unwrap();
    assert_eq!(
        (t.level, t.hpa),
        (Level::L2M, Pfn(SHARED_HOST + 0x200).hpa())
    );
    // Converting to private zaps the shared mapping.
    let change = mmu
        .set_memory_attributes(Gfn(0), Gfn(8 * MIB_PAGES), MemoryAttribute::Private)
        .unwrap();
    assert_eq!(change.zapped, 1);
    assert!(mmu.translate(Gpa(shared_bit | 0x20_0000)).is_none());
    let t = mmu
        .fault(&mut vcpu, Gpa(0x20_0000), AccessKind::Write)
        .unwrap();
    assert_eq!(
        (t.level, t.hpa),
        (Level::L2M, Pfn(PRIVATE_HOST + 0x200).hpa())
    );
    // A shared access to private memory exits.
    assert!(matches!(
        mmu.fault(&mut vcpu, Gpa(shared_bit | 0x20_0000), AccessKind::Read),
        Err(MmuError::MemoryFault { private: false, .. })
    ));
    // One 4 KiB page to shared: the 2M leaf is split, and only that page
    // leaves the main tree.
    let change = mmu
        .set_memory_attributes(Gfn(0x234), Gfn(0x235), MemoryAttribute::Shared)
        .unwrap();
    assert_eq!((change.splits, change.zapped, change.frames), (1, 1, 1));
    assert!(mmu.translate(Gpa(0x23_4000)).is_none());
    for page in (0x200..0x400u64).filter(|&p| p != 0x234) {
        let t = mmu.translate(Gfn(page).gpa()).expect("kept");
        assert_eq!(
            (t.level, t.hpa),
            (Level::L4K, Pfn(PRIVATE_HOST + page).hpa())
        );
    }
    let t = mmu
        .fault(&mut vcpu, Gpa(shared_bit | 0x23_4000), AccessKind::Write)
        .unwrap();
    assert_eq!(
        (t.level, t.hpa),
        (Level::L4K, Pfn(SHARED_HOST + 0x234).hpa())
    );
    // And back: no promotion for a TD; the page is private again at 4K.
    mmu.set_memory_attributes(Gfn(0x234), Gfn(0x235), MemoryAttribute::Private)
        .unwrap();
    assert!(mmu.translate(Gpa(shared_bit | 0x23_4000)).is_none());
    let t = mmu
        .fault(&mut vcpu, Gpa(0x23_4000), AccessKind::Write)
        .unwrap();
    assert_eq!(t.level, Level::L4K);
    assert_eq!(checked_stats(&mmu).pages_4k, 512);
    // Teardown takes both trees back.
    let report = mmu.teardown().unwrap();
    assert_eq!(report.leaves, 512);
    assert_eq!(mmu.live_tables(), 0);
}

#[test]
fn a_tds_shared_bit_must_be_the_top_gpa_bit() {
    let pool = mmu_cache::PagePool::new(mmu_cache::alloc::ChunkAllocator::anonymous());
    let err = split::TdpMmu::new(
        pool,
        MmuConfig {
            vm_type: VmType::Td { shared_bit: 40 },
            ..MmuConfig::default()
        },
    )
    .unwrap_err();
    assert!(matches!(
        err,
        MmuError::SharedBit {
            shared_bit: 40,
            expected: 47,
            levels: 4
        }
    ));
    assert_eq!(VmType::td(5), VmType::Td { shared_bit: 51 });
}

#[test]
fn faults_racing_conversions_never_leave_a_mapping_of_the_wrong_kind() {
    let file = FakeFile::new(9);
    let mmu = Arc::new(protected(VmType::SoftwareProtected, file));
    let stop = Arc::new(AtomicBool::new(false));
    let span = 4 * MIB_PAGES;
    let faulters: Vec<_> = (0..2u64)
        .map(|t| {
            let (mmu, stop) = (mmu.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut vcpu = mmu.new_vcpu_caches();
                let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ t;
                let mut exits = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let gfn = seed % span;
                    match mmu.fault(&mut vcpu, Gfn(gfn).gpa(), AccessKind::data(seed & 1 == 0)) {
                        Ok(_) => {}
                        // The attribute changed between the look and the fault.
                        Err(MmuError::MemoryFault { .. }) => exits += 1,
                        Err(other) => panic!("{other}"),
                    }
                }
                exits
            })
        })
        .collect();
    let mut seed = 0x1234_5678_9abc_def1u64;
    let mut round = 0u64;
    // Enough faults and conversions to interleave, whatever the scheduler.
    while round < 300 || (mmu.counters().faults < 20_000 && round < 200_000) {
        round += 1;
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let start = seed % span;
        let len = if round.is_multiple_of(3) {
            512
        } else {
            1 + (seed >> 32) % 40
        };
        let end = (start + len).min(span);
        let attribute = if seed & 1 == 0 {
            MemoryAttribute::Private
        } else {
            MemoryAttribute::Shared
        };
        mmu.set_memory_attributes(Gfn(start), Gfn(end), attribute)
            .unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for faulter in faulters {
        faulter.join().unwrap();
    }
    // Every mapping left agrees with the attribute of its frame.
    let attributes = mmu.memory_attributes();
    for gfn in 0..span {
        let Some(t) = mmu.translate(Gfn(gfn).gpa()) else {
            continue;
        };
        let expected = match attributes.get(Gfn(gfn)) {
            MemoryAttribute::Private => Pfn(PRIVATE_HOST + gfn).hpa(),
            MemoryAttribute::Shared => Pfn(SHARED_HOST + gfn).hpa(),
        };
        assert_eq!(t.hpa, expected, "gfn {gfn:#x}");
        if t.level > Level::L4K {
            let pages = t.level.entry_pages();
            let start = Gfn(gfn).align_down(pages);
            assert!(
                attributes.uniform(start, start + pages).is_some(),
                "a {:?} leaf over mixed memory at {gfn:#x}",
                t.level
            );
        }
    }
    checked_stats(&mmu);
}

#[test]
fn a_failing_step_after_the_zap_leaves_the_attributes_as_they_were() {
    let mmu = protected(VmType::SoftwareProtected, FakeFile::new(9));
    let mut vcpu = mmu.new_vcpu_caches();
    mmu.fault(&mut vcpu, Gpa(0x4000), AccessKind::Write)
        .unwrap();
    let err = mmu
        .set_memory_attributes_with(Gfn(4), Gfn(5), MemoryAttribute::Private, || {
            Err("the file could not convert".into())
        })
        .unwrap_err();
    assert!(matches!(err, MmuError::PrivateMemory { .. }), "{err}");
    assert_eq!(mmu.memory_attribute(Gfn(4)), MemoryAttribute::Shared);
    assert_eq!(mmu.counters().conversions, 0);
    // The zapped mapping faults back in as it was.
    assert!(mmu.translate(Gpa(0x4000)).is_none());
    let t = mmu
        .fault(&mut vcpu, Gpa(0x4000), AccessKind::Write)
        .unwrap();
    assert_eq!(t.hpa, Pfn(SHARED_HOST + 4).hpa());
}

/// On a TD the exit's address has no shared bit: `kvm_mmu_do_page_fault()`
/// strips it from the fault's gfn, and the exit reports
/// `gfn_to_gpa(fault->gfn)`. A shared access at `shared_bit | 0x3abc` to a
/// private page reports 0x3000 (bit 47: the top GPA bit of 4 levels).
#[test]
fn a_tds_memory_fault_reports_the_page_without_the_shared_bit() {
    let shared_bit = 47;
    let mmu = protected(VmType::Td { shared_bit }, FakeFile::new(9));
    let mut vcpu = mmu.new_vcpu_caches();
    mmu.set_memory_attributes(Gfn(3), Gfn(4), MemoryAttribute::Private)
        .unwrap();
    mmu.set_memory_attributes(Gfn(7), Gfn(8), MemoryAttribute::Shared)
        .unwrap();
    let shared_access = Gpa((1 << shared_bit) | 0x3abc);
    let err = mmu
        .fault(&mut vcpu, shared_access, AccessKind::Read)
        .unwrap_err();
    assert!(
        matches!(
            err,
            MmuError::MemoryFault {
                gpa: Gpa(0x3000),
                size: 4096,
                private: false
            }
        ),
        "{err}"
    );
    // A private access (no shared bit) to a shared page: the page too.
    let err = mmu
        .fault(&mut vcpu, Gpa(0x7ff8), AccessKind::Write)
        .unwrap_err();
    assert!(
        matches!(
            err,
            MmuError::MemoryFault {
                gpa: Gpa(0x7000),
                private: true,
                ..
            }
        ),
        "{err}"
    );
}

/// A private fault on a frame no memslot holds (the slot was deleted) is a
/// memory-fault exit with the private flag, not an MMIO (no-slot) fault:
/// `kvm_mmu_faultin_pfn()` checks the access against the attribute before
/// it looks for the slot, and `kvm_handle_noslot_fault()` sends a private
/// fault to userspace with `kvm_mmu_prepare_memory_fault_exit()` (selftest
/// `private_mem_kvm_exits_test`: `test_private_access_memslot_deleted`). A
/// shared fault there is a no-slot fault unless the frame is private.
#[test]
fn a_private_fault_after_the_slot_is_deleted_exits_to_userspace_private() {
    let mmu = protected(VmType::SoftwareProtected, FakeFile::new(9));
    let mut vcpu = mmu.new_vcpu_caches();
    mmu.set_memory_attributes(Gfn(0x10), Gfn(0x20), MemoryAttribute::Private)
        .unwrap();
    mmu.fault(&mut vcpu, Gpa(0x10_000), AccessKind::Write)
        .expect("a private fault inside the slot maps");
    mmu.remove_memslot(0).unwrap();
    let before = mmu.counters().memory_faults;
    // Private (the attribute says so, as the selftest's guest does).
    let err = mmu
        .fault(&mut vcpu, Gpa(0x10_123), AccessKind::Write)
        .unwrap_err();
    assert!(
        matches!(
            err,
            MmuError::MemoryFault {
                gpa: Gpa(0x10_000),
                size: 4096,
                private: true
            }
        ),
        "{err}"
    );
    // Flagged private by the hardware on a shared frame: the mismatch.
    let err = mmu
        .fault_as(
            &mut vcpu,
            Gpa(0x30_000),
            AccessKind::Read,
            MemoryAttribute::Private,
        )
        .unwrap_err();
    assert!(
        matches!(err, MmuError::MemoryFault { private: true, .. }),
        "{err}"
    );
    // Shared to a private frame: the mismatch, not private.
    let err = mmu
        .fault_as(
            &mut vcpu,
            Gpa(0x11_000),
            AccessKind::Read,
            MemoryAttribute::Shared,
        )
        .unwrap_err();
    assert!(
        matches!(err, MmuError::MemoryFault { private: false, .. }),
        "{err}"
    );
    assert_eq!(mmu.counters().memory_faults, before + 3);
    // Shared to a shared frame: emulated MMIO.
    let err = mmu
        .fault(&mut vcpu, Gpa(0x30_000), AccessKind::Read)
        .unwrap_err();
    assert!(matches!(err, MmuError::NoSlot { .. }), "{err}");
}

/// Setting attributes a range already has changes nothing:
/// `kvm_vm_set_mem_attributes()` returns before it zaps when
/// `kvm_range_has_memory_attributes()` says the whole range has them. The
/// private mappings stay, and no conversion is counted.
#[test]
fn setting_the_attributes_a_range_already_has_zaps_nothing() {
    let mmu = protected(VmType::SoftwareProtected, FakeFile::new(0));
    let mut vcpu = mmu.new_vcpu_caches();
    mmu.set_memory_attributes(Gfn(0), Gfn(16), MemoryAttribute::Private)
        .unwrap();
    for page in 0..16 {
        mmu.fault(&mut vcpu, Gfn(page).gpa(), AccessKind::Write)
            .unwrap();
    }
    let conversions = mmu.counters().conversions;
    let leaves = mmu.page_stats();
    let change = mmu
        .set_memory_attributes(Gfn(4), Gfn(12), MemoryAttribute::Private)
        .unwrap();
    assert_eq!(change, split::AttributeChange::default());
    assert_eq!(mmu.counters().conversions, conversions);
    assert_eq!(mmu.page_stats(), leaves);
    for page in 0..16 {
        assert!(mmu.translate(Gfn(page).gpa()).is_some(), "page {page}");
    }
    // The VMM's step between the zap and the recording does not run either.
    let ran = AtomicBool::new(false);
    mmu.set_memory_attributes_with(Gfn(0), Gfn(16), MemoryAttribute::Private, || {
        ran.store(true, Ordering::Relaxed);
        Ok(())
    })
    .unwrap();
    assert!(!ran.load(Ordering::Relaxed));
    // A range that is only partly private converts (and zaps) as before.
    let change = mmu
        .set_memory_attributes(Gfn(8), Gfn(24), MemoryAttribute::Private)
        .unwrap();
    assert_eq!(change.frames, 8);
    assert!(change.zapped > 0 || mmu.translate(Gfn(8).gpa()).is_some());
}

/// On a VM with no private memory the supported mask is 0
/// (`kvm_supported_mem_attributes()`), and
/// `kvm_vm_ioctl_set_mem_attributes()` refuses only bits outside it: the
/// attributes 0 (shared) succeed and change nothing; the private bit is
/// EINVAL. The range is still checked.
#[test]
fn a_vm_with_no_private_memory_takes_attributes_zero_as_a_no_op() {
    let (_, mmu) = mmu(MmuConfig::default());
    mmu.add_memslot(Memslot::new(0, Gfn(0), 1024, Pfn(SHARED_HOST)).unwrap())
        .unwrap();
    let mut vcpu = mmu.new_vcpu_caches();
    mmu.fault(&mut vcpu, Gpa(0x2000), AccessKind::Write)
        .unwrap();
    let change = mmu
        .set_memory_attributes(Gfn(0), Gfn(1024), MemoryAttribute::Shared)
        .unwrap();
    assert_eq!(change, split::AttributeChange::default());
    assert!(mmu.translate(Gpa(0x2000)).is_some(), "nothing was zapped");
    assert!(matches!(
        mmu.set_memory_attributes(Gfn(0), Gfn(1), MemoryAttribute::Private),
        Err(MmuError::NoPrivateMemory { .. })
    ));
    assert!(matches!(
        mmu.set_memory_attributes(Gfn(4), Gfn(4), MemoryAttribute::Shared),
        Err(MmuError::AttributeRange { .. })
    ));
}

/// Once a range is uniform again, the next fault with a 2 MiB goal puts the
/// 2 MiB leaf over the 4 KiB table the conversion left, and the table goes:
/// `kvm_tdp_mmu_map()` stops at the goal level and
/// `tdp_mmu_map_handle_target_level()` replaces whatever is there, a
/// non-leaf SPTE included (whose child table `handle_removed_pt()` frees).
/// The TDX huge-page series adds "Disallow page merging for the mirror
/// root" because direct roots do merge: on a TD only the mirror keeps its
/// table.
#[test]
fn a_fault_on_a_uniform_range_puts_the_huge_leaf_over_the_old_table() {
    let mmu = protected(VmType::SoftwareProtected, FakeFile::new(9));
    let mut vcpu = mmu.new_vcpu_caches();
    let region = Gfn(0x200);
    mmu.fault(&mut vcpu, region.gpa(), AccessKind::Write)
        .unwrap();
    assert_eq!(mmu.translate(region.gpa()).unwrap().level, Level::L2M);
    // One page private: the huge leaf goes, and shared faults map 4K.
    mmu.set_memory_attributes(region + 1, region + 2, MemoryAttribute::Private)
        .unwrap();
    for page in [0, 2, 3, 100] {
        let t = mmu
            .fault(&mut vcpu, (region + page).gpa(), AccessKind::Write)
            .unwrap();
        assert_eq!(t.level, Level::L4K);
    }
    let t = mmu
        .fault(&mut vcpu, (region + 1).gpa(), AccessKind::Write)
        .unwrap();
    assert_eq!(
        (t.level, t.hpa),
        (Level::L4K, Pfn(PRIVATE_HOST + 0x201).hpa())
    );
    let before = checked_stats(&mmu);
    assert_eq!((before.pages_4k, before.pages_2m), (5, 0));
    let tables = mmu.live_tables();
    // Uniform again: the conversion zaps only the private page.
    mmu.set_memory_attributes(region + 1, region + 2, MemoryAttribute::Shared)
        .unwrap();
    assert_eq!(checked_stats(&mmu).pages_4k, 4);
    // A fault anywhere in the region maps 2M over the table.
    let t = mmu
        .fault(&mut vcpu, (region + 7).gpa(), AccessKind::Read)
        .unwrap();
    assert_eq!(t.level, Level::L2M);
    assert_eq!(t.hpa, Pfn(SHARED_HOST + 0x207).hpa());
    assert_eq!(mmu.counters().merges, 1);
    let after = checked_stats(&mmu);
    assert_eq!((after.pages_4k, after.pages_2m), (0, 1));
    assert_eq!(mmu.live_tables(), tables - 1, "the 4K table is freed");
    for page in [0, 2, 3, 100, 511] {
        assert_eq!(
            mmu.translate((region + page).gpa()).unwrap().level,
            Level::L2M
        );
    }
}

#[test]
fn a_tds_mirror_keeps_its_table_and_its_shared_tree_merges() {
    let shared_bit = 47;
    let mmu = protected(VmType::Td { shared_bit }, FakeFile::new(9));
    let mut vcpu = mmu.new_vcpu_caches();
    let region = Gfn(0x400);
    mmu.set_memory_attributes(region, region + 512, MemoryAttribute::Private)
        .unwrap();
    mmu.set_memory_attributes(region + 5, region + 6, MemoryAttribute::Shared)
        .unwrap();
    // Mixed: private 4K leaves in the mirror, a shared 4K leaf in the
    // shared tree.
    for page in [0, 1, 2] {
        let t = mmu
            .fault(&mut vcpu, (region + page).gpa(), AccessKind::Write)
            .unwrap();
        assert_eq!(t.level, Level::L4K);
    }
    let shared = |gfn: Gfn| Gpa((1 << shared_bit) | gfn.gpa().0);
    let t = mmu
        .fault(&mut vcpu, shared(region + 5), AccessKind::Write)
        .unwrap();
    assert_eq!(t.level, Level::L4K);
    // Uniform private: the mirror does not merge, it maps 4K in its table.
    mmu.set_memory_attributes(region + 5, region + 6, MemoryAttribute::Private)
        .unwrap();
    let t = mmu
        .fault(&mut vcpu, (region + 9).gpa(), AccessKind::Write)
        .unwrap();
    assert_eq!(t.level, Level::L4K);
    assert_eq!(mmu.counters().merges, 0);
    // The shared tree: the range uniform shared again after a mixed spell.
    let low = Gfn(0x800);
    mmu.set_memory_attributes(low, low + 512, MemoryAttribute::Shared)
        .unwrap();
    mmu.set_memory_attributes(low + 3, low + 4, MemoryAttribute::Private)
        .unwrap();
    let t = mmu
        .fault(&mut vcpu, shared(low), AccessKind::Write)
        .unwrap();
    assert_eq!(t.level, Level::L4K);
    mmu.set_memory_attributes(low + 3, low + 4, MemoryAttribute::Shared)
        .unwrap();
    let t = mmu
        .fault(&mut vcpu, shared(low + 8), AccessKind::Write)
        .unwrap();
    assert_eq!(t.level, Level::L2M);
    assert_eq!(mmu.counters().merges, 1);
    checked_stats(&mmu);
}

/// Faults racing each other over a table that one of them replaces with a
/// huge leaf: vCPU threads fault and access pages of two 2 MiB regions
/// while the main thread makes one page private and shared again, over
/// and over. Every fault maps the right frame, and afterwards the stats
/// equal a recount, the table map holds just the linked tables, and every
/// table retired by a merge went back to the pool.
#[test]
fn faults_racing_a_merge_map_the_right_frames_and_leave_no_table_behind() {
    let mmu = Arc::new(protected(VmType::SoftwareProtected, FakeFile::new(9)));
    let stop = Arc::new(AtomicBool::new(false));
    let faulted = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..3u64)
        .map(|t| {
            let (mmu, stop, faulted) = (mmu.clone(), stop.clone(), faulted.clone());
            std::thread::spawn(move || {
                let mut vcpu = mmu.new_vcpu_caches();
                let mut seed = 0x2545_f491_4f6c_dd1du64.wrapping_mul(t + 1);
                while !stop.load(Ordering::Relaxed) {
                    faulted.fetch_add(1, Ordering::Relaxed);
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let gfn = seed % 1024;
                    match mmu.fault(&mut vcpu, Gfn(gfn).gpa(), AccessKind::data(seed & 1 == 0)) {
                        Ok(t) => {
                            let host = match mmu.memory_attribute(Gfn(gfn)) {
                                MemoryAttribute::Private => PRIVATE_HOST,
                                MemoryAttribute::Shared => SHARED_HOST,
                            };
                            // The attribute may have moved since; a shared
                            // frame is always the slot's own.
                            if host == SHARED_HOST && t.hpa.pfn() != Pfn(PRIVATE_HOST + gfn) {
                                assert_eq!(t.hpa.pfn(), Pfn(SHARED_HOST + gfn));
                            }
                        }
                        Err(MmuError::MemoryFault { .. }) => {}
                        Err(other) => panic!("{other}"),
                    }
                }
            })
        })
        .collect();
    // Enough rounds, and enough faults among them, whatever the scheduler.
    let mut round = 0u64;
    while round < 300 || faulted.load(Ordering::Relaxed) < 10_000 {
        round += 1;
        let page = Gfn(5 + (round % 2) * 512);
        mmu.set_memory_attributes(page, page + 1, MemoryAttribute::Private)
            .unwrap();
        mmu.set_memory_attributes(page, page + 1, MemoryAttribute::Shared)
            .unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for thread in threads {
        thread.join().unwrap();
    }
    eprintln!(
        "{round} conversion rounds, {} faults, {} merges among them",
        faulted.load(Ordering::Relaxed),
        mmu.counters().merges
    );
    // Each region gets a 4K table while mixed; uniform again, the next
    // fault there puts the 2M leaf over it.
    let mut vcpu = mmu.new_vcpu_caches();
    for region in [0u64, 512] {
        let page = Gfn(region + 5);
        mmu.set_memory_attributes(page, page + 1, MemoryAttribute::Private)
            .unwrap();
        let t = mmu
            .fault(&mut vcpu, Gfn(region + 7).gpa(), AccessKind::Write)
            .unwrap();
        assert_eq!(t.level, Level::L4K);
        mmu.set_memory_attributes(page, page + 1, MemoryAttribute::Shared)
            .unwrap();
        let merges = mmu.counters().merges;
        let t = mmu
            .fault(&mut vcpu, Gfn(region + 9).gpa(), AccessKind::Write)
            .unwrap();
        assert_eq!(t.level, Level::L2M);
        assert_eq!(t.hpa, Pfn(SHARED_HOST + region + 9).hpa());
        assert_eq!(mmu.counters().merges, merges + 1);
    }
    let stats = checked_stats(&mmu);
    assert_eq!((stats.pages_4k, stats.pages_2m), (0, 2));
    // Linked: the 1G-level table and the 2M-level table under the root.
    assert_eq!(mmu.live_tables(), 2);
    let counters = mmu.counters();
    assert_eq!(
        counters.tables_linked - counters.tables_freed,
        2,
        "every retired table was freed"
    );
}
