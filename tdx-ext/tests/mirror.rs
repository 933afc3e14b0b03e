//! The mirror: the module's S-EPT follows the TDP MMU through faults, zaps,
//! splits and teardown; the removal and demote orders; BUSY and failures;
//! page ownership and accounting.

mod common;

use common::{assert_mirrored, td, teardown_and_check};
use split::AccessKind;
use split::{Entry, ExternalPageTable, Level, TableRef};
use split::{Gfn, Gpa, Hpa, Pfn};
use tdx_ext::pamt::PamtPolicy;
use tdx_ext::{PageState, Seamcall, TdxModule, TdxStatus};

const POLICIES: [PamtPolicy; 2] = [PamtPolicy::OnInstall, PamtPolicy::OnCacheEntry];

#[test]
fn faults_zaps_and_teardown_keep_the_sept_identical_and_return_every_page() {
    for policy in POLICIES {
        for (pfn_offset, leaf) in [(0, Level::L2M), (1, Level::L4K)] {
            let t = td(policy, 4096, pfn_offset);
            let mut vcpu = t.mmu.new_vcpu_caches();
            for gpa in (0..16u64 << 20).step_by(0x3_1000) {
                t.mmu.fault(&mut vcpu, Gpa(gpa), AccessKind::Write).unwrap();
            }
            assert_eq!(t.mmu.translate(Gpa(0)).unwrap().level, leaf);
            assert_mirrored(&t);
            assert!(t.account.charged() > 0, "S-EPT and PAMT pages are charged");
            t.mmu.zap_range(Gfn(0), Gfn(1024)).unwrap();
            assert_mirrored(&t);
            t.mmu.zap_range(Gfn(0), Gfn(1 << 36)).unwrap();
            assert_mirrored(&t);
            assert_eq!(t.mmu.live_tables(), 0);
            for gpa in (0..8u64 << 20).step_by(0x2_0000) {
                t.mmu.fault(&mut vcpu, Gpa(gpa), AccessKind::Write).unwrap();
            }
            assert_mirrored(&t);
            teardown_and_check(t, vec![vcpu]);
        }
    }
}

#[test]
fn a_removal_is_block_track_kick_remove_wbinvd_then_the_pamt_reference() {
    let t = td(PamtPolicy::OnInstall, 1024, 1);
    let mut vcpu = t.mmu.new_vcpu_caches();
    t.mmu
        .fault(&mut vcpu, Gpa(0x5000), AccessKind::Write)
        .unwrap();
    let page = t.mmu.translate(Gpa(0x5000)).unwrap().hpa;
    let pamt = t.mirror.pamt();
    assert_eq!(pamt.refcount(page), 1);
    let before: Vec<u64> = [
        Seamcall::MemRangeBlock,
        Seamcall::MemTrack,
        Seamcall::MemPageRemove,
        Seamcall::PhymemPageWbinvd,
    ]
    .iter()
    .map(|&leaf| t.module.calls(leaf))
    .collect();
    // REMOVE before the TRACK epoch completes is refused by the module...
    t.module.range_block(Gpa(0x5000), Level::L4K).unwrap();
    assert_eq!(
        t.module.page_remove(Gpa(0x5000), Level::L4K),
        Err(TdxStatus::TlbTrackingNotDone)
    );
    // ...so a fresh leaf goes through the whole order.
    t.mmu
        .fault(&mut vcpu, Gpa(0x6000), AccessKind::Write)
        .unwrap();
    let other = t.mmu.translate(Gpa(0x6000)).unwrap().hpa;
    t.mmu.zap_range(Gfn(6), Gfn(7)).unwrap();
    let after: Vec<u64> = [
        Seamcall::MemRangeBlock,
        Seamcall::MemTrack,
        Seamcall::MemPageRemove,
        Seamcall::PhymemPageWbinvd,
    ]
    .iter()
    .map(|&leaf| t.module.calls(leaf))
    .collect();
    assert_eq!(
        after
            .iter()
            .zip(&before)
            .map(|(a, b)| a - b)
            .collect::<Vec<_>>(),
        [2, 1, 2, 1],
        "one extra BLOCK and REMOVE were the refused attempt above"
    );
    assert_eq!(
        t.module.page_state(other),
        None,
        "the page is the host's again"
    );
    assert_eq!(
        pamt.refcount(page),
        1,
        "the blocked page keeps its reference"
    );
    assert_eq!(
        t.module.page_state(page),
        Some(PageState::Guest { level: 1 })
    );
}

