//! The shadow MMU: shadow pages, rmaps, unsync pages, dirty logging and
//! eager splitting without a vCPU.

mod common;

use split::{Gfn, Gpa, Hpa, Pfn};
use std::sync::Arc;

use mmu_cache::PagePool;
use mmu_cache::alloc::{ChunkAllocator, CountingAllocator, PageAllocator};
use split::ept::{ADDR_MASK, PAGE_SIZE_BIT, RWX, WRITE};
use split::guest::GuestEpt;
use split::shadow::{
    Role, SPLIT_DESC_CAPACITY, SPLIT_DESC_MIN, ShadowCaches, ShadowConfig, ShadowError, ShadowMmu,
    Vcpu,
};
use split::{AccessKind, Level, LogMode, Memslot, PageStats};

use common::shadow::{HOST, SLOT_PAGES, TABLES, all_freed, checked, fault_all, map_2m, setup};

#[test]
fn get_finds_what_it_created_and_zap_frees_it() {
    let mut s = setup(ShadowConfig::default());
    let role = Role::direct(Level::L4K, RWX);
    let (first, created) = s
        .mmu
        .get_shadow_page(&mut s.caches, None, 0x200, role)
        .unwrap();
    assert!(created);
    assert_eq!(
        (first.gfn, first.role, first.parents),
        (Gfn(0x200), role, 0)
    );
    let (again, created) = s
        .mmu
        .get_shadow_page(&mut s.caches, None, 0x200, role)
        .unwrap();
    assert!(!created);
    assert_eq!(again.hpa, first.hpa);
    // Another role is another page.
    let (other, created) = s
        .mmu
        .get_shadow_page(
            &mut s.caches,
            Some(&s.vcpu),
            0x200,
            Role::shadowing(Level::L4K, RWX),
        )
        .unwrap();
    assert!(created);
    assert_ne!(other.hpa, first.hpa);
    assert_eq!(s.mmu.shadow_pages(), 2);

    s.mmu.zap_shadow_page(first.hpa).unwrap();
    assert_eq!(s.mmu.find_shadow_page(Gfn(0x200), role), None);
    assert_eq!(s.mmu.shadow_pages(), 1);
    assert!(matches!(
        s.mmu.zap_shadow_page(first.hpa),
        Err(ShadowError::NoSuchPage { .. })
    ));
    all_freed(s);
}

#[test]
#[should_panic(expected = "without a vCPU must be direct")]
fn a_shadowing_page_cannot_be_asked_for_without_a_vcpu() {
    let mut s = setup(ShadowConfig::default());
    let _ = s
        .mmu
        .get_shadow_page(&mut s.caches, None, 0x200, Role::shadowing(Level::L4K, RWX));
}

#[test]
fn faults_build_shadow_paths_with_the_largest_leaf_both_sides_allow() {
    let mut s = setup(ShadowConfig::default());
    map_2m(&s);
    // A 4K guest mapping inside a host-huge region stays 4K.
    s.guest.map(0x10_0010, 0x7, Level::L4K, RWX).unwrap();
    let t = s
        .mmu
        .fault(&mut s.caches, &mut s.vcpu, Gpa(0x20_5123), AccessKind::Read)
        .unwrap();
    assert_eq!(t.level, Level::L2M);
    assert_eq!(t.hpa, Hpa((HOST << 12) + 0x20_5123));
    let t = s
        .mmu
        .fault(
            &mut s.caches,
            &mut s.vcpu,
            Gpa(0x1_0001_0000),
            AccessKind::Write,
        )
        .unwrap();
    assert_eq!((t.level, t.hpa), (Level::L4K, Hpa((HOST + 7) << 12)));
    assert_eq!(s.mmu.rmap_len(Gfn(0), Level::L2M), 0);
    assert_eq!(s.mmu.rmap_len(Gfn(512), Level::L2M), 1);
    assert_eq!(s.mmu.rmap_len(Gfn(7), Level::L4K), 1);
    assert_eq!(
        checked(&s.mmu),
        PageStats {
            pages_4k: 1,
            pages_2m: 1,
            pages_1g: 0
        }
    );
    // Same translation when read back.
    assert_eq!(
        s.mmu.translate(&s.vcpu, Gpa(0x20_5123)).map(|t| t.hpa),
        Some(Hpa((HOST << 12) + 0x20_5123))
    );
    all_freed(s);
}

