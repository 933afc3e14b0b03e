//! Conversions through every crate: the MMU's attributes and trees, the
//! TDX module's S-EPT and PAMT, and the guest memory file's huge pages
//! move together.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use gmem::{Backend, Capability, HostCaps};
use mmu_cache::alloc::FailPolicy;
use mmukit_tests::{Td, TdOptions};
use split::AccessKind;
use split::{Gfn, Gpa, Level, MemoryAttribute, MmuError, VcpuCaches};
use tdx_ext::Seamcall;

const MIB2_PAGES: u64 = 512;

/// A TD over a HugeTLB file of `huge_pages` 2 MiB pages, or `None` (with
/// the reason printed) where the host has too few free.
fn hugetlb_td(huge_pages: u64, software_protected: bool) -> Option<Td> {
    // The test harness names each test's thread after the test.
    let test = std::thread::current()
        .name()
        .unwrap_or("conversion")
        .to_string();
    if !gmem::caps::hugetlb_pages_free(&test, 2 << 20, huge_pages) {
        return None;
    }
    let options = TdOptions::hugetlb_2m(huge_pages << 21);
    let options = if software_protected {
        options.software_protected()
    } else {
        options
    };
    Some(Td::new(options).expect("td"))
}

fn pattern(gfn: u64) -> u64 {
    0x5eed_0000_0000_0000 | gfn
}

/// Writes the pattern into the first word of every page of `[start, end)`.
fn write_pattern(td: &Td, vcpu: &mut VcpuCaches, start: u64, end: u64) {
    for gfn in start..end {
        td.write_u64(vcpu, Gfn(gfn).gpa(), pattern(gfn)).unwrap();
    }
}

fn assert_pattern(td: &Td, vcpu: &mut VcpuCaches, start: u64, end: u64, skip: &[u64]) {
    for gfn in (start..end).filter(|g| !skip.contains(g)) {
        assert_eq!(
            td.read_u64(vcpu, Gfn(gfn).gpa()).unwrap(),
            pattern(gfn),
            "gfn {gfn:#x}"
        );
    }
}

