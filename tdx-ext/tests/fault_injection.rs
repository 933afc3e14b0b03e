//! Fault injection across the crates: the failing allocator sits behind
//! every cache of a TD (the MMU's tables and headers, the S-EPT pages, the
//! PAMT pages) and fails every Kth page for K in a range. Faults, splits,
//! conversions (boundary split + zap), and teardown either succeed or
//! return an error; after a failure the MMU translates exactly as before,
//! the module's S-EPT still equals the mirror, and at the end every page is
//! back with its owner.

mod common;

use split::{Gfn, Gpa, Hpa, Pfn};
use std::collections::BTreeMap;
use std::sync::Arc;

use common::{HOST_PFN, assert_mirrored};
use mmu_cache::alloc::{
    ChunkAllocator, CountingAllocator, FailPolicy, FailingAllocator, PageAllocator,
};
use mmu_cache::{Account, PagePool};
use split::AccessKind;
use split::{Level, Memslot, MmuConfig, TdpMmu};
use tdx_ext::pamt::{DynamicPamt, PamtPolicy};
use tdx_ext::{SimTdxModule, TdxMirror};

type Failing = CountingAllocator<FailingAllocator<ChunkAllocator>>;

fn failing(k: u64) -> Arc<Failing> {
    Arc::new(CountingAllocator::new(FailingAllocator::new(
        ChunkAllocator::anonymous(),
        FailPolicy::EveryKth(k),
    )))
}

/// Where each sampled guest frame translates to (splits change leaf sizes,
/// never addresses).
fn translations(mmu: &TdpMmu) -> BTreeMap<u64, Hpa> {
    (0..4096u64)
        .step_by(7)
        .filter_map(|gfn| mmu.translate(Gpa(gfn << 12)).map(|t| (gfn, t.hpa)))
        .collect()
}

#[test]
fn every_kth_page_failing_leaves_no_leak_and_no_half_done_change() {
    for policy in [PamtPolicy::OnInstall, PamtPolicy::OnCacheEntry] {
        for k in 2..=9u64 {
            let (mmu_alloc, table_alloc, pamt_alloc) = (failing(k), failing(k + 1), failing(k + 2));
            let account = Arc::new(Account::new("td"));
            let module = Arc::new(SimTdxModule::new(4));
            let pamt = DynamicPamt::new(
                module.clone(),
                PagePool::from_shared(pamt_alloc.clone(), Some(account.clone())),
            );
            let mirror = TdxMirror::new(
                module.clone(),
                pamt,
                table_alloc.clone(),
                Some(account.clone()),
                policy,
            );
            mirror.finalize().unwrap();
            let mmu = TdpMmu::with_hooks(
                PagePool::from_shared(mmu_alloc.clone(), Some(account.clone())),
                MmuConfig {
                    split_cache_capacity: 8,
                    ..MmuConfig::default()
                },
                mirror.clone(),
            )
            .unwrap();
            mmu.add_memslot(Memslot::new(0, Gfn(0), 4096, Pfn(HOST_PFN)).unwrap())
                .unwrap();
            let mut vcpu = mmu.new_vcpu_caches();
            let t = common::Td {
                module: module.clone(),
                mirror,
                mmu,
                mmu_alloc: Arc::new(CountingAllocator::new(ChunkAllocator::anonymous())),
                table_alloc: Arc::new(CountingAllocator::new(ChunkAllocator::anonymous())),
                pamt_alloc: Arc::new(CountingAllocator::new(ChunkAllocator::anonymous())),
                account: account.clone(),
            };
            let (mut ok, mut failed) = (0, 0);
            for step in 0..60u64 {
                let before = translations(&t.mmu);
                let gpa = ((step * 2654435761) % 4096) << 12;
                let result = match step % 6 {
                    0..=2 => t
                        .mmu
                        .fault(&mut vcpu, Gpa(gpa), AccessKind::Write)
                        .map(drop),
                    3 => {
                        let first = (step * 97) % 4096;
                        t.mmu
                            .split_huge_pages(Gfn(first), Gfn(first + 512), Level::L4K)
                            .map(drop)
                    }
                    4 => {
                        let first = (step * 131) % 4096;
                        t.mmu
                            .split_cross_boundary(Gfn(first), Gfn(first + 40))
                            .map(drop)
                    }
                    _ => {
                        let first = (step * 61) % 4096;
                        t.mmu.zap_range(Gfn(first), Gfn(first + 8))
                    }
                };
                match result {
                    Ok(()) => ok += 1,
                    Err(_) => {
                        failed += 1;
                        // A failed fault or split changes no translation.
                        if step % 6 <= 4 {
                            let after = translations(&t.mmu);
                            assert!(
                                after == before,
                                "k {k} step {step}: a failed operation moved a translation"
                            );
                        }
                    }
                }
                assert_mirrored(&t);
            }
            assert!(ok > 0, "k {k}: nothing succeeded");
            assert!(failed > 0 || k > 6, "k {k}: no failure was injected");
            let report = t.mmu.teardown().unwrap();
            assert_eq!(report.external_leaked, 0);
            vcpu.free_all();
            drop(vcpu);
            let common::Td { mmu, mirror, .. } = t;
            drop(mmu);
            mirror.free_cached();
            assert_eq!(mirror.pamt().counters().leaked_pages, 0);
            assert_eq!(
                (mirror.pamt().counters().regions, module.pamt_regions()),
                (0, 0),
                "k {k} {policy:?}: PAMT regions left, counters {:?}",
                mirror.pamt().counters()
            );
            let free_errors = mirror.pamt().pool().free_errors();
            drop(mirror);
            assert_eq!(free_errors, 0, "k {k}: refused PAMT frees");
            for (name, alloc) in [
                ("MMU", &mmu_alloc),
                ("S-EPT", &table_alloc),
                ("PAMT", &pamt_alloc),
            ] {
                assert_eq!(alloc.pages_outstanding(), 0, "k {k}: {name} pages leaked");
            }
            assert_eq!(account.charged(), 0, "k {k}");
            assert_eq!(module.pamt_regions(), 0);
        }
    }
}