/// What the SDM says an access of `kind` through a guest walk of a PD
/// entry with `table` permissions and a 4K leaf with `leaf` permissions
/// gives: entries are checked in walk order, each for misconfiguration
/// (write without read; execute-only where the CPU has no execute-only
/// support) and then for the access's bit in the AND of the permissions so
/// far. (The PML4 and PDPT entries on the way are RWX.)
#[derive(Debug, PartialEq, Eq)]
enum Expected {
    Misconfig,
    Violation(Level),
    Mapped(u64),
}

fn sdm_verdict(table: u64, leaf: u64, kind: AccessKind, execute_only: bool) -> Expected {
    let mut effective = RWX;
    for (level, perms) in [(Level::L2M, table), (Level::L4K, leaf)] {
        if perms == 0 {
            return Expected::Violation(level);
        }
        let write_without_read = perms & 0b010 != 0 && perms & 0b001 == 0;
        if write_without_read || (perms == 0b100 && !execute_only) {
            return Expected::Misconfig;
        }
        effective &= perms;
        if effective & kind.required_bit() == 0 {
            return Expected::Violation(level);
        }
    }
    Expected::Mapped(effective)
}

#[test]
fn every_permission_combination_of_the_guest_walk_follows_the_sdm() {
    for execute_only in [true, false] {
        for table in 0..8u64 {
            for leaf in 0..8u64 {
                for kind in AccessKind::ALL {
                    let mut s = setup(ShadowConfig {
                        ept_caps: split::EptCaps {
                            execute_only,
                            maxphyaddr: 52,
                        },
                        ..ShadowConfig::default()
                    });
                    let ngfn = 0x23;
                    s.guest.map(ngfn, 0x45, Level::L4K, leaf).unwrap();
                    if leaf == 0 {
                        // `map` writes a non-present leaf for no permissions.
                        assert!(s.mmu.translate(&s.vcpu, Gpa(ngfn << 12)).is_none());
                    }
                    s.guest.set_table_perms(ngfn, Level::L2M, table).unwrap();
                    let what = format!(
                        "table {table:03b} leaf {leaf:03b} {kind} execute-only {execute_only}"
                    );
                    let expected = sdm_verdict(table, leaf, kind, execute_only);
                    let got = s
                        .mmu
                        .fault(&mut s.caches, &mut s.vcpu, Gpa(ngfn << 12), kind);
                    match (&expected, got) {
                        (Expected::Mapped(effective), Ok(t)) => {
                            assert_eq!(t.perms, *effective, "{what}");
                            assert_eq!(t.hpa, Hpa((HOST + 0x45) << 12), "{what}");
                            // The shadow leaf serves exactly what the guest allows.
                            for other in AccessKind::ALL {
                                let hit = matches!(
                                    s.mmu.access(&s.vcpu, Gpa(ngfn << 12), other),
                                    split::Access::Hit(_)
                                );
                                assert_eq!(hit, other.allowed_by(*effective), "{what}: {other}");
                            }
                        }
                        (
                            Expected::Violation(level),
                            Err(ShadowError::GuestViolation {
                                level: at, access, ..
                            }),
                        ) => {
                            assert_eq!((*level, kind), (at, access), "{what}");
                            assert!(
                                s.mmu.translate(&s.vcpu, Gpa(ngfn << 12)).is_none(),
                                "{what}"
                            );
                        }
                        (Expected::Misconfig, Err(ShadowError::GuestMisconfig { .. })) => {
                            assert!(
                                s.mmu.translate(&s.vcpu, Gpa(ngfn << 12)).is_none(),
                                "{what}"
                            );
                        }
                        (expected, got) => panic!("{what}: expected {expected:?}, got {got:?}"),
                    }
                    checked(&s.mmu);
                    s.mmu.unload_root(&mut s.vcpu);
                    all_freed(s);
                }
            }
        }
    }
}