#[test]
fn a_td_over_hugetlb_maps_2m_private_leaves_demotes_on_a_4k_conversion_and_keeps_data() {
    let Some(td) = hugetlb_td(4, false) else {
        return;
    };
    let module = td.module.clone().unwrap();
    let mmu = td.mmu();
    let mut vcpu = mmu.new_vcpu_caches();
    let report = td
        .vm
        .convert(Gfn(0), Gfn(4 * MIB2_PAGES), MemoryAttribute::Private)
        .unwrap();
    assert_eq!(report.mmu.frames, 4 * MIB2_PAGES);
    assert_eq!((report.file_splits, report.file_merges), (0, 0));
    write_pattern(&td, &mut vcpu, 0, MIB2_PAGES);
    // One fault, one 2M leaf, in the mirror and in the module's S-EPT.
    assert_eq!(mmu.translate(Gpa(0x1000)).unwrap().level, Level::L2M);
    assert_eq!(module.leaves().len(), 1);
    assert!(module.leaves().keys().all(|&(level, _)| level == 2));
    let pamt_before = module.pamt_regions();

    // One 4 KiB page inside it goes shared: DEMOTE (with the range's 4K
    // PAMT pair), one page removed, the file's huge page split.
    let converted = 0x5u64;
    let report = td
        .vm
        .convert(Gfn(converted), Gfn(converted + 1), MemoryAttribute::Shared)
        .unwrap();
    assert_eq!(report.mmu.splits, 1, "{report:?}");
    assert_eq!(report.mmu.zapped, 1);
    assert_eq!(report.file_splits, 1);
    assert_eq!(module.calls(Seamcall::MemPageDemote), 1);
    assert_eq!(module.calls(Seamcall::MemPageRemove), 1);
    assert_eq!(module.pamt_regions(), pamt_before + 1, "DEMOTE's 4K PAMT");
    assert_eq!(module.leaves().len(), 511);
    assert!(module.leaves().keys().all(|&(level, _)| level == 1));
    assert_eq!(td.file.split_huge_pages(), vec![0]);
    // The other 511 pages kept their data through the demote and the split.
    assert_pattern(&td, &mut vcpu, 0, MIB2_PAGES, &[converted]);
    assert_eq!(mmu.counters().faults, 1, "no page faulted back in");

    // The shared page is the host's memory.
    td.write_u64(&mut vcpu, td.shared_gpa(Gfn(converted)), 0xabcd)
        .unwrap();
    let mut word = [0u8; 8];
    td.shared.read_at(converted * 4096, &mut word).unwrap();
    assert_eq!(u64::from_ne_bytes(word), 0xabcd);
    // A private access to it exits to the VMM.
    assert!(matches!(
        td.read_u64(&mut vcpu, Gfn(converted).gpa()),
        Err(MmuError::MemoryFault { private: true, .. })
    ));

    // Back to private: the file merges; the TD maps it again at 4K (no
    // promotion), and it reads as the guest writes it.
    let report = td
        .vm
        .convert(Gfn(converted), Gfn(converted + 1), MemoryAttribute::Private)
        .unwrap();
    assert_eq!(report.file_merges, 1);
    assert!(td.file.split_huge_pages().is_empty());
    td.write_u64(&mut vcpu, Gfn(converted).gpa(), pattern(converted))
        .unwrap();
    assert_eq!(
        mmu.translate(Gfn(converted).gpa()).unwrap().level,
        Level::L4K
    );
    assert_pattern(&td, &mut vcpu, 0, MIB2_PAGES, &[]);
    assert_eq!(module.leaves().len(), 512);

    // A whole 2 MiB page round trip: no split, no demote.
    write_pattern(&td, &mut vcpu, MIB2_PAGES, 2 * MIB2_PAGES);
    let report = td
        .vm
        .convert(
            Gfn(MIB2_PAGES),
            Gfn(2 * MIB2_PAGES),
            MemoryAttribute::Shared,
        )
        .unwrap();
    assert_eq!((report.mmu.splits, report.file_splits), (0, 0));
    assert_eq!(module.calls(Seamcall::MemPageDemote), 1);
    td.vm
        .convert(
            Gfn(MIB2_PAGES),
            Gfn(2 * MIB2_PAGES),
            MemoryAttribute::Private,
        )
        .unwrap();
    let t = mmu
        .fault(&mut vcpu, Gfn(MIB2_PAGES).gpa(), AccessKind::Read)
        .unwrap();
    assert_eq!(t.level, Level::L2M);
    drop(vcpu);
    mmu.teardown().unwrap();
}

#[test]
fn a_software_protected_vm_maps_huge_again_after_converting_back() {
    let Some(td) = hugetlb_td(2, true) else {
        return;
    };
    let mmu = td.mmu();
    let mut vcpu = mmu.new_vcpu_caches();
    td.vm
        .convert(Gfn(0), Gfn(2 * MIB2_PAGES), MemoryAttribute::Private)
        .unwrap();
    write_pattern(&td, &mut vcpu, 0, MIB2_PAGES);
    assert_eq!(mmu.translate(Gpa(0)).unwrap().level, Level::L2M);
    let report = td
        .vm
        .convert(Gfn(9), Gfn(10), MemoryAttribute::Shared)
        .unwrap();
    // One tree: the 2M leaf goes whole, nothing to demote.
    assert_eq!((report.mmu.splits, report.mmu.zapped), (0, 1));
    assert_eq!(report.file_splits, 1);
    assert_pattern(&td, &mut vcpu, 0, MIB2_PAGES, &[9]);
    assert_eq!(mmu.translate(Gpa(0)).unwrap().level, Level::L4K);
    // Shared at the frame's own address on this VM.
    td.write_u64(&mut vcpu, td.shared_gpa(Gfn(9)), 1).unwrap();
    let report = td
        .vm
        .convert(Gfn(9), Gfn(10), MemoryAttribute::Private)
        .unwrap();
    assert_eq!(report.file_merges, 1);
    td.write_u64(&mut vcpu, Gfn(9).gpa(), pattern(9)).unwrap();
    // The 4K leaves of the range went with the conversion's zap only where
    // they overlapped it; zap the rest and the range maps huge again.
    mmu.zap_range(Gfn(0), Gfn(MIB2_PAGES)).unwrap();
    assert_pattern(&td, &mut vcpu, 0, MIB2_PAGES, &[]);
    assert_eq!(mmu.translate(Gpa(0)).unwrap().level, Level::L2M);
}

