//! Splits, boundary splits, and the kernel's dirty_log_page_splitting check.

mod common;

use common::{GIB_PAGES, MIB_PAGES, checked_stats, failing_mmu, mmu};
use mmu_cache::alloc::{FailPolicy, PageAllocator};
use split::AccessKind;
use split::ept::{ADDR_MASK, PAGE_SIZE_BIT};
use split::{Gfn, Gpa, Hpa, Pfn};
use split::{Level, LogMode, Memslot, MmuConfig, PageStats};

#[test]
fn a_2m_leaf_splits_into_512_4k_leaves_with_the_same_bits() {
    let (_, mmu) = mmu(MmuConfig::default());
    mmu.add_memslot(Memslot::new(0, Gfn(0), 2 * MIB_PAGES, Pfn(0x40000)).unwrap())
        .unwrap();
    let mut vcpu = mmu.new_vcpu_caches();
    let huge = mmu.fault(&mut vcpu, Gpa(0), AccessKind::Write).unwrap();
    assert_eq!(huge.level, Level::L2M);
    assert_eq!(
        checked_stats(&mmu),
        PageStats {
            pages_2m: 1,
            ..Default::default()
        }
    );
    assert_eq!(
        mmu.split_huge_pages(Gfn(0), Gfn(512), Level::L4K).unwrap(),
        1
    );
    assert_eq!(
        checked_stats(&mmu),
        PageStats {
            pages_4k: 512,
            ..Default::default()
        }
    );
    for page in 0..512u64 {
        let leaf = mmu.translate(Gpa(page << 12)).unwrap();
        assert_eq!(leaf.level, Level::L4K);
        assert_eq!(
            leaf.hpa,
            Hpa((0x40000 + page) << 12),
            "translation unchanged"
        );
        assert_eq!(
            leaf.entry.bits() & !ADDR_MASK,
            huge.entry.bits() & !ADDR_MASK & !PAGE_SIZE_BIT,
            "every bit but the size bit copied"
        );
    }
}

#[test]
fn a_1g_leaf_split_to_4k_makes_513_tables_and_262144_leaves() {
    let (_, mmu) = mmu(MmuConfig::default());
    mmu.add_memslot(Memslot::new(0, Gfn(GIB_PAGES), GIB_PAGES, Pfn(GIB_PAGES)).unwrap())
        .unwrap();
    let mut vcpu = mmu.new_vcpu_caches();
    assert_eq!(
        mmu.fault(&mut vcpu, Gpa(1 << 30), AccessKind::Read)
            .unwrap()
            .level,
        Level::L1G
    );
    let tables_before = mmu.live_tables();
    assert_eq!(
        mmu.split_huge_pages(Gfn(GIB_PAGES), Gfn(2 * GIB_PAGES), Level::L2M)
            .unwrap(),
        1
    );
    assert_eq!(
        checked_stats(&mmu),
        PageStats {
            pages_2m: 512,
            ..Default::default()
        }
    );
    assert_eq!(
        mmu.split_huge_pages(Gfn(GIB_PAGES), Gfn(2 * GIB_PAGES), Level::L4K)
            .unwrap(),
        512
    );
    assert_eq!(
        checked_stats(&mmu),
        PageStats {
            pages_4k: 262_144,
            ..Default::default()
        }
    );
    assert_eq!(mmu.live_tables() - tables_before, 513);
    for gpa in [1 << 30, (1 << 30) + 0x1234_5678, (2 << 30) - 1] {
        assert_eq!(mmu.translate(Gpa(gpa)).unwrap().hpa, Hpa(gpa));
    }
}

#[test]
fn stats_move_by_512_per_split() {
    let (_, mmu) = mmu(MmuConfig::default());
    mmu.add_memslot(Memslot::new(0, Gfn(0), 16 * MIB_PAGES, Pfn(0)).unwrap())
        .unwrap();
    let mut vcpu = mmu.new_vcpu_caches();
    for gpa in (0..16u64 << 20).step_by(2 << 20) {
        mmu.fault(&mut vcpu, Gpa(gpa), AccessKind::Read).unwrap();
    }
    for (done, start) in (0..8u64).map(|i| i * 512).enumerate() {
        mmu.split_huge_pages(Gfn(start), Gfn(start + 512), Level::L4K)
            .unwrap();
        let stats = checked_stats(&mmu);
        assert_eq!(stats.pages_2m, 7 - done as u64);
        assert_eq!(stats.pages_4k, 512 * (done as u64 + 1));
    }
}