#[test]
fn busy_is_retried_once_after_a_kick() {
    let t = td(PamtPolicy::OnInstall, 1024, 1);
    let mut vcpu = t.mmu.new_vcpu_caches();
    t.mmu
        .fault(&mut vcpu, Gpa(0x5000), AccessKind::Write)
        .unwrap();
    t.module
        .inject(Seamcall::MemPageRemove, 1, TdxStatus::OperandBusy, 1);
    t.mmu.zap_range(Gfn(5), Gfn(6)).unwrap();
    assert_eq!(t.mirror.counters().busy_retries, 1);
    assert!(t.mmu.translate(Gpa(0x5000)).is_none());
    assert_mirrored(&t);
    teardown_and_check(t, vec![vcpu]);
}

#[test]
fn a_failing_seamcall_leaves_mirror_sept_and_pamt_unchanged() {
    for policy in POLICIES {
        let t = td(policy, 1024, 1);
        let mut vcpu = t.mmu.new_vcpu_caches();
        t.mmu.fault(&mut vcpu, Gpa(0), AccessKind::Write).unwrap();
        let pamt_before = t.mirror.pamt().counters();
        let tables = t.mmu.live_tables();
        // A new 4K leaf in the same table: AUG refused.
        t.module
            .inject(Seamcall::MemPageAug, 1, TdxStatus::OperandInvalid, 1);
        assert!(
            t.mmu
                .fault(&mut vcpu, Gpa(0x1000), AccessKind::Write)
                .is_err()
        );
        assert!(t.mmu.translate(Gpa(0x1000)).is_none());
        assert_mirrored(&t);
        assert_eq!(t.mirror.pamt().counters().regions, pamt_before.regions);
        // A new table: SEPT.ADD refused twice (BUSY, then BUSY on the retry).
        t.module
            .inject(Seamcall::MemSeptAdd, 1, TdxStatus::OperandBusy, 2);
        let far = 1u64 << 30;
        t.mmu
            .add_memslot(split::Memslot::new(1, Gfn(far >> 12), 512, Pfn((2 << 20) + 1)).unwrap())
            .unwrap();
        let result = t.mmu.fault(&mut vcpu, Gpa(far), AccessKind::Write);
        // Busy is the retryable kind: the MMU retries the fault, which then works.
        assert!(result.is_ok(), "{result:?}");
        assert!(t.mirror.counters().busy_retries >= 1);
        assert_mirrored(&t);
        assert!(t.mmu.live_tables() > tables);
        assert_eq!(t.mirror.pamt().counters().leaked_pages, 0);
        teardown_and_check(t, vec![vcpu]);
    }
}

