//! The shadow MMU's rmaps around a split: a new direct page's run of 512
//! rmaps is recorded as the page (not written list by list), and every
//! path that reads or changes one of those rmaps sees exactly what the
//! kernel's `kvm_rmap_head`s would hold after `shadow_mmu_split_huge_page`
//! (one `__rmap_add` per child), `pte_list_remove` and
//! `rmap_write_protect`. Also the shadow-page hash (`mmu_page_hash`,
//! looked up by `kvm_mmu_find_shadow_page`), which is sized by the
//! memslots.

mod common;

use split::ept::{RWX, WRITE};
use split::shadow::{Role, ShadowConfig};
use split::{AccessKind, Gfn, Gpa, Hpa, Level, LogMode, Memslot, PageStats, Pfn};

use common::shadow::{HOST, SLOT_PAGES, Setup, all_freed, checked, fault_all, map_2m, setup};

/// A slot mapped with 2M leaves through the guest's 2M pages, then split.
fn split_slot(config: ShadowConfig) -> Setup {
    let mut s = setup(config);
    map_2m(&s);
    fault_all(&mut s, SLOT_PAGES, 512);
    let splits = s
        .mmu
        .split_huge_pages(Gfn(0), Gfn(SLOT_PAGES), Level::L4K)
        .unwrap();
    assert_eq!(splits, SLOT_PAGES / 512);
    s
}

fn all_4k() -> PageStats {
    PageStats {
        pages_4k: SLOT_PAGES,
        ..PageStats::default()
    }
}

#[test]
fn a_split_pages_rmaps_name_its_leaves_without_a_descriptor() {
    let s = split_slot(ShadowConfig::default());
    // The recount checks that every rmap entry, implied ones included,
    // names a present 4K leaf over its own frame.
    assert_eq!(checked(&s.mmu), all_4k());
    assert_eq!(s.mmu.recount().descriptors, 0);
    for gfn in [0, 1, 511, 512, 4095] {
        assert_eq!(s.mmu.rmap_len(Gfn(gfn), Level::L4K), 1, "gfn {gfn}");
        assert_eq!(s.mmu.rmap_len(Gfn(gfn), Level::L2M), 0, "gfn {gfn}");
    }
    all_freed(s);
}

#[test]
fn zapping_one_frame_writes_out_its_run_and_drops_only_that_entry() {
    let mut s = split_slot(ShadowConfig::default());
    s.mmu.zap_gfn_range(Gfn(5), Gfn(6));
    let stats = checked(&s.mmu);
    assert_eq!(stats.pages_4k, SLOT_PAGES - 1);
    assert_eq!(s.mmu.rmap_len(Gfn(5), Level::L4K), 0);
    for gfn in [4, 6, 511] {
        assert_eq!(s.mmu.rmap_len(Gfn(gfn), Level::L4K), 1, "gfn {gfn}");
    }
    assert!(s.mmu.translate(&s.vcpu, Gpa(0x5000)).is_none());
    // Without dirty logging the fault may map 2M again: as the kernel's
    // `mmu_set_spte`, the huge leaf replaces the link to the split page,
    // which loses its last parent and is zapped with its 511 leaves.
    let again = s
        .mmu
        .fault(&mut s.caches, &mut s.vcpu, Gpa(0x5000), AccessKind::Write)
        .unwrap();
    assert_eq!(
        (again.level, again.hpa),
        (Level::L2M, Hpa((HOST + 5) << 12))
    );
    let stats = checked(&s.mmu);
    assert_eq!((stats.pages_2m, stats.pages_4k), (1, SLOT_PAGES - 512));
    assert_eq!(s.mmu.rmap_len(Gfn(6), Level::L4K), 0);
    assert_eq!(s.mmu.rmap_len(Gfn(0), Level::L2M), 1);
    all_freed(s);
}