#[test]
fn a_read_through_an_execute_only_guest_mapping_is_a_violation_for_l1() {
    let mut s = setup(ShadowConfig::default());
    s.guest.map(0x10, 0x10, Level::L4K, 0b100).unwrap();
    // A fetch maps it: the shadow leaf is execute-only.
    let t = s
        .mmu
        .fault(&mut s.caches, &mut s.vcpu, Gpa(0x10_000), AccessKind::Fetch)
        .unwrap();
    assert_eq!(t.perms, 0b100);
    assert_eq!(
        s.mmu.access(&s.vcpu, Gpa(0x10_000), AccessKind::Read),
        split::Access::Miss,
        "a read cannot use an execute-only leaf"
    );
    assert!(matches!(
        s.mmu
            .fault(&mut s.caches, &mut s.vcpu, Gpa(0x10_000), AccessKind::Read),
        Err(ShadowError::GuestViolation {
            access: AccessKind::Read,
            level: Level::L4K,
            ..
        })
    ));
    // Also when the execute-only permission comes from a table above a
    // readable leaf.
    s.guest.map(0x400, 0x400, Level::L4K, RWX).unwrap();
    let table = s.guest.set_table_perms(0x400, Level::L2M, 0b100).unwrap();
    s.mmu.guest_table_written(Gfn(table));
    assert!(matches!(
        s.mmu
            .fault(&mut s.caches, &mut s.vcpu, Gpa(0x40_0000), AccessKind::Read),
        Err(ShadowError::GuestViolation {
            level: Level::L2M,
            ..
        })
    ));
    let t = s
        .mmu
        .fault(
            &mut s.caches,
            &mut s.vcpu,
            Gpa(0x40_0000),
            AccessKind::Fetch,
        )
        .unwrap();
    assert_eq!(t.perms, 0b100);
    checked(&s.mmu);
    s.mmu.unload_root(&mut s.vcpu);
    all_freed(s);
}

#[test]
fn a_guest_huge_page_over_a_host_that_cannot_map_it_gets_a_direct_page() {
    let mut s = setup(ShadowConfig::default());
    // A second slot whose host frames are not 2M-aligned.
    s.mmu
        .add_memslot(Memslot::new(1, Gfn(0x2000), 1024, Pfn(0x90_0001)).unwrap())
        .unwrap();
    s.guest.map(0x4000, 0x2000, Level::L2M, RWX).unwrap();
    let t = s
        .mmu
        .fault(
            &mut s.caches,
            &mut s.vcpu,
            Gpa((0x4000 + 3) << 12),
            AccessKind::Write,
        )
        .unwrap();
    assert_eq!((t.level, t.hpa), (Level::L4K, Hpa((0x90_0001 + 3) << 12)));
    let direct = s
        .mmu
        .find_shadow_page(Gfn(0x2000), Role::direct(Level::L4K, RWX))
        .expect("a direct page for the guest's 2M page");
    assert_eq!(direct.parents, 1);
    checked(&s.mmu);
    all_freed(s);
}

#[test]
fn the_guest_ept_decides_what_is_a_violation() {
    let mut s = setup(ShadowConfig::default());
    s.guest.map(0, 0, Level::L4K, 0b001).unwrap(); // read-only
    assert!(matches!(
        s.mmu
            .fault(&mut s.caches, &mut s.vcpu, Gpa(0), AccessKind::Write),
        Err(ShadowError::GuestViolation {
            access: AccessKind::Write,
            ..
        })
    ));
    assert!(
        s.mmu
            .fault(&mut s.caches, &mut s.vcpu, Gpa(0), AccessKind::Read)
            .is_ok()
    );
    assert!(matches!(
        s.mmu
            .fault(&mut s.caches, &mut s.vcpu, Gpa(0x1000), AccessKind::Read),
        Err(ShadowError::GuestViolation {
            level: Level::L4K,
            ..
        })
    ));
    // A guest mapping to L1 memory that no slot holds.
    s.guest.map(0x200, 0x8_0000, Level::L4K, RWX).unwrap();
    assert!(matches!(
        s.mmu
            .fault(&mut s.caches, &mut s.vcpu, Gpa(0x20_0000), AccessKind::Read),
        Err(ShadowError::NoSlot { gfn: Gfn(0x8_0000) })
    ));
    assert!(matches!(
        s.mmu
            .fault(&mut s.caches, &mut s.vcpu, Gpa(1 << 48), AccessKind::Read),
        Err(ShadowError::AddressTooWide { .. })
    ));
    checked(&s.mmu);
    all_freed(s);
}