#[test]
fn demote_splits_a_private_2m_leaf_under_the_write_lock_only() {
    for policy in POLICIES {
        let t = td(policy, 1024, 0);
        let mut vcpu = t.mmu.new_vcpu_caches();
        t.mmu
            .fault(&mut vcpu, Gpa(0x20_0000), AccessKind::Write)
            .unwrap();
        let huge = t.mmu.translate(Gpa(0x20_0000)).unwrap();
        assert_eq!(huge.level, Level::L2M);
        assert_eq!(
            t.mirror.pamt().refcount(huge.hpa),
            0,
            "2M pages need no 4K PAMT"
        );
        let (blocks, tracks) = (
            t.module.calls(Seamcall::MemRangeBlock),
            t.module.calls(Seamcall::MemTrack),
        );
        assert_eq!(
            t.mmu
                .split_huge_pages(Gfn(512), Gfn(1024), Level::L4K)
                .unwrap(),
            1
        );
        assert_eq!(t.module.calls(Seamcall::MemPageDemote), 1);
        assert_eq!(t.module.calls(Seamcall::MemRangeBlock), blocks + 1);
        assert_eq!(t.module.calls(Seamcall::MemTrack), tracks + 1);
        assert_eq!(t.mirror.pamt().refcount(huge.hpa), 512);
        assert_eq!(t.module.leaves().len(), 512);
        assert_mirrored(&t);
        // The hook refuses a demote without the write lock.
        let err = t
            .mirror
            .split_leaf(
                Gfn(0),
                Level::L2M,
                Entry::NON_PRESENT,
                TableRef {
                    hpa: Hpa(0),
                    external: Some(Hpa(0)),
                },
                false,
            )
            .unwrap_err();
        assert!(err.to_string().contains("write"), "{err}");
        teardown_and_check(t, vec![vcpu]);
    }
}

#[test]
fn pamt_pages_and_table_pages_are_told_apart_at_run_time() {
    let t = td(PamtPolicy::OnInstall, 1024, 1);
    let mut vcpu = t.mmu.new_vcpu_caches();
    t.mmu.fault(&mut vcpu, Gpa(0), AccessKind::Write).unwrap();
    // A page holding PAMT, offered as an S-EPT page, is refused by the module.
    let guest = t.mmu.translate(Gpa(0)).unwrap().hpa;
    let [pamt_held, _] = t
        .module
        .pamt_pair(guest.align_down(2 << 20))
        .expect("the guest page's region has a 4K PAMT");
    assert_eq!(t.module.page_state(pamt_held), Some(PageState::Pamt));
    assert_eq!(
        t.module.sept_add(Gpa(1 << 39), Level::L1G, pamt_held),
        Err(TdxStatus::PageMetadataIncorrect)
    );
    let mut cache = t.mirror.pamt().new_cache();
    cache.topup(1).unwrap();
    let pamt_page = cache.alloc().unwrap();
    // The untyped path: a PAMT page freed into the S-EPT pool is refused.
    let table_pool = t.mirror.external_pool().unwrap();
    let raw = pamt_page.into_raw();
    // SAFETY: the pool checks ownership before touching the page; the page
    // is a live PAMT-pool page that the table pool did not hand out.
    let refused = unsafe { table_pool.free_raw(raw) };
    assert!(
        matches!(refused, Err(mmu_cache::alloc::AllocError::NotOwned { .. })),
        "{refused:?}"
    );
    // SAFETY: the page came from the PAMT pool by `into_raw` above and was
    // not freed (the table pool refused it).
    let page = unsafe {
        mmu_cache::Page::<tdx_ext::pamt::PamtPage>::from_raw(t.mirror.pamt().pool().clone(), raw)
    };
    drop(page);
    drop(cache);
    teardown_and_check(t, vec![vcpu]);
}

