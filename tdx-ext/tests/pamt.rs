//! Dynamic PAMT: one ADD for the first user of a region, one REMOVE for the
//! last, failures that leave the refcount right and the pages accounted for.

use split::Hpa;
use std::sync::Arc;

use mmu_cache::PagePool;
use mmu_cache::alloc::{ChunkAllocator, CountingAllocator, PageAllocator};
use tdx_ext::pamt::DynamicPamt;
use tdx_ext::{Seamcall, SimTdxModule, TdxStatus};

const REGION: u64 = 0x4_0000_0000;

fn setup() -> (
    Arc<SimTdxModule>,
    Arc<DynamicPamt>,
    Arc<CountingAllocator<ChunkAllocator>>,
) {
    let module = Arc::new(SimTdxModule::new(4));
    let counting = Arc::new(CountingAllocator::new(ChunkAllocator::anonymous()));
    let pamt = DynamicPamt::new(
        module.clone(),
        PagePool::from_shared(counting.clone(), None),
    );
    (module, pamt, counting)
}

#[test]
fn two_pages_in_one_region_take_one_add_and_one_remove() {
    let (module, pamt, counting) = setup();
    let mut cache = pamt.new_cache();
    cache.topup(4).unwrap();
    pamt.get(Hpa(REGION + 0x1000), &mut cache).unwrap();
    pamt.get(Hpa(REGION + 0x5000), &mut cache).unwrap();
    assert_eq!(module.calls(Seamcall::PhymemPamtAdd), 1);
    assert_eq!(pamt.refcount(Hpa(REGION)), 2);
    assert_eq!(pamt.counters().pages_in_use, 2);
    assert_eq!(pamt.counters().fast_gets, 1);
    pamt.put(Hpa(REGION + 0x1000));
    assert_eq!(module.calls(Seamcall::PhymemPamtRemove), 0);
    pamt.put(Hpa(REGION + 0x5000));
    assert_eq!(module.calls(Seamcall::PhymemPamtRemove), 1);
    assert_eq!(pamt.refcount(Hpa(REGION)), 0);
    assert_eq!(module.pamt_regions(), 0);
    cache.free_all();
    assert_eq!(counting.pages_outstanding(), 0);
}

#[test]
fn a_failed_add_leaves_refcount_zero_and_the_pages_in_the_cache() {
    let (module, pamt, counting) = setup();
    let mut cache = pamt.new_cache();
    cache.topup(2).unwrap();
    let cached = cache.nr_free();
    module.inject(
        Seamcall::PhymemPamtAdd,
        1,
        TdxStatus::PageMetadataIncorrect,
        1,
    );
    assert!(pamt.get(Hpa(REGION), &mut cache).is_err());
    assert_eq!(pamt.refcount(Hpa(REGION)), 0);
    assert_eq!(cache.nr_free(), cached, "the pair went back to the cache");
    // BUSY is retried after a kick, a bounded number of times.
    module.inject(Seamcall::PhymemPamtAdd, 1, TdxStatus::OperandBusy, 2);
    pamt.get(Hpa(REGION), &mut cache).unwrap();
    assert_eq!(pamt.counters().busy_retries, 2);
    pamt.put(Hpa(REGION));
    // Busy on the first call and on every retry: reported, nothing kept.
    let cached = cache.nr_free();
    module.inject(Seamcall::PhymemPamtAdd, 1, TdxStatus::OperandBusy, 9);
    assert!(pamt.get(Hpa(REGION), &mut cache).is_err(), "busy for good");
    assert_eq!(pamt.refcount(Hpa(REGION)), 0);
    assert_eq!(cache.nr_free(), cached);
    pamt.get(Hpa(REGION), &mut cache).unwrap();
    pamt.put(Hpa(REGION));
    cache.free_all();
    assert_eq!(counting.pages_outstanding(), 0);
}

#[test]
fn a_failed_remove_does_not_panic_keeps_the_count_and_leaks_the_pair() {
    let (module, pamt, counting) = setup();
    let mut cache = pamt.new_cache();
    cache.topup(2).unwrap();
    pamt.get(Hpa(REGION), &mut cache).unwrap();
    module.inject(Seamcall::PhymemPamtRemove, 1, TdxStatus::OperandInvalid, 1);
    pamt.put(Hpa(REGION));
    assert_eq!(pamt.refcount(Hpa(REGION)), 1);
    assert_eq!(pamt.counters().leaked_pages, 2);
    cache.free_all();
    assert_eq!(
        counting.pages_outstanding(),
        2,
        "the leaked pair never returns"
    );
}

#[test]
fn a_range_reference_counts_512_and_adds_once() {
    let (module, pamt, _) = setup();
    let mut cache = pamt.new_cache();
    cache.topup(2).unwrap();
    pamt.get_many(Hpa(REGION), 512, &mut cache).unwrap();
    assert_eq!(pamt.refcount(Hpa(REGION + 0x1f_f000)), 512);
    for i in 0..511 {
        pamt.put(Hpa(REGION + i * 0x1000));
    }
    assert_eq!(module.calls(Seamcall::PhymemPamtRemove), 0);
    pamt.put(Hpa(REGION + 511 * 0x1000));
    assert_eq!(module.calls(Seamcall::PhymemPamtRemove), 1);
}

#[test]
fn concurrent_gets_and_puts_balance() {
    let (module, pamt, counting) = setup();
    std::thread::scope(|scope| {
        for thread in 0..4u64 {
            let pamt = pamt.clone();
            scope.spawn(move || {
                let mut cache = pamt.new_cache();
                for round in 0..200u64 {
                    cache.topup(2).unwrap();
                    let page = REGION + ((thread * 7 + round) % 4) * (2 << 20);
                    pamt.get(Hpa(page), &mut cache).unwrap();
                    pamt.put(Hpa(page));
                }
                cache.free_all();
            });
        }
    });
    for region in 0..4 {
        assert_eq!(pamt.refcount(Hpa(REGION + region * (2 << 20))), 0);
    }
    assert_eq!(module.pamt_regions(), 0);
    let counters = pamt.counters();
    assert_eq!(counters.adds, counters.removes);
    assert_eq!(counting.pages_outstanding(), 0);
}