#[test]
fn split_cross_boundary_splits_only_the_straddling_leaves() {
    let (_, mmu) = mmu(MmuConfig::default());
    mmu.add_memslot(Memslot::new(0, Gfn(0), 8 * MIB_PAGES, Pfn(0)).unwrap())
        .unwrap();
    let mut vcpu = mmu.new_vcpu_caches();
    for gpa in (0..8u64 << 20).step_by(2 << 20) {
        mmu.fault(&mut vcpu, Gpa(gpa), AccessKind::Read).unwrap();
    }
    assert_eq!(
        mmu.split_cross_boundary(Gfn(3 * MIB_PAGES), Gfn(5 * MIB_PAGES))
            .unwrap(),
        2
    );
    let level_at = |mib: u64| mmu.translate(Gpa(mib << 20)).unwrap().level;
    assert_eq!(
        [0, 1, 2, 3, 4, 5, 6, 7].map(level_at),
        [
            Level::L2M,
            Level::L2M,
            Level::L4K,
            Level::L4K,
            Level::L4K,
            Level::L4K,
            Level::L2M,
            Level::L2M
        ]
    );
    // Aligned boundaries straddle nothing.
    assert_eq!(
        mmu.split_cross_boundary(Gfn(0), Gfn(2 * MIB_PAGES))
            .unwrap(),
        0
    );
    checked_stats(&mmu);
}

#[test]
fn boundary_splits_of_a_1g_leaf_go_only_as_deep_as_needed() {
    let (_, mmu) = mmu(MmuConfig::default());
    mmu.add_memslot(Memslot::new(0, Gfn(0), GIB_PAGES, Pfn(0)).unwrap())
        .unwrap();
    let mut vcpu = mmu.new_vcpu_caches();
    mmu.fault(&mut vcpu, Gpa(0), AccessKind::Read).unwrap();
    // [2M, 6M): 2M-aligned, so the 1G leaf splits to 2M and no further.
    assert_eq!(
        mmu.split_cross_boundary(Gfn(2 * MIB_PAGES), Gfn(6 * MIB_PAGES))
            .unwrap(),
        1
    );
    assert_eq!(
        checked_stats(&mmu),
        PageStats {
            pages_2m: 512,
            ..Default::default()
        }
    );
    // [3M, 5M): now the 2M leaves at 2M and 4M split too.
    assert_eq!(
        mmu.split_cross_boundary(Gfn(3 * MIB_PAGES), Gfn(5 * MIB_PAGES))
            .unwrap(),
        2
    );
    assert_eq!(
        checked_stats(&mmu),
        PageStats {
            pages_4k: 1024,
            pages_2m: 510,
            pages_1g: 0
        }
    );
}

fn populate(mmu: &split::TdpMmu, npages: u64) {
    let mut vcpu = mmu.new_vcpu_caches();
    for gfn in 0..npages {
        mmu.write(&mut vcpu, Gpa(gfn << 12)).unwrap();
    }
}