#[test]
fn dirty_logging_write_protects_every_leaf_of_an_implied_run() {
    let mut s = setup(ShadowConfig::default());
    map_2m(&s);
    fault_all(&mut s, SLOT_PAGES, 512);
    s.mmu.enable_dirty_logging(0, LogMode::Classic).unwrap();
    assert_eq!(checked(&s.mmu), all_4k());
    for ngfn in (0..SLOT_PAGES).step_by(97) {
        let leaf = s.mmu.translate(&s.vcpu, Gpa(ngfn << 12)).unwrap();
        assert_eq!(leaf.entry.bits() & WRITE, 0, "gfn {ngfn} left writable");
    }
    // Still no list was written: write protection keeps every mapping.
    assert_eq!(s.mmu.recount().descriptors, 0);
    for ngfn in [3, 700, 4095] {
        s.mmu
            .write(&mut s.caches, &mut s.vcpu, Gpa(ngfn << 12))
            .unwrap();
    }
    let log = s.mmu.get_dirty_log(0).unwrap();
    let logged: Vec<u64> = (0..SLOT_PAGES)
        .filter(|&page| log[(page / 64) as usize] & (1 << (page % 64)) != 0)
        .collect();
    assert_eq!(logged, [3, 700, 4095]);
    // Harvesting protected the three pages again, through their rmaps.
    for ngfn in [3, 700, 4095] {
        let leaf = s.mmu.translate(&s.vcpu, Gpa(ngfn << 12)).unwrap();
        assert_eq!(leaf.entry.bits() & WRITE, 0, "gfn {ngfn} left writable");
    }
    checked(&s.mmu);
    all_freed(s);
}

#[test]
fn a_split_page_zapped_whole_leaves_its_run_empty_for_the_next_split() {
    let mut s = split_slot(ShadowConfig::default());
    s.mmu.zap_all();
    assert_eq!(checked(&s.mmu), PageStats::default());
    assert_eq!(s.mmu.rmap_len(Gfn(7), Level::L4K), 0);
    fault_all(&mut s, SLOT_PAGES, 512);
    assert_eq!(checked(&s.mmu).pages_2m, SLOT_PAGES / 512);
    assert_eq!(
        s.mmu
            .split_huge_pages(Gfn(0), Gfn(SLOT_PAGES), Level::L4K)
            .unwrap(),
        SLOT_PAGES / 512
    );
    assert_eq!(checked(&s.mmu), all_4k());
    assert_eq!(s.mmu.recount().descriptors, 0);
    all_freed(s);
}

#[test]
fn a_run_emptied_list_by_list_is_split_again_with_its_lists_read() {
    let mut s = split_slot(ShadowConfig::default());
    // Zapping frame by frame writes the runs out and empties every list;
    // the next split must read them to find them empty.
    s.mmu.zap_gfn_range(Gfn(0), Gfn(SLOT_PAGES));
    assert_eq!(checked(&s.mmu), PageStats::default());
    fault_all(&mut s, SLOT_PAGES, 512);
    s.mmu
        .split_huge_pages(Gfn(0), Gfn(SLOT_PAGES), Level::L4K)
        .unwrap();
    assert_eq!(checked(&s.mmu), all_4k());
    all_freed(s);
}