#[test]
fn aliased_frames_chain_rmap_descriptors_of_14() {
    let mut s = setup(ShadowConfig::default());
    // 30 L2 frames all map L1 frame 0x42.
    for i in 0..30u64 {
        s.guest.map(i, 0x42, Level::L4K, RWX).unwrap();
    }
    fault_all(&mut s, 30, 1);
    assert_eq!(s.mmu.rmap_len(Gfn(0x42), Level::L4K), 30);
    let recount = s.mmu.recount();
    // One list: 2 full descriptors of 14 and one of 2.
    assert_eq!(recount.descriptors, 3);
    checked(&s.mmu);
    s.mmu.zap_gfn_range(Gfn(0x42), Gfn(0x43));
    assert_eq!(s.mmu.rmap_len(Gfn(0x42), Level::L4K), 0);
    assert_eq!(s.mmu.recount().descriptors, 0);
    assert_eq!(checked(&s.mmu), PageStats::default());
    // The path is still there: the next access only needs a leaf.
    assert!(s.mmu.translate(&s.vcpu, Gpa(0)).is_none());
    s.mmu
        .fault(&mut s.caches, &mut s.vcpu, Gpa(0x5000), AccessKind::Read)
        .unwrap();
    assert_eq!(s.mmu.rmap_len(Gfn(0x42), Level::L4K), 1);
    all_freed(s);
}

#[test]
fn split_without_a_vcpu_keeps_every_translation() {
    let mut s = setup(ShadowConfig::default());
    map_2m(&s);
    fault_all(&mut s, SLOT_PAGES, 512);
    assert_eq!(checked(&s.mmu).pages_2m, 8);
    let before: Vec<_> = (0..SLOT_PAGES)
        .step_by(512)
        .map(|ngfn| s.mmu.translate(&s.vcpu, Gpa(ngfn << 12)).unwrap())
        .collect();
    let gets = s.counting.gets();
    // The counting allocator panics if a page is taken under the lock.
    let splits = s
        .mmu
        .split_huge_pages(Gfn(0), Gfn(SLOT_PAGES), Level::L4K)
        .unwrap();
    assert_eq!(splits, 8);
    assert_eq!(
        checked(&s.mmu),
        PageStats {
            pages_4k: SLOT_PAGES,
            ..PageStats::default()
        }
    );
    assert!(s.counting.gets() > gets, "the split caches were topped up");
    for (i, huge) in before.iter().enumerate() {
        for page in [0u64, 1, 255, 511] {
            let ngfn = i as u64 * 512 + page;
            let leaf = s.mmu.translate(&s.vcpu, Gpa(ngfn << 12)).unwrap();
            assert_eq!(leaf.level, Level::L4K);
            assert_eq!(leaf.hpa, huge.hpa + (page << 12));
            assert_eq!(
                leaf.entry.bits() & !ADDR_MASK,
                huge.entry.bits() & !ADDR_MASK & !PAGE_SIZE_BIT,
                "every bit but the size bit copied"
            );
        }
        let direct = s
            .mmu
            .find_shadow_page(Gfn(i as u64 * 512), Role::direct(Level::L4K, RWX))
            .unwrap();
        assert_eq!(direct.parents, 1);
    }
    let (descriptors, _, _, capacity) = s.mmu.split_cache_levels();
    assert_eq!(capacity, SPLIT_DESC_CAPACITY);
    assert!(descriptors >= SPLIT_DESC_MIN);
    all_freed(s);
}

#[test]
fn a_1g_guest_page_splits_pre_order_down_to_4k() {
    let counting = Arc::new(CountingAllocator::new(ChunkAllocator::anonymous()));
    let pool = PagePool::from_shared(counting.clone(), None);
    let mmu = ShadowMmu::new(pool, ShadowConfig::default()).unwrap();
    mmu.add_memslot(Memslot::new(0, Gfn(1 << 18), 1 << 18, Pfn(1 << 18)).unwrap())
        .unwrap();
    let guest = Arc::new(GuestEpt::new(4, TABLES).unwrap());
    guest.map(0, 1 << 18, Level::L1G, RWX).unwrap();
    let mut vcpu = Vcpu::new(0, guest);
    let mut caches = mmu.new_caches();
    let huge = mmu
        .fault(&mut caches, &mut vcpu, Gpa(0x1234_5000), AccessKind::Write)
        .unwrap();
    assert_eq!(huge.level, Level::L1G);
    let splits = mmu
        .split_huge_pages(Gfn(1 << 18), Gfn(2 << 18), Level::L4K)
        .unwrap();
    assert_eq!(splits, 1 + 512);
    assert_eq!(
        checked(&mmu),
        PageStats {
            pages_4k: 1 << 18,
            ..PageStats::default()
        }
    );
    let leaf = mmu.translate(&vcpu, Gpa(0x1234_5000)).unwrap();
    assert_eq!((leaf.level, leaf.hpa), (Level::L4K, huge.hpa));
    assert!(
        mmu.counters().lock_drops >= 2,
        "caches ran dry and were refilled"
    );
    caches.free_all();
    drop(caches);
    drop(mmu);
    assert_eq!(counting.pages_outstanding(), 0);
}

