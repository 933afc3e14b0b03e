//! Every rule the software module enforces, broken by a call that gets the
//! right status, and the calls that follow the rules.

use split::Level;
use split::{Gpa, Hpa};
use tdx_ext::{PageState, Seamcall, SimTdxModule, TdxModule, TdxStatus};

use mmukit_sys::size::PAGE_2M as MB2;
/// Host pages used as S-EPT pages, PAMT pages and guest pages: fake frames.
const SEPT_REGION: u64 = 0x1_0000_0000;
const GUEST_REGION: u64 = 0x2_0000_0000;
const PAMT: u64 = 0x3_0000_0000;

fn module_with_tables() -> SimTdxModule {
    let module = SimTdxModule::new(4);
    module
        .pamt_add(Hpa(SEPT_REGION), [Hpa(PAMT), Hpa(PAMT + 0x1000)])
        .unwrap();
    module
        .sept_add(Gpa(0), Level::L1G, Hpa(SEPT_REGION))
        .unwrap();
    module
        .sept_add(Gpa(0), Level::L2M, Hpa(SEPT_REGION + 0x1000))
        .unwrap();
    module
        .sept_add(Gpa(0), Level::L4K, Hpa(SEPT_REGION + 0x2000))
        .unwrap();
    module
}

fn with_guest_pamt(module: &SimTdxModule) {
    module
        .pamt_add(Hpa(GUEST_REGION), [Hpa(PAMT + 0x2000), Hpa(PAMT + 0x3000)])
        .unwrap();
}

#[test]
fn sept_add_needs_a_parent_a_free_entry_and_a_pamt_backed_free_page() {
    let module = SimTdxModule::new(4);
    assert_eq!(
        module.sept_add(Gpa(0), Level::L1G, Hpa(SEPT_REGION)),
        Err(TdxStatus::MissingPamtPagePair),
        "not PAMT-backed"
    );
    module
        .pamt_add(Hpa(SEPT_REGION), [Hpa(PAMT), Hpa(PAMT + 0x1000)])
        .unwrap();
    assert_eq!(
        module.sept_add(Gpa(0), Level::L2M, Hpa(SEPT_REGION)),
        Err(TdxStatus::EptWalkFailed),
        "no parent"
    );
    module
        .sept_add(Gpa(0), Level::L1G, Hpa(SEPT_REGION))
        .unwrap();
    assert_eq!(
        module.sept_add(Gpa(0), Level::L1G, Hpa(SEPT_REGION + 0x1000)),
        Err(TdxStatus::EptEntryStateIncorrect),
        "the entry is used"
    );
    assert_eq!(
        module.sept_add(Gpa(0), Level::L2M, Hpa(SEPT_REGION)),
        Err(TdxStatus::PageMetadataIncorrect),
        "already an S-EPT page"
    );
    assert_eq!(
        module.sept_add(Gpa(0), Level::L2M, Hpa(PAMT)),
        Err(TdxStatus::PageMetadataIncorrect),
        "a PAMT page is not a table page"
    );
    assert_eq!(
        module.sept_add(Gpa(0x1000), Level::L2M, Hpa(SEPT_REGION + 0x1000)),
        Err(TdxStatus::OperandInvalid),
        "unaligned"
    );
    module
        .sept_add(Gpa(0), Level::L2M, Hpa(SEPT_REGION + 0x1000))
        .unwrap();
    assert_eq!(module.page_state(Hpa(SEPT_REGION)), Some(PageState::Sept));
}