#[test]
fn a_second_mapping_of_a_frame_in_an_implied_run_chains_beside_it() {
    let mut s = split_slot(ShadowConfig::default());
    // L2 page 8192 maps L1 frame 9 (inside the first split run) with a
    // read-only 4K guest mapping: a second shadow leaf over frame 9.
    s.guest.map(8192, 9, Level::L4K, RWX & !WRITE).unwrap();
    let alias = s
        .mmu
        .fault(
            &mut s.caches,
            &mut s.vcpu,
            Gpa(8192 << 12),
            AccessKind::Read,
        )
        .unwrap();
    assert_eq!(alias.hpa, Hpa((HOST + 9) << 12));
    assert_eq!(s.mmu.rmap_len(Gfn(9), Level::L4K), 2);
    assert_eq!(s.mmu.rmap_len(Gfn(10), Level::L4K), 1);
    let stats = checked(&s.mmu);
    assert_eq!(stats.pages_4k, SLOT_PAGES + 1);
    // Zapping the frame drops both leaves.
    s.mmu.zap_gfn_range(Gfn(9), Gfn(10));
    assert_eq!(s.mmu.rmap_len(Gfn(9), Level::L4K), 0);
    assert!(s.mmu.translate(&s.vcpu, Gpa(8192 << 12)).is_none());
    assert!(s.mmu.translate(&s.vcpu, Gpa(9 << 12)).is_none());
    assert_eq!(checked(&s.mmu).pages_4k, SLOT_PAGES - 1);
    all_freed(s);
}

#[test]
fn a_1g_split_implies_the_2m_run_until_its_leaves_split_in_turn() {
    let mut s = setup(ShadowConfig::default());
    let slot_base = 1u64 << 18;
    s.mmu
        .add_memslot(Memslot::new(1, Gfn(slot_base), 1 << 18, Pfn(1 << 18)).unwrap())
        .unwrap();
    s.guest.map(1 << 18, slot_base, Level::L1G, RWX).unwrap();
    s.mmu
        .write(&mut s.caches, &mut s.vcpu, Gpa(1 << 30))
        .unwrap();
    s.mmu
        .split_huge_pages(Gfn(slot_base), Gfn(2 << 18), Level::L2M)
        .unwrap();
    assert_eq!(checked(&s.mmu).pages_2m, 512);
    assert_eq!(s.mmu.rmap_len(Gfn(slot_base + 512 * 7), Level::L2M), 1);
    assert_eq!(s.mmu.recount().descriptors, 0);
    // Splitting two of the 2M leaves reads their (implied) rmaps.
    s.mmu
        .split_huge_pages(Gfn(slot_base), Gfn(slot_base + 1024), Level::L4K)
        .unwrap();
    let stats = checked(&s.mmu);
    assert_eq!((stats.pages_2m, stats.pages_4k), (510, 1024));
    assert_eq!(s.mmu.rmap_len(Gfn(slot_base), Level::L2M), 0);
    assert_eq!(s.mmu.rmap_len(Gfn(slot_base + 1024), Level::L2M), 1);
    all_freed(s);
}

#[test]
fn shadow_pages_made_before_a_large_slot_is_added_are_still_found() {
    let mut s = split_slot(ShadowConfig::default());
    let direct = Role::direct(Level::L4K, RWX);
    let before: Vec<_> = (0..SLOT_PAGES / 512)
        .map(|i| s.mmu.find_shadow_page(Gfn(i * 512), direct).unwrap())
        .collect();
    // 8 GiB more guest memory (4096 more 2 MiB regions): the hash
    // outgrows the kernel's 4096 buckets and is rebuilt with the pages it
    // already holds.
    s.mmu
        .add_memslot(Memslot::new(1, Gfn(1 << 20), 1 << 21, Pfn(1 << 30)).unwrap())
        .unwrap();
    for (i, page) in before.iter().enumerate() {
        let found = s.mmu.find_shadow_page(Gfn(i as u64 * 512), direct).unwrap();
        assert_eq!(found.hpa, page.hpa);
    }
    // The vCPU lets its root go and faults again: the root and the pages
    // below it are found in the rebuilt hash, not made a second time (the
    // faults map 2M leaves over the split pages, which go).
    let created = s.mmu.counters().pages_created;
    s.mmu.unload_root(&mut s.vcpu);
    fault_all(&mut s, SLOT_PAGES, 512);
    assert_eq!(s.mmu.counters().pages_created, created);
    assert_eq!(checked(&s.mmu).pages_2m, SLOT_PAGES / 512);
    all_freed(s);
}