#[test]
fn aliased_huge_pages_share_one_direct_page() {
    let mut s = setup(ShadowConfig::default());
    // Four L2 ranges map the same L1 2M page with the same access: the
    // first split builds the direct page, the other three link it.
    for i in 0..4u64 {
        s.guest.map(i * 512, 0, Level::L2M, RWX).unwrap();
    }
    fault_all(&mut s, 4 * 512, 512);
    assert_eq!(s.mmu.rmap_len(Gfn(0), Level::L2M), 4);
    assert_eq!(
        s.mmu
            .split_huge_pages(Gfn(0), Gfn(512), Level::L4K)
            .unwrap(),
        4
    );
    let direct = s
        .mmu
        .find_shadow_page(Gfn(0), Role::direct(Level::L4K, RWX))
        .unwrap();
    assert_eq!(direct.parents, 4);
    assert_eq!(s.mmu.rmap_len(Gfn(7), Level::L4K), 1);
    // Root, PDPT and PD shadows, and one direct page.
    assert_eq!(s.mmu.counters().pages_created, 3 + 1);
    checked(&s.mmu);
    for i in 0..4u64 {
        let t = s.mmu.translate(&s.vcpu, Gpa((i * 512 + 9) << 12)).unwrap();
        assert_eq!((t.level, t.hpa), (Level::L4K, Hpa((HOST + 9) << 12)));
    }
    all_freed(s);
}

#[test]
fn many_aliases_use_more_descriptors_than_one_topup_holds() {
    let mut s = setup(ShadowConfig::default());
    // Three guest 2M pages over the same L1 page with different access:
    // three direct pages, so every 4K frame gets three rmap entries and one
    // descriptor. The second split leaves fewer than 513 descriptors, so
    // the third must drop the lock and top up.
    s.guest.map(0, 0, Level::L2M, RWX).unwrap();
    s.guest.map(1 << 18, 0, Level::L2M, 0b101).unwrap();
    s.guest.map(2 << 18, 0, Level::L2M, 0b001).unwrap();
    for ngpa in [0, 1 << 30, 2 << 30] {
        s.mmu
            .fault(&mut s.caches, &mut s.vcpu, Gpa(ngpa), AccessKind::Read)
            .unwrap();
    }
    let drops = s.mmu.counters().lock_drops;
    assert_eq!(
        s.mmu
            .split_huge_pages(Gfn(0), Gfn(512), Level::L4K)
            .unwrap(),
        3
    );
    assert_eq!(s.mmu.rmap_len(Gfn(100), Level::L4K), 3);
    assert_eq!(s.mmu.recount().descriptors, 512);
    assert!(s.mmu.counters().lock_drops >= drops + 2);
    let read_only = s.mmu.translate(&s.vcpu, Gpa((1 << 30) + 0x5000)).unwrap();
    assert_eq!(
        read_only.perms & WRITE,
        0,
        "the guest's permissions are kept"
    );
    checked(&s.mmu);
    all_freed(s);
}

#[test]
fn an_unsync_page_met_without_a_vcpu_is_zapped_not_synced() {
    let mut s = setup(ShadowConfig::default());
    let table = *s
        .guest
        .map(0, 0x300, Level::L4K, RWX)
        .unwrap()
        .last()
        .unwrap();
    s.mmu
        .fault(&mut s.caches, &mut s.vcpu, Gpa(0), AccessKind::Write)
        .unwrap();
    assert_eq!(s.mmu.guest_table_written(Gfn(table)), 1);
    let unsync = s
        .mmu
        .find_shadow_page(Gfn(table), Role::shadowing(Level::L4K, RWX))
        .unwrap();
    assert!(unsync.unsync);
    // The split path asks for a direct 2M-level page keyed by that frame:
    // the unsync page is zapped, with no vCPU to sync it.
    let (page, created) = s
        .mmu
        .get_shadow_page(&mut s.caches, None, table, Role::direct(Level::L2M, RWX))
        .unwrap();
    assert!(created && !page.unsync);
    assert_eq!(
        s.mmu
            .find_shadow_page(Gfn(table), Role::shadowing(Level::L4K, RWX)),
        None
    );
    assert!(s.mmu.translate(&s.vcpu, Gpa(0)).is_none());
    checked(&s.mmu);
    all_freed(s);
}