#[test]
fn aug_only_after_finalize_and_add_only_before() {
    let module = module_with_tables();
    with_guest_pamt(&module);
    assert_eq!(
        module.page_aug(Gpa(0), Level::L4K, Hpa(GUEST_REGION)),
        Err(TdxStatus::LifecycleStateIncorrect)
    );
    module.page_add(Gpa(0), Hpa(GUEST_REGION)).unwrap();
    module.finalize().unwrap();
    assert_eq!(
        module.page_add(Gpa(0x1000), Hpa(GUEST_REGION + 0x1000)),
        Err(TdxStatus::LifecycleStateIncorrect)
    );
    assert_eq!(
        module.page_aug(Gpa(0), Level::L4K, Hpa(GUEST_REGION + 0x1000)),
        Err(TdxStatus::EptEntryStateIncorrect),
        "the entry is taken"
    );
    assert_eq!(
        module.page_aug(Gpa(0x1000), Level::L4K, Hpa(GUEST_REGION)),
        Err(TdxStatus::PageMetadataIncorrect),
        "the page is taken"
    );
    assert_eq!(
        module.page_aug(Gpa(0x1000), Level::L4K, Hpa(0x5_0000_0000)),
        Err(TdxStatus::MissingPamtPagePair),
        "a 4K page without 4K PAMT"
    );
    assert_eq!(
        module.page_aug(Gpa(0x20_0000), Level::L4K, Hpa(GUEST_REGION + 0x1000)),
        Err(TdxStatus::EptWalkFailed),
        "no 4K table there"
    );
    module
        .page_aug(Gpa(0x1000), Level::L4K, Hpa(GUEST_REGION + 0x1000))
        .unwrap();
    // A 2M leaf needs no 4K PAMT.
    module
        .page_aug(Gpa(0x20_0000), Level::L2M, Hpa(0x6_0000_0000))
        .unwrap();
    assert_eq!(
        module.page_state(Hpa(0x6_0000_0000 + 0x5000)),
        Some(PageState::Guest { level: 2 })
    );
}

#[test]
fn remove_needs_block_track_and_kick_then_wbinvd_returns_the_page() {
    let module = module_with_tables();
    with_guest_pamt(&module);
    module.finalize().unwrap();
    module
        .page_aug(Gpa(0), Level::L4K, Hpa(GUEST_REGION))
        .unwrap();
    assert_eq!(
        module.page_remove(Gpa(0), Level::L4K),
        Err(TdxStatus::GpaRangeNotBlocked)
    );
    assert_eq!(
        module.range_block(Gpa(0x1000), Level::L4K),
        Err(TdxStatus::EptEntryStateIncorrect),
        "a free entry"
    );
    module.range_block(Gpa(0), Level::L4K).unwrap();
    assert_eq!(
        module.range_block(Gpa(0), Level::L4K),
        Err(TdxStatus::GpaRangeAlreadyBlocked)
    );
    assert_eq!(
        module.page_remove(Gpa(0), Level::L4K),
        Err(TdxStatus::TlbTrackingNotDone),
        "no TRACK yet"
    );
    module.track().unwrap();
    assert_eq!(
        module.page_remove(Gpa(0), Level::L4K),
        Err(TdxStatus::TlbTrackingNotDone),
        "vCPUs not kicked"
    );
    module.kick_vcpus();
    assert_eq!(
        module.page_wbinvd(Hpa(GUEST_REGION)),
        Err(TdxStatus::PageMetadataIncorrect),
        "still mapped"
    );
    assert_eq!(
        module.page_remove(Gpa(0), Level::L4K),
        Ok(Hpa(GUEST_REGION))
    );
    assert_eq!(
        module.page_state(Hpa(GUEST_REGION)),
        Some(PageState::Removed)
    );
    assert_eq!(
        module.pamt_remove(Hpa(GUEST_REGION)),
        Err(TdxStatus::PamtPageNotEmpty),
        "a removed page still needs its PAMT until WBINVD"
    );
    module.page_wbinvd(Hpa(GUEST_REGION)).unwrap();
    assert_eq!(module.page_state(Hpa(GUEST_REGION)), None);
    assert_eq!(
        module.pamt_remove(Hpa(GUEST_REGION)).unwrap()[0],
        Hpa(PAMT + 0x2000)
    );
}