#[test]
fn conversions_race_vcpu_accesses_on_other_pages_without_losing_data() {
    let td = match hugetlb_td(4, false) {
        Some(td) => td,
        None => Td::new(TdOptions::memfd(4 << 21)).unwrap(),
    };
    let td = Arc::new(td);
    td.vm
        .convert(Gfn(0), Gfn(4 * MIB2_PAGES), MemoryAttribute::Private)
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // Two vCPUs, each in its own 2 MiB page, writing and checking.
    let vcpus: Vec<_> = (0..2u64)
        .map(|v| {
            let (td, stop) = (td.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut vcpu = td.mmu().new_vcpu_caches();
                let (start, end) = (v * MIB2_PAGES, (v + 1) * MIB2_PAGES);
                let mut round = 0u64;
                while !stop.load(Ordering::Relaxed) || round < 3 {
                    for gfn in (start..end).step_by(7) {
                        let value = pattern(gfn) ^ round;
                        td.write_u64(&mut vcpu, Gfn(gfn).gpa(), value).unwrap();
                        assert_eq!(td.read_u64(&mut vcpu, Gfn(gfn).gpa()).unwrap(), value);
                    }
                    round += 1;
                }
                round
            })
        })
        .collect();
    // Meanwhile the VMM converts 4K pages inside the third huge page and
    // the whole fourth, back and forth.
    let mut vcpu = td.mmu().new_vcpu_caches();
    for round in 0..40u64 {
        let page = 2 * MIB2_PAGES + (round * 37) % MIB2_PAGES;
        td.vm
            .convert(Gfn(page), Gfn(page + 1), MemoryAttribute::Shared)
            .unwrap();
        td.write_u64(&mut vcpu, td.shared_gpa(Gfn(page)), round)
            .unwrap();
        td.vm
            .convert(Gfn(page), Gfn(page + 1), MemoryAttribute::Private)
            .unwrap();
        td.write_u64(&mut vcpu, Gfn(page).gpa(), round).unwrap();
        assert_eq!(td.read_u64(&mut vcpu, Gfn(page).gpa()).unwrap(), round);
        let (s, e) = (3 * MIB2_PAGES, 4 * MIB2_PAGES);
        td.vm
            .convert(Gfn(s), Gfn(e), MemoryAttribute::Shared)
            .unwrap();
        td.vm
            .convert(Gfn(s), Gfn(e), MemoryAttribute::Private)
            .unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for vcpu in vcpus {
        assert!(vcpu.join().unwrap() >= 3);
    }
    let (recount, _) = td.mmu().recount();
    assert_eq!(recount, td.mmu().page_stats());
}

#[test]
fn failures_in_the_mmu_and_td_caches_leak_nothing_across_conversions() {
    for k in [3u64, 5, 8] {
        let td = Td::new(TdOptions::memfd(4 << 21)).unwrap();
        let mmu = td.mmu();
        td.vm
            .convert(Gfn(0), Gfn(4 * MIB2_PAGES), MemoryAttribute::Private)
            .unwrap();
        let mut vcpu = mmu.new_vcpu_caches();
        for alloc in [&td.mmu_alloc, &td.table_alloc, &td.pamt_alloc] {
            alloc.inner().set_policy(FailPolicy::EveryKth(k));
        }
        let mut failures = 0;
        for round in 0..60u64 {
            let gfn = (round * 97) % (4 * MIB2_PAGES);
            if td.write_u64(&mut vcpu, Gfn(gfn).gpa(), round).is_err() {
                failures += 1;
            }
            let attribute = if round % 2 == 0 {
                MemoryAttribute::Shared
            } else {
                MemoryAttribute::Private
            };
            let page = (round * 13) % (4 * MIB2_PAGES);
            if td.vm.convert(Gfn(page), Gfn(page + 1), attribute).is_err() {
                failures += 1;
            }
        }
        assert!(failures > 0, "k={k}: the allocators never failed");
        for alloc in [&td.mmu_alloc, &td.table_alloc, &td.pamt_alloc] {
            alloc.inner().set_policy(FailPolicy::Never);
        }
        // Whatever failed, the trees still agree with their counts, and
        // every page comes back.
        let (recount, _) = mmu.recount();
        assert_eq!(recount, mmu.page_stats(), "k={k}");
        vcpu.free_all();
        drop(vcpu);
        mmu.teardown().unwrap();
        let (mmu_alloc, table_alloc, pamt_alloc) = (
            td.mmu_alloc.clone(),
            td.table_alloc.clone(),
            td.pamt_alloc.clone(),
        );
        drop(td);
        use mmu_cache::alloc::PageAllocator;
        assert_eq!(mmu_alloc.pages_outstanding(), 0, "k={k}: MMU pages");
        assert_eq!(table_alloc.pages_outstanding(), 0, "k={k}: S-EPT pages");
        assert_eq!(pamt_alloc.pages_outstanding(), 0, "k={k}: PAMT pages");
    }
}