#[test]
fn guest_table_writes_unsync_then_sync_rereads_the_guest() {
    let mut s = setup(ShadowConfig::default());
    let table = *s
        .guest
        .map(0, 0x300, Level::L4K, RWX)
        .unwrap()
        .last()
        .unwrap();
    s.guest.map(1, 0x301, Level::L4K, RWX).unwrap();
    fault_all(&mut s, 2, 1);
    // The guest remaps L2 frame 0 and unmaps frame 1.
    s.guest.map(0, 0x305, Level::L4K, RWX).unwrap();
    s.guest.unmap(1);
    assert_eq!(s.mmu.guest_table_written(Gfn(table)), 1);
    // Until the guest flushes, the old translation stands (a stale TLB).
    assert_eq!(
        s.mmu.translate(&s.vcpu, Gpa(0)).unwrap().hpa,
        Hpa((HOST + 0x300) << 12)
    );
    assert_eq!(s.mmu.sync(&s.vcpu), 1);
    assert!(s.mmu.translate(&s.vcpu, Gpa(0)).is_none());
    assert!(s.mmu.translate(&s.vcpu, Gpa(0x1000)).is_none());
    let t = s
        .mmu
        .fault(&mut s.caches, &mut s.vcpu, Gpa(0), AccessKind::Read)
        .unwrap();
    assert_eq!(t.hpa, Hpa((HOST + 0x305) << 12));
    assert_eq!(s.mmu.counters().syncs, 1);
    // A fault on an unsync page replaces a stale leaf by itself.
    s.guest.map(0, 0x306, Level::L4K, RWX).unwrap();
    s.mmu.guest_table_written(Gfn(table));
    let t = s
        .mmu
        .fault(&mut s.caches, &mut s.vcpu, Gpa(0), AccessKind::Read)
        .unwrap();
    assert_eq!(t.hpa, Hpa((HOST + 0x306) << 12));
    checked(&s.mmu);
    all_freed(s);
}

#[test]
fn a_write_to_an_upper_guest_table_zaps_its_shadow() {
    let mut s = setup(ShadowConfig::default());
    let written = s.guest.map(0, 0x300, Level::L4K, RWX).unwrap();
    s.mmu
        .fault(&mut s.caches, &mut s.vcpu, Gpa(0), AccessKind::Write)
        .unwrap();
    assert_eq!(s.mmu.shadow_pages(), 4);
    // written[2] is the guest page directory.
    assert_eq!(s.mmu.guest_table_written(Gfn(written[2])), 1);
    // The directory's page and the 4K page below it (now parentless) go.
    assert_eq!(s.mmu.shadow_pages(), 2);
    assert!(s.mmu.translate(&s.vcpu, Gpa(0)).is_none());
    s.mmu
        .fault(&mut s.caches, &mut s.vcpu, Gpa(0), AccessKind::Write)
        .unwrap();
    assert_eq!(s.mmu.shadow_pages(), 4);
    checked(&s.mmu);
    all_freed(s);
}

#[test]
fn zapping_a_root_in_use_invalidates_it_until_the_vcpu_lets_go() {
    let mut s = setup(ShadowConfig::default());
    map_2m(&s);
    s.mmu
        .fault(&mut s.caches, &mut s.vcpu, Gpa(0), AccessKind::Write)
        .unwrap();
    let root = s.vcpu.root_hpa().unwrap();
    s.mmu.zap_all();
    let info = s.mmu.shadow_page(root).unwrap();
    assert!(info.invalid);
    assert_eq!(s.mmu.shadow_pages(), 1, "only the invalid root is left");
    assert_eq!(checked(&s.mmu), PageStats::default());
    s.mmu
        .fault(&mut s.caches, &mut s.vcpu, Gpa(0), AccessKind::Write)
        .unwrap();
    assert_ne!(s.vcpu.root_hpa(), Some(root), "a new root was loaded");
    assert!(s.mmu.shadow_page(root).is_none(), "the old root was freed");
    let new_root = s.vcpu.root_hpa().unwrap();
    s.mmu.unload_root(&mut s.vcpu);
    assert_eq!(s.vcpu.root_hpa(), None);
    assert_eq!(s.mmu.shadow_page(new_root).unwrap().root_count, 0);
    all_freed(s);
}