#[test]
fn sept_remove_needs_an_empty_blocked_tracked_page() {
    let module = module_with_tables();
    with_guest_pamt(&module);
    module.finalize().unwrap();
    module
        .page_aug(Gpa(0), Level::L4K, Hpa(GUEST_REGION))
        .unwrap();
    module.range_block(Gpa(0), Level::L2M).unwrap();
    module.track().unwrap();
    module.kick_vcpus();
    assert_eq!(
        module.sept_remove(Gpa(0), Level::L4K),
        Err(TdxStatus::EptPageNotFree)
    );
    module.range_block(Gpa(0), Level::L4K).unwrap();
    module.track().unwrap();
    module.kick_vcpus();
    module.page_remove(Gpa(0), Level::L4K).unwrap();
    assert_eq!(
        module.sept_remove(Gpa(0), Level::L4K),
        Ok(Hpa(SEPT_REGION + 0x2000))
    );
    assert_eq!(
        module.page_state(Hpa(SEPT_REGION + 0x2000)),
        Some(PageState::Removed)
    );
}

#[test]
fn demote_needs_a_blocked_tracked_leaf_a_new_page_and_takes_the_range_pamt_pair() {
    let module = module_with_tables();
    module.finalize().unwrap();
    let huge = 0x6_0000_0000;
    module
        .page_aug(Gpa(0x20_0000), Level::L2M, Hpa(huge))
        .unwrap();
    let new_page = SEPT_REGION + 0x3000;
    let pair = Some([Hpa(PAMT + 0x4000), Hpa(PAMT + 0x5000)]);
    assert_eq!(
        module.page_demote(Gpa(0x20_0000), Level::L2M, Hpa(new_page), pair),
        Err(TdxStatus::GpaRangeNotBlocked)
    );
    module.range_block(Gpa(0x20_0000), Level::L2M).unwrap();
    module.track().unwrap();
    module.kick_vcpus();
    assert_eq!(
        module.page_demote(Gpa(0x20_0000), Level::L2M, Hpa(new_page), None),
        Err(TdxStatus::MissingPamtPagePair),
        "the 4K children need the range's 4K PAMT, which DEMOTE takes"
    );
    assert_eq!(
        module.pamt_add(Hpa(huge), [Hpa(PAMT + 0x4000), Hpa(PAMT + 0x5000)]),
        Err(TdxStatus::HpaRangeNotFree),
        "no separate PAMT.ADD on a range mapped as a 2 MiB page"
    );
    assert_eq!(
        module.page_demote(Gpa(0x20_0000), Level::L2M, Hpa(0x7_0000_0000), pair),
        Err(TdxStatus::MissingPamtPagePair),
        "the new S-EPT page has no PAMT"
    );
    assert_eq!(
        module.page_demote(
            Gpa(0x20_0000),
            Level::L2M,
            Hpa(new_page),
            Some([Hpa(PAMT), Hpa(PAMT + 0x5000)])
        ),
        Err(TdxStatus::PageNotFree),
        "a pair page that holds PAMT already"
    );
    // The same page twice: `pamt_demote()` in the module's pamt_manager.c
    // checks each page alone and test-and-sets its PAMT_PAGE_BITMAP bit,
    // so the second one finds its bit set: TDX_PAGE_NOT_FREE.
    assert_eq!(
        module.page_demote(
            Gpa(0x20_0000),
            Level::L2M,
            Hpa(new_page),
            Some([Hpa(PAMT + 0x4000), Hpa(PAMT + 0x4000)])
        ),
        Err(TdxStatus::PageNotFree),
        "the same pair page twice"
    );
    assert_eq!(
        module.page_demote(
            Gpa(0x20_0000),
            Level::L2M,
            Hpa(new_page),
            Some([Hpa(PAMT + 0x4000), Hpa(PAMT + 0x5008)])
        ),
        Err(TdxStatus::OperandInvalid),
        "a pair page not 4K-aligned"
    );
    module
        .page_demote(Gpa(0x20_0000), Level::L2M, Hpa(new_page), pair)
        .unwrap();
    assert_eq!(
        module.pamt_pair(Hpa(huge)),
        pair,
        "the range has its 4K PAMT now"
    );
    assert_eq!(module.page_state(Hpa(PAMT + 0x4000)), Some(PageState::Pamt));
    let leaves = module.leaves();
    assert_eq!(leaves.len(), 512);
    for i in 0..512u64 {
        assert_eq!(
            leaves[&(1, Gpa(0x20_0000 + i * 0x1000))],
            (Hpa(huge + i * 0x1000), false)
        );
    }
    assert_eq!(
        module.pamt_remove(Hpa(huge)),
        Err(TdxStatus::PamtPageNotEmpty),
        "its 4K pages are the TD's"
    );
}