/// Under Dynamic PAMT a DEMOTE takes the 4K PAMT pair of the range as its
/// own operands: no PAMT.ADD is made for the range, and the pair is the
/// range's 4K PAMT afterwards, with one reference per 4K child.
#[test]
fn demote_hands_the_module_the_ranges_pamt_pair() {
    for policy in POLICIES {
        let t = td(policy, 1024, 0);
        let mut vcpu = t.mmu.new_vcpu_caches();
        t.mmu
            .fault(&mut vcpu, Gpa(0x20_0000), AccessKind::Write)
            .unwrap();
        let huge = t.mmu.translate(Gpa(0x20_0000)).unwrap().hpa;
        let adds = t.module.calls(Seamcall::PhymemPamtAdd);
        t.mmu
            .split_huge_pages(Gfn(512), Gfn(1024), Level::L4K)
            .unwrap();
        // At most the new S-EPT page's own range (OnInstall) is added; a
        // PAMT.ADD of the guest range would be refused (HPA_RANGE_NOT_FREE).
        assert!(t.module.calls(Seamcall::PhymemPamtAdd) - adds <= 1);
        assert_eq!(t.module.failures(Seamcall::PhymemPamtAdd), 0);
        let pair = t.module.pamt_pair(huge).expect("the range has a 4K PAMT");
        assert_eq!(t.module.page_state(pair[0]), Some(tdx_ext::PageState::Pamt));
        assert_eq!(t.mirror.pamt().refcount(huge), 512);
        assert_mirrored(&t);
        teardown_and_check(t, vec![vcpu]);
    }
}

/// A DEMOTE or a removal that fails after its BLOCK is undone with
/// TDH.MEM.RANGE.UNBLOCK: the S-EPT entry is as it was (not blocked), the
/// PAMT pair goes back to the cache, and a later attempt works.
#[test]
fn a_failure_after_block_unblocks_the_entry() {
    for policy in POLICIES {
        let t = td(policy, 1024, 0);
        let mut vcpu = t.mmu.new_vcpu_caches();
        t.mmu
            .fault(&mut vcpu, Gpa(0x20_0000), AccessKind::Write)
            .unwrap();
        t.module
            .inject(Seamcall::MemPageDemote, 1, TdxStatus::OperandInvalid, 1);
        assert!(
            t.mmu
                .split_huge_pages(Gfn(512), Gfn(1024), Level::L4K)
                .is_err()
        );
        assert_eq!(t.module.calls(Seamcall::MemRangeUnblock), 1);
        assert!(
            !t.module.leaves()[&(2, Gpa(0x20_0000))].1,
            "unblocked after the failed DEMOTE"
        );
        assert_mirrored(&t);
        assert_eq!(
            t.mmu
                .split_huge_pages(Gfn(512), Gfn(1024), Level::L4K)
                .unwrap(),
            1
        );
        assert_mirrored(&t);
        // A removal refused after its BLOCK: the leaf stays, unblocked.
        t.module
            .inject(Seamcall::MemPageRemove, 1, TdxStatus::OperandInvalid, 1);
        assert!(t.mmu.zap_range(Gfn(0x200), Gfn(0x201)).is_err());
        assert!(!t.module.leaves()[&(1, Gpa(0x20_0000))].1, "unblocked");
        assert_eq!(t.module.calls(Seamcall::MemRangeUnblock), 2);
        assert_mirrored(&t);
        teardown_and_check(t, vec![vcpu]);
    }
}

/// OPERAND_BUSY from the PAMT.ADD of a fault is retried like the other
/// SEAMCALLs of the fault path.
#[test]
fn a_busy_pamt_add_on_the_fault_path_is_retried() {
    let t = td(PamtPolicy::OnInstall, 1024, 1);
    let mut vcpu = t.mmu.new_vcpu_caches();
    t.module
        .inject(Seamcall::PhymemPamtAdd, 1, TdxStatus::OperandBusy, 3);
    t.mmu
        .fault(&mut vcpu, Gpa(0x5000), AccessKind::Write)
        .unwrap();
    assert_eq!(t.mirror.pamt().counters().busy_retries, 3);
    assert_mirrored(&t);
    teardown_and_check(t, vec![vcpu]);
}