#[test]
fn classic_dirty_logging_splits_eagerly_and_logs_every_write() {
    let mut s = setup(ShadowConfig::default());
    map_2m(&s);
    fault_all(&mut s, SLOT_PAGES, 512);
    let stats = checked(&s.mmu);
    assert_eq!(stats.pages_2m * 512, SLOT_PAGES);
    s.mmu.enable_dirty_logging(0, LogMode::Classic).unwrap();
    let stats = checked(&s.mmu);
    assert_eq!(stats.pages_2m + stats.pages_1g, 0);
    assert!(stats.pages_4k >= SLOT_PAGES);
    assert_eq!(
        s.mmu
            .get_dirty_log(0)
            .unwrap()
            .iter()
            .map(|w| w.count_ones())
            .sum::<u32>(),
        0
    );
    for round in 0..2u64 {
        let written: Vec<u64> = (0..SLOT_PAGES).filter(|p| p % 7 == round).collect();
        for &page in &written {
            s.mmu
                .write(&mut s.caches, &mut s.vcpu, Gpa(page << 12))
                .unwrap();
        }
        let log = s.mmu.get_dirty_log(0).unwrap();
        for page in 0..SLOT_PAGES {
            let dirty = log[(page / 64) as usize] & (1 << (page % 64)) != 0;
            assert_eq!(dirty, written.contains(&page), "page {page} round {round}");
        }
    }
    s.mmu.disable_dirty_logging(0).unwrap();
    fault_all(&mut s, SLOT_PAGES, 512);
    assert_eq!(checked(&s.mmu).pages_2m, 8, "huge pages return");
    all_freed(s);
}

#[test]
fn manual_protect_splits_at_the_first_clear_only() {
    let mut s = setup(ShadowConfig::default());
    map_2m(&s);
    fault_all(&mut s, SLOT_PAGES, 512);
    s.mmu
        .enable_dirty_logging(0, LogMode::ManualInitiallySet)
        .unwrap();
    assert_eq!(checked(&s.mmu).pages_2m, 8, "nothing splits at enable");
    let log = s.mmu.get_dirty_log(0).unwrap();
    assert!(log.iter().all(|&w| w == !0), "initially set");
    // Clear the first 2M region only.
    s.mmu.clear_dirty_log(0, 0, &[!0; 8]).unwrap();
    let stats = checked(&s.mmu);
    assert_eq!((stats.pages_2m, stats.pages_4k), (7, 512));
    s.mmu
        .write(&mut s.caches, &mut s.vcpu, Gpa(0x3000))
        .unwrap();
    let log = s.mmu.get_dirty_log(0).unwrap();
    assert_eq!(log[0], 1 << 3);
    assert_eq!(log[8], !0, "uncleared pages stay set");
    assert!(matches!(
        s.mmu.clear_dirty_log(0, 3, &[1]),
        Err(ShadowError::Memslot(_))
    ));
    all_freed(s);
}

#[test]
fn lazy_mode_splits_one_write_at_a_time() {
    let mut s = setup(ShadowConfig {
        eager_split: false,
        ..ShadowConfig::default()
    });
    map_2m(&s);
    fault_all(&mut s, SLOT_PAGES, 512);
    s.mmu.enable_dirty_logging(0, LogMode::Classic).unwrap();
    assert_eq!(checked(&s.mmu).pages_2m, 8, "write-protected, not split");
    s.mmu
        .write(&mut s.caches, &mut s.vcpu, Gpa(0x5000))
        .unwrap();
    let stats = checked(&s.mmu);
    assert_eq!((stats.pages_2m, stats.pages_4k), (7, 1));
    assert_eq!(s.mmu.counters().lazy_splits, 1);
    let log = s.mmu.get_dirty_log(0).unwrap();
    assert_eq!(log[0], 1 << 5);
    all_freed(s);
}