/// The kernel's dirty_log_page_splitting_test checks, on a 1 GiB + 4 MiB slot
/// mapped with 1G and 2M leaves.
#[test]
fn dirty_log_page_splitting_classic() {
    let npages = GIB_PAGES + 4 * MIB_PAGES;
    let (_, mmu) = mmu(MmuConfig::default());
    mmu.add_memslot(Memslot::new(0, Gfn(0), npages, Pfn(0)).unwrap())
        .unwrap();
    populate(&mmu, npages);
    let stats = checked_stats(&mmu);
    assert_eq!(stats.pages_2m * 512 + stats.pages_1g * 512 * 512, npages);
    assert_eq!((stats.pages_1g, stats.pages_2m), (1, 2));

    mmu.enable_dirty_logging(0, LogMode::Classic).unwrap();
    let stats = checked_stats(&mmu);
    assert_eq!(stats.pages_2m + stats.pages_1g, 0);
    assert!(stats.pages_4k >= npages);

    // Every page written in a pass is in the log, and only those.
    let mut vcpu = mmu.new_vcpu_caches();
    let written: Vec<u64> = (0..npages).step_by(7).collect();
    for &gfn in &written {
        mmu.write(&mut vcpu, Gpa(gfn << 12)).unwrap();
    }
    let log = mmu.get_dirty_log(0).unwrap();
    let logged: Vec<u64> = (0..npages)
        .filter(|&p| log[(p / 64) as usize] & (1 << (p % 64)) != 0)
        .collect();
    assert_eq!(logged, written);
    assert!(
        mmu.get_dirty_log(0).unwrap().iter().all(|&w| w == 0),
        "get clears the log"
    );

    mmu.disable_dirty_logging(0).unwrap();
    populate(&mmu, npages);
    let stats = checked_stats(&mmu);
    assert_eq!(
        (stats.pages_1g, stats.pages_2m, stats.pages_4k),
        (1, 2, 0),
        "huge pages return"
    );
}

#[test]
fn dirty_log_page_splitting_manual_initially_set() {
    let npages = GIB_PAGES + 4 * MIB_PAGES;
    let (_, mmu) = mmu(MmuConfig::default());
    mmu.add_memslot(Memslot::new(0, Gfn(0), npages, Pfn(0)).unwrap())
        .unwrap();
    populate(&mmu, npages);
    let before = checked_stats(&mmu);
    mmu.enable_dirty_logging(0, LogMode::ManualInitiallySet)
        .unwrap();
    assert_eq!(checked_stats(&mmu), before, "nothing splits at enable");
    let log = mmu.get_dirty_log(0).unwrap();
    assert!(log.iter().all(|&w| w == !0), "initially set");

    // Clearing part of the log splits and protects only that part.
    mmu.clear_dirty_log(0, 0, &[!0; 8]).unwrap();
    let partial = checked_stats(&mmu);
    assert_eq!((partial.pages_1g, partial.pages_2m), (0, 512 + 2 - 1));
    assert_eq!(partial.pages_4k, 512);

    mmu.clear_dirty_log(0, 0, &log).unwrap();
    let stats = checked_stats(&mmu);
    assert_eq!(stats.pages_2m + stats.pages_1g, 0);
    assert!(stats.pages_4k >= npages);
    assert!(mmu.get_dirty_log(0).unwrap().iter().all(|&w| w == 0));

    let mut vcpu = mmu.new_vcpu_caches();
    mmu.write(&mut vcpu, Gpa(0x7000)).unwrap();
    let log = mmu.get_dirty_log(0).unwrap();
    assert_eq!(log[0], 1 << 7);
    assert_eq!(
        mmu.get_dirty_log(0).unwrap()[0],
        1 << 7,
        "manual get does not clear"
    );
    mmu.clear_dirty_log(0, 0, &[1 << 7]).unwrap();
    assert_eq!(mmu.get_dirty_log(0).unwrap()[0], 0);
    assert!(
        mmu.clear_dirty_log(0, 3, &[1]).is_err(),
        "first_page must be 64-aligned"
    );
}