#[test]
fn aug_maps_4k_and_2m_only_and_never_over_a_used_entry() {
    let module = module_with_tables();
    module.finalize().unwrap();
    assert_eq!(
        module.page_aug(Gpa(0), Level::L1G, Hpa(0x8_0000_0000)),
        Err(TdxStatus::OperandInvalid),
        "TDX has no 1 GiB private pages"
    );
    with_guest_pamt(&module);
    module
        .page_aug(Gpa(0), Level::L4K, Hpa(GUEST_REGION))
        .unwrap();
    assert_eq!(
        module.page_aug(Gpa(0), Level::L4K, Hpa(GUEST_REGION + 0x1000)),
        Err(TdxStatus::EptEntryStateIncorrect)
    );
    assert_eq!(
        module.page_aug(Gpa(0x1000), Level::L4K, Hpa(0x9_0000_0000)),
        Err(TdxStatus::MissingPamtPagePair),
        "a 4K page in a range without a 4K PAMT"
    );
    assert_eq!(
        module.page_aug(Gpa(0x20_0000), Level::L2M, Hpa(GUEST_REGION + MB2 * 8)),
        Ok(())
    );
}

#[test]
fn unblock_undoes_a_tracked_block_and_block_needs_a_used_entry() {
    let module = module_with_tables();
    module.finalize().unwrap();
    with_guest_pamt(&module);
    assert_eq!(
        module.range_block(Gpa(0x5000), Level::L4K),
        Err(TdxStatus::EptEntryStateIncorrect),
        "a free entry"
    );
    assert_eq!(
        module.range_unblock(Gpa(0x5000), Level::L4K),
        Err(TdxStatus::EptEntryStateIncorrect)
    );
    module
        .page_aug(Gpa(0x5000), Level::L4K, Hpa(GUEST_REGION))
        .unwrap();
    assert_eq!(
        module.range_unblock(Gpa(0x5000), Level::L4K),
        Err(TdxStatus::EptEntryStateIncorrect),
        "not blocked"
    );
    module.range_block(Gpa(0x5000), Level::L4K).unwrap();
    assert_eq!(
        module.range_unblock(Gpa(0x5000), Level::L4K),
        Err(TdxStatus::TlbTrackingNotDone)
    );
    module.track().unwrap();
    module.kick_vcpus();
    module.range_unblock(Gpa(0x5000), Level::L4K).unwrap();
    assert_eq!(
        module.leaves()[&(1, Gpa(0x5000))],
        (Hpa(GUEST_REGION), false)
    );
    // Blocked again, it can be blocked, tracked and removed as before.
    module.range_block(Gpa(0x5000), Level::L4K).unwrap();
    module.track().unwrap();
    module.kick_vcpus();
    assert_eq!(
        module.page_remove(Gpa(0x5000), Level::L4K),
        Ok(Hpa(GUEST_REGION))
    );
}