/// TDX maps private memory with 4K and 2M pages only: the mirror MMU caps
/// its leaves at 2M even where the memslot could take a 1G leaf, and the
/// module refuses a 1G AUG.
#[test]
fn private_leaves_stop_at_2m() {
    let t = td(PamtPolicy::OnInstall, 1 << 18, 0);
    let mut vcpu = t.mmu.new_vcpu_caches();
    let leaf = t
        .mmu
        .fault(&mut vcpu, Gpa(0x1234_5000), AccessKind::Write)
        .unwrap();
    assert_eq!(leaf.level, Level::L2M);
    assert_eq!(t.mmu.page_stats().pages_1g, 0);
    assert_eq!(
        t.module
            .page_aug(Gpa(0x4000_0000), Level::L1G, Hpa(1 << 40)),
        Err(TdxStatus::OperandInvalid)
    );
    assert_mirrored(&t);
    teardown_and_check(t, vec![vcpu]);
}

/// A refused SEAMCALL reaches the MMU's caller as its own type: the hook
/// that failed, the leaf, and the module's status.
#[test]
fn a_refused_seamcall_keeps_its_leaf_and_status() {
    let t = td(PamtPolicy::OnInstall, 1024, 1);
    let mut vcpu = t.mmu.new_vcpu_caches();
    t.mmu.fault(&mut vcpu, Gpa(0), AccessKind::Write).unwrap();
    t.module
        .inject(Seamcall::MemPageAug, 1, TdxStatus::OperandInvalid, 1);
    let err = t
        .mmu
        .fault(&mut vcpu, Gpa(0x1000), AccessKind::Write)
        .unwrap_err();
    let split::MmuError::Hook(hook) = &err else {
        panic!("{err}")
    };
    assert_eq!(hook.op(), split::HookOp::SetLeaf);
    assert_eq!(
        hook.cause::<tdx_ext::SeamcallError>(),
        Some(&tdx_ext::SeamcallError {
            call: Seamcall::MemPageAug,
            status: TdxStatus::OperandInvalid
        })
    );
    teardown_and_check(t, vec![vcpu]);
}

/// KVM tops up the caches a fault needs in the faulting vCPU's own
/// `vcpu->arch` (`mmu_topup_memory_caches` in arch/x86/kvm/mmu/mmu.c, before
/// `kvm_tdp_mmu_map` takes the lock); the mirror's PAMT pages follow the
/// same rule, so one vCPU's topup never feeds or drains another's.
#[test]
fn each_vcpu_tops_up_its_own_pamt_cache_in_its_vcpu_context() {
    let t = td(PamtPolicy::OnInstall, 1024, 1);
    let mut first = t.mmu.new_vcpu_caches();
    let mut second = t.mmu.new_vcpu_caches();
    let held = |vcpu: &mut split::tdp::VcpuCaches| {
        vcpu.hook_state()
            .and_then(|state| state.as_any_mut().downcast_mut::<tdx_ext::VcpuPamtCache>())
            .expect("the mirror gives every vCPU its own PAMT cache")
            .nr_free()
    };
    assert_eq!((held(&mut first), held(&mut second)), (0, 0));
    let cached_before = t.mirror.counters().pamt_cached;
    t.mmu
        .fault(&mut first, Gpa(0x5000), AccessKind::Write)
        .unwrap();
    assert_eq!(
        t.mirror.counters().pamt_cached,
        cached_before + held(&mut first) as u64,
        "the mirror's counter sums the vCPU caches"
    );
    assert!(
        held(&mut first) > 0,
        "the topup filled the faulting vCPU's cache"
    );
    assert_eq!(held(&mut second), 0, "another vCPU's cache is untouched");
    t.mmu
        .fault(&mut second, Gpa(0x20_0000), AccessKind::Write)
        .unwrap();
    assert!(held(&mut second) > 0);
    let returned = first.free_all();
    assert!(returned > 0, "free_all hands the vCPU's PAMT pages back");
    assert_eq!(held(&mut first), 0);
    assert_eq!(
        t.mirror.counters().pamt_cached,
        cached_before + held(&mut second) as u64
    );
    drop(second);
    assert_eq!(t.mirror.counters().pamt_cached, cached_before);
    assert_mirrored(&t);
    teardown_and_check(t, vec![first]);
}