/// The kernel's `kvm_tdp_mmu_map`: a write fault on a write-protected huge
/// leaf above the goal replaces it with a full table of its 512 children
/// (`tdp_mmu_split_huge_page`), so the neighbours of the written page stay
/// mapped; only the written page becomes writable and dirty.
#[test]
fn lazy_splitting_keeps_the_511_neighbours_of_a_write_fault() {
    let (_, mmu) = mmu(MmuConfig {
        eager_split: false,
        ..MmuConfig::default()
    });
    mmu.add_memslot(Memslot::new(0, Gfn(0), 4 * MIB_PAGES, Pfn(0)).unwrap())
        .unwrap();
    populate(&mmu, 4 * MIB_PAGES);
    mmu.enable_dirty_logging(0, LogMode::Classic).unwrap();
    assert_eq!(checked_stats(&mmu).pages_2m, 2, "no eager split");
    let mut vcpu = mmu.new_vcpu_caches();
    mmu.write(&mut vcpu, Gpa(0x3000)).unwrap();
    let stats = checked_stats(&mmu);
    assert_eq!(
        (stats.pages_2m, stats.pages_4k),
        (1, 512),
        "the written huge page became 512 4K leaves"
    );
    assert_eq!(mmu.counters().lazy_splits, 1);
    for gfn in [0u64, 2, 4, 511] {
        let t = mmu
            .translate(Gpa(gfn << 12))
            .expect("a neighbour stays mapped");
        assert_eq!((t.level, t.hpa), (Level::L4K, Hpa(gfn << 12)));
        assert_eq!(t.perms & split::ept::WRITE, 0, "still write-protected");
    }
    assert_eq!(mmu.get_dirty_log(0).unwrap()[0], 1 << 3);
    // The next write to a neighbour is a fault on a 4K leaf, and logged.
    assert_eq!(
        mmu.access(&mut vcpu, Gpa(0x5000), AccessKind::Write),
        split::Access::Miss
    );
    mmu.write(&mut vcpu, Gpa(0x5000)).unwrap();
    assert_eq!(mmu.counters().lazy_splits, 1);
    assert_eq!(mmu.get_dirty_log(0).unwrap()[0], 1 << 5);
}

/// `kvm_mmu_slot_try_split_huge_pages` is best effort: when the split caches
/// cannot be filled, enabling dirty logging still succeeds, the huge leaves
/// are write-protected whole and counted, and each later write fault splits
/// one, so the log keeps 4 KiB precision.
#[test]
fn eager_splitting_falls_back_to_write_protection_when_memory_runs_out() {
    let (counting, mmu) = failing_mmu(MmuConfig::default());
    mmu.add_memslot(Memslot::new(0, Gfn(0), 4 * MIB_PAGES, Pfn(0)).unwrap())
        .unwrap();
    let mut vcpu = mmu.new_vcpu_caches();
    for gpa in [0, 2 << 20] {
        mmu.write(&mut vcpu, Gpa(gpa)).unwrap();
    }
    counting.inner().set_policy(FailPolicy::Always);
    mmu.enable_dirty_logging(0, LogMode::Classic).unwrap();
    let stats = checked_stats(&mmu);
    assert_eq!((stats.pages_2m, stats.pages_4k), (2, 0), "nothing split");
    assert_eq!(mmu.counters().split_fallbacks, 2);
    for gpa in [0x1000, (2 << 20) + 0x1000] {
        assert_eq!(
            mmu.translate(Gpa(gpa)).unwrap().perms & split::ept::WRITE,
            0
        );
    }
    // The vCPU's own cache still holds tables: write faults split.
    mmu.write(&mut vcpu, Gpa(0x3000)).unwrap();
    mmu.write(&mut vcpu, Gpa((2 << 20) + 0x7000)).unwrap();
    let stats = checked_stats(&mmu);
    assert_eq!((stats.pages_2m, stats.pages_4k), (0, 1024));
    let log = mmu.get_dirty_log(0).unwrap();
    let logged: Vec<u64> = (0..4 * MIB_PAGES)
        .filter(|&p| log[(p / 64) as usize] & (1 << (p % 64)) != 0)
        .collect();
    assert_eq!(logged, vec![3, 512 + 7], "4 KiB precision");
    // Manual clears are best effort too.
    mmu.disable_dirty_logging(0).unwrap();
    mmu.write(&mut vcpu, Gpa(0)).unwrap();
    mmu.enable_dirty_logging(0, LogMode::ManualInitiallySet)
        .unwrap();
    mmu.clear_dirty_log(0, 0, &[!0; 16]).unwrap();
    assert_eq!(checked_stats(&mmu).pages_2m, 1);
    counting.inner().set_policy(FailPolicy::Never);
}