#[test]
fn every_backend_serves_a_tds_private_memory() {
    for (backend, needs) in [
        (Backend::Memfd, &[][..]),
        (Backend::Anonymous, &[][..]),
        (Backend::Secret, &[Capability::MemfdSecret][..]),
    ] {
        let name = backend.kind().name();
        let test = format!("every_backend_serves_a_tds_private_memory ({name})");
        if !HostCaps::get().allows(&test, needs) {
            continue;
        }
        let td = Td::new(TdOptions {
            backend,
            ..TdOptions::memfd(2 << 21)
        })
        .unwrap();
        td.vm
            .convert(Gfn(0), Gfn(2 * MIB2_PAGES), MemoryAttribute::Private)
            .unwrap();
        let mut vcpu = td.mmu().new_vcpu_caches();
        write_pattern(&td, &mut vcpu, 0, 64);
        td.vm
            .convert(Gfn(3), Gfn(4), MemoryAttribute::Shared)
            .unwrap();
        assert_pattern(&td, &mut vcpu, 0, 64, &[3]);
        // 4 KiB pages: every private leaf is 4K.
        assert_eq!(
            td.mmu().translate(Gpa(0)).unwrap().level,
            Level::L4K,
            "{name}"
        );
    }
}

#[test]
fn a_file_that_refuses_a_conversion_leaves_the_mmu_attributes_and_pages_as_they_were() {
    // A guest_memfd created private cannot be converted in place by this
    // kernel: the file's step fails after the MMU zapped.
    if !HostCaps::get().allows(
        "a_file_that_refuses_a_conversion_leaves_the_mmu_attributes_and_pages_as_they_were",
        &[Capability::Kvm, Capability::GuestMemfdMmap],
    ) {
        return;
    }
    let td = Td::new(TdOptions {
        backend: Backend::Kvm(gmem::KvmVm::new().unwrap()),
        ..TdOptions::memfd(2 << 21)
    })
    .unwrap();
    let mmu = td.mmu();
    td.vm
        .convert(Gfn(0), Gfn(2 * MIB2_PAGES), MemoryAttribute::Private)
        .unwrap();
    let mut vcpu = mmu.new_vcpu_caches();
    // Faults map the file's frames (nothing touches them: the kernel
    // holds them private).
    for gfn in 0..8 {
        mmu.fault(&mut vcpu, Gfn(gfn).gpa(), AccessKind::Write)
            .unwrap();
    }
    let err = td
        .vm
        .convert(Gfn(3), Gfn(4), MemoryAttribute::Shared)
        .unwrap_err();
    assert!(err.to_string().contains("shared"), "{err}");
    assert_eq!(mmu.memory_attribute(Gfn(3)), MemoryAttribute::Private);
    assert!(
        mmu.translate(Gfn(3).gpa()).is_none(),
        "zapped before the file refused"
    );
    // The page faults back in as private.
    mmu.fault(&mut vcpu, Gfn(3).gpa(), AccessKind::Write)
        .unwrap();
    let (recount, _) = mmu.recount();
    assert_eq!(recount, mmu.page_stats());
    vcpu.free_all();
    drop(vcpu);
    mmu.teardown().unwrap();
    let allocators = [
        td.mmu_alloc.clone(),
        td.table_alloc.clone(),
        td.pamt_alloc.clone(),
    ];
    drop(td);
    use mmu_cache::alloc::PageAllocator;
    for alloc in allocators {
        assert_eq!(alloc.pages_outstanding(), 0);
    }
}