#[test]
fn reclaim_only_after_the_key_is_released() {
    let module = module_with_tables();
    assert_eq!(
        module.page_reclaim(Hpa(SEPT_REGION + 0x2000)),
        Err(TdxStatus::LifecycleStateIncorrect)
    );
    module.release_key().unwrap();
    assert_eq!(
        module.sept_add(Gpa(0x20_0000), Level::L4K, Hpa(SEPT_REGION + 0x4000)),
        Err(TdxStatus::LifecycleStateIncorrect)
    );
    for page in [0x2000, 0x1000, 0] {
        module.page_reclaim(Hpa(SEPT_REGION + page)).unwrap();
    }
    assert_eq!(
        module.page_reclaim(Hpa(SEPT_REGION)),
        Err(TdxStatus::PageMetadataIncorrect)
    );
    assert_eq!(
        module.pamt_remove(Hpa(SEPT_REGION)).unwrap(),
        [Hpa(PAMT), Hpa(PAMT + 0x1000)]
    );
}

#[test]
fn pamt_add_and_remove_guard_their_pages_and_region() {
    let module = SimTdxModule::new(4);
    assert_eq!(
        module.pamt_add(Hpa(0x1000), [Hpa(PAMT), Hpa(PAMT + 0x1000)]),
        Err(TdxStatus::OperandInvalid)
    );
    module
        .pamt_add(Hpa(0), [Hpa(PAMT), Hpa(PAMT + 0x1000)])
        .unwrap();
    assert_eq!(
        module.pamt_add(Hpa(0), [Hpa(PAMT + 0x2000), Hpa(PAMT + 0x3000)]),
        Err(TdxStatus::HpaRangeNotFree)
    );
    assert_eq!(
        module.pamt_add(Hpa(MB2), [Hpa(PAMT), Hpa(PAMT + 0x2000)]),
        Err(TdxStatus::PageNotFree),
        "a page already holds PAMT"
    );
    assert_eq!(module.pamt_remove(Hpa(MB2)), Err(TdxStatus::NoPamtPagePair));
    assert_eq!(module.pamt_regions(), 1);
}

#[test]
fn injected_statuses_hit_the_nth_call_and_are_counted() {
    let module = SimTdxModule::new(4);
    module.inject(Seamcall::MemTrack, 2, TdxStatus::OperandBusy, 1);
    module.track().unwrap();
    assert_eq!(module.track(), Err(TdxStatus::OperandBusy));
    module.track().unwrap();
    assert_eq!(module.calls(Seamcall::MemTrack), 3);
    assert_eq!(module.failures(Seamcall::MemTrack), 1);
    assert_eq!(module.epoch(), 2, "the failed call did nothing");
}

/// TDH.PHYMEM.PAMT.ADD given the same page twice: the module's
/// `tdh_phymem_pamt_add()` never compares HPA0 with HPA1; it walks each
/// (free, PT_NDA) and then test-and-sets each one's PAMT_PAGE_BITMAP bit,
/// and the second test-and-set fails: TDX_PAGE_NOT_FREE (operand R8), not
/// TDX_OPERAND_INVALID. Nothing is added.
#[test]
fn pamt_add_of_the_same_page_twice_is_page_not_free() {
    let module = SimTdxModule::new(4);
    assert_eq!(
        module.pamt_add(Hpa(GUEST_REGION), [Hpa(PAMT), Hpa(PAMT)]),
        Err(TdxStatus::PageNotFree)
    );
    assert_eq!(module.pamt_pair(Hpa(GUEST_REGION)), None);
    assert_eq!(module.page_state(Hpa(PAMT)), None);
    // Misaligned is the operand check, which comes first.
    assert_eq!(
        module.pamt_add(Hpa(GUEST_REGION), [Hpa(PAMT + 8), Hpa(PAMT + 8)]),
        Err(TdxStatus::OperandInvalid)
    );
    module
        .pamt_add(Hpa(GUEST_REGION), [Hpa(PAMT), Hpa(PAMT + 0x1000)])
        .unwrap();
}