/// `kvm_clear_dirty_log_protect` works per 64-page word: it clears only the
/// bits set both in the log and in the mask, and splits and protects only
/// from the first to the last bit cleared in each word.
#[test]
fn clear_dirty_log_splits_per_word_only_what_it_cleared() {
    let (_, mmu) = mmu(MmuConfig::default());
    mmu.add_memslot(Memslot::new(0, Gfn(0), 8 * MIB_PAGES, Pfn(0)).unwrap())
        .unwrap();
    populate(&mmu, 8 * MIB_PAGES);
    assert_eq!(checked_stats(&mmu).pages_2m, 4);
    mmu.enable_dirty_logging(0, LogMode::ManualInitiallySet)
        .unwrap();
    let splits = mmu.counters().splits;
    // An all-zero mask splits and protects nothing.
    mmu.clear_dirty_log(0, 0, &[0; 32]).unwrap();
    assert_eq!(checked_stats(&mmu).pages_2m, 4);
    // Pages 0 and 2047: the 2 MiB pages at 0 and 3, not the two between.
    let mut mask = [0u64; 32];
    mask[0] = 1;
    mask[31] = 1 << 63;
    mmu.clear_dirty_log(0, 0, &mask).unwrap();
    let stats = checked_stats(&mmu);
    assert_eq!((stats.pages_2m, stats.pages_4k), (2, 1024));
    assert_eq!(mmu.counters().splits - splits, 2);
    assert_eq!(mmu.translate(Gpa(0x20_0000)).unwrap().level, Level::L2M);
    assert_ne!(
        mmu.translate(Gpa(0x20_0000)).unwrap().perms & split::ept::WRITE,
        0,
        "untouched huge pages stay writable"
    );
    // Page 0 is clear in the log now: only page 1024's bit is cleared, so
    // only its 2 MiB page splits.
    let mut mask = [0u64; 32];
    mask[0] = 1;
    mask[16] = 1;
    mmu.clear_dirty_log(0, 0, &mask).unwrap();
    assert_eq!(checked_stats(&mmu).pages_2m, 1);
    let log = mmu.get_dirty_log(0).unwrap();
    assert_eq!((log[0], log[16], log[31], log[8]), (!1, !1, !(1 << 63), !0));
    // Nothing left to clear there: nothing splits.
    mmu.clear_dirty_log(0, 0, &mask).unwrap();
    assert_eq!(mmu.counters().splits - splits, 3);
}

/// Disabling dirty logging zaps what can be mapped huge again and keeps
/// 4 KiB-only ranges (the kernel's `kvm_mmu_zap_collapsible_sptes`).
#[test]
fn disabling_dirty_logging_zaps_only_what_can_be_huge_again() {
    let (_, mmu) = mmu(MmuConfig::default());
    // 4 MiB + 5 pages: the last 5 pages can only be mapped 4K.
    let npages = 4 * MIB_PAGES + 5;
    mmu.add_memslot(Memslot::new(0, Gfn(0), npages, Pfn(0)).unwrap())
        .unwrap();
    populate(&mmu, npages);
    mmu.enable_dirty_logging(0, LogMode::Classic).unwrap();
    assert_eq!(checked_stats(&mmu).pages_4k, npages);
    mmu.disable_dirty_logging(0).unwrap();
    let stats = checked_stats(&mmu);
    assert_eq!((stats.pages_2m, stats.pages_4k), (0, 5));
    for gfn in 4 * MIB_PAGES..npages {
        assert_eq!(mmu.translate(Gpa(gfn << 12)).unwrap().level, Level::L4K);
    }
    assert_eq!(mmu.translate(Gpa(0x1000)), None);
    populate(&mmu, npages);
    let stats = checked_stats(&mmu);
    assert_eq!(
        (stats.pages_2m, stats.pages_4k),
        (2, 5),
        "huge pages return"
    );
}