#[test]
fn removing_a_memslot_zaps_its_leaves_and_guest_tables() {
    let mut s = setup(ShadowConfig::default());
    map_2m(&s);
    fault_all(&mut s, SLOT_PAGES, 512);
    s.mmu.remove_memslot(0).unwrap();
    assert_eq!(checked(&s.mmu), PageStats::default());
    assert!(matches!(
        s.mmu
            .fault(&mut s.caches, &mut s.vcpu, Gpa(0), AccessKind::Write),
        Err(ShadowError::NoSlot { gfn: Gfn(0) })
    ));
    assert!(s.mmu.remove_memslot(0).is_err());
    all_freed(s);
}

#[test]
fn cache_minimums_are_the_kernels() {
    let members: Vec<_> = ShadowCaches::MEMBERS
        .iter()
        .map(|&(name, min, _)| (name, min))
        .collect();
    assert_eq!(members, [("descriptors", 6), ("headers", 5), ("tables", 5)]);
    assert_eq!((SPLIT_DESC_MIN, SPLIT_DESC_CAPACITY), (513, 553));
}

/// `KVM_CLEAR_DIRTY_LOG` on the shadow MMU follows the kernel's per-word
/// rule: only bits set in the log and the mask are cleared, and only from
/// the first to the last of them in each word is split and protected.
#[test]
fn clear_dirty_log_splits_per_word_only_what_it_cleared() {
    let mut s = setup(ShadowConfig::default());
    map_2m(&s);
    // L1 pages [0, 8M): four 2M shadow leaves.
    fault_all(&mut s, 2048, 512);
    assert_eq!(checked(&s.mmu).pages_2m, 4);
    s.mmu
        .enable_dirty_logging(0, LogMode::ManualInitiallySet)
        .unwrap();
    s.mmu.clear_dirty_log(0, 0, &[0; 64]).unwrap();
    assert_eq!(checked(&s.mmu).pages_2m, 4, "an all-zero mask does nothing");
    let mut mask = [0u64; 32];
    mask[0] = 1;
    mask[31] = 1 << 63;
    s.mmu.clear_dirty_log(0, 0, &mask).unwrap();
    let stats = checked(&s.mmu);
    assert_eq!(
        (stats.pages_2m, stats.pages_4k),
        (2, 1024),
        "pages 0 and 2047"
    );
    assert_eq!(s.mmu.counters().splits, 2);
    // Bit 0 is clear in the log already: this clear splits nothing.
    s.mmu.clear_dirty_log(0, 0, &[1]).unwrap();
    assert_eq!(s.mmu.counters().splits, 2);
    s.mmu.unload_root(&mut s.vcpu);
    all_freed(s);
}

/// Eager splitting under dirty logging is best effort: with the allocator
/// failing, enabling succeeds, the huge leaves are write-protected whole
/// and counted, and the write faults later map 4K pages.
#[test]
fn eager_splitting_falls_back_to_write_protection_when_memory_runs_out() {
    use mmu_cache::alloc::{FailPolicy, FailingAllocator};
    let failing = Arc::new(FailingAllocator::new(
        ChunkAllocator::anonymous(),
        FailPolicy::Never,
    ));
    let mmu = ShadowMmu::new(
        PagePool::from_shared(failing.clone(), None),
        ShadowConfig::default(),
    )
    .unwrap();
    mmu.add_memslot(Memslot::new(0, Gfn(0), SLOT_PAGES, Pfn(HOST)).unwrap())
        .unwrap();
    let guest = Arc::new(GuestEpt::new(4, TABLES).unwrap());
    guest.map(0, 0, Level::L2M, RWX).unwrap();
    let mut vcpu = Vcpu::new(0, guest);
    let mut caches = mmu.new_caches();
    mmu.fault(&mut caches, &mut vcpu, Gpa(0), AccessKind::Write)
        .unwrap();
    failing.set_policy(FailPolicy::Always);
    mmu.enable_dirty_logging(0, LogMode::Classic).unwrap();
    assert_eq!(checked(&mmu).pages_2m, 1);
    assert_eq!(mmu.counters().split_fallbacks, 1);
    assert_eq!(mmu.translate(&vcpu, Gpa(0x5000)).unwrap().perms & WRITE, 0);
    mmu.fault(&mut caches, &mut vcpu, Gpa(0x5000), AccessKind::Write)
        .unwrap();
    assert_eq!(mmu.translate(&vcpu, Gpa(0x5000)).unwrap().level, Level::L4K);
    assert_eq!(mmu.get_dirty_log(0).unwrap()[0], 1 << 5);
    failing.set_policy(FailPolicy::Never);
    mmu.unload_root(&mut vcpu);
}