#[test]
fn a_1g_split_with_a_tiny_cache_completes_without_allocating_under_the_lock() {
    // The counting allocator panics on any allocation inside the MMU's lock.
    let (counting, mmu) = mmu(MmuConfig {
        split_cache_capacity: 3,
        ..MmuConfig::default()
    });
    mmu.add_memslot(Memslot::new(0, Gfn(0), GIB_PAGES, Pfn(0)).unwrap())
        .unwrap();
    let mut vcpu = mmu.new_vcpu_caches();
    mmu.fault(&mut vcpu, Gpa(0), AccessKind::Write).unwrap();
    mmu.enable_dirty_logging(0, LogMode::Classic).unwrap();
    assert_eq!(
        checked_stats(&mmu),
        PageStats {
            pages_4k: GIB_PAGES,
            ..Default::default()
        }
    );
    assert!(
        mmu.counters().lock_drops >= 513 / 3,
        "dropped the lock to top up"
    );
    drop(vcpu);
    let held = mmu.pages_held();
    assert_eq!(counting.pages_outstanding(), held);
    drop(mmu);
    assert_eq!(
        counting.pages_outstanding(),
        0,
        "every page back with its owner"
    );
}

#[test]
fn five_level_paging_maps_high_addresses() {
    let (_, five) = mmu(MmuConfig {
        levels: 5,
        ..MmuConfig::default()
    });
    let base = 1u64 << 40; // gfn of a gpa at 4 PiB, beyond 4-level paging
    five.add_memslot(Memslot::new(0, Gfn(base), 512, Pfn(7)).unwrap())
        .unwrap();
    let mut vcpu = five.new_vcpu_caches();
    let t = five
        .fault(&mut vcpu, Gpa((base + 3) << 12), AccessKind::Write)
        .unwrap();
    assert_eq!(t.hpa, Hpa(10 << 12));
    let (_, four) = mmu(MmuConfig::default());
    assert!(
        four.add_memslot(Memslot::new(0, Gfn(base), 512, Pfn(7)).unwrap())
            .is_err()
    );
}

#[test]
fn a_zap_keeps_an_unharvested_write_in_the_log() {
    let (_, mmu) = mmu(MmuConfig::default());
    mmu.add_memslot(Memslot::new(0, Gfn(0), 2 * MIB_PAGES, Pfn(0x40000)).unwrap())
        .unwrap();
    let mut vcpu = mmu.new_vcpu_caches();
    mmu.enable_dirty_logging(0, LogMode::Classic).unwrap();
    mmu.write(&mut vcpu, Gpa(0x7000)).unwrap();
    // The leaf goes (a conversion, a memslot change) before the log is read.
    mmu.zap_range(Gfn(0), Gfn(16)).unwrap();
    let log = mmu.get_dirty_log(0).unwrap();
    assert_eq!(log[0], 1 << 7, "the write survives the zap");
}

/// A leaf is never larger than the host's pages behind the slot, as KVM's
/// `host_pfn_mapping_level` bounds it: 4 KiB host pages give 4K leaves
/// however aligned the slot is, 2 MiB pages (THP, 2 MiB HugeTLB) 2M leaves.
#[test]
fn the_hosts_page_size_bounds_every_leaf_of_a_slot() {
    for (host, expected, slot_pages) in [
        (Level::L4K, Level::L4K, 4 * MIB_PAGES),
        (Level::L2M, Level::L2M, GIB_PAGES),
        (Level::L1G, Level::L1G, GIB_PAGES),
    ] {
        let (_, mmu) = mmu(MmuConfig::default());
        let slot = Memslot::new(0, Gfn(0), slot_pages, Pfn(0x4_0000))
            .unwrap()
            .with_host_page_level(host);
        assert_eq!(slot.host_page_level(), host);
        mmu.add_memslot(slot).unwrap();
        let mut vcpu = mmu.new_vcpu_caches();
        for gfn in [0, MIB_PAGES + 3, slot_pages - 1] {
            let mapped = mmu
                .fault(&mut vcpu, Gpa(gfn << 12), AccessKind::Write)
                .unwrap();
            assert_eq!(mapped.level, expected, "host {host:?}, gfn {gfn:#x}");
            assert_eq!(mapped.hpa, Hpa((0x4_0000 + gfn) << 12));
        }
        // Dirty logging off again: 4 KiB host pages leave nothing to zap
        // for a huge remap, so the 4K leaves stay.
        mmu.enable_dirty_logging(0, LogMode::Classic).unwrap();
        mmu.disable_dirty_logging(0).unwrap();
        if host == Level::L4K {
            assert_eq!(checked_stats(&mmu).pages_4k, 3);
        }
    }
}
