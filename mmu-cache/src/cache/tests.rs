//! Unit tests of the memory cache and cache sets.

use std::sync::Arc;

use super::*;
use crate::alloc::{
    ChunkAllocator, CountingAllocator, FailPolicy, FailingAllocator, HeapAllocator, NoAllocSection,
    PageAllocator,
};

type Counting = CountingAllocator<FailingAllocator<ChunkAllocator>>;

fn counting_pool(policy: FailPolicy) -> (Arc<Counting>, Arc<PagePool>) {
    let counting = Arc::new(CountingAllocator::new(FailingAllocator::new(
        ChunkAllocator::anonymous(),
        policy,
    )));
    let pool = PagePool::from_shared(counting.clone(), None);
    (counting, pool)
}

fn page_cache(policy: FailPolicy) -> (Arc<Counting>, PageCache) {
    let (counting, pool) = counting_pool(policy);
    (counting, PageCache::new(pool).named("test"))
}

#[test]
fn peek_shows_the_page_alloc_returns_next_and_its_prefetch_changes_nothing() {
    let (_, mut cache) = page_cache(FailPolicy::Never);
    assert!(cache.peek().is_none());
    cache.topup_with_capacity(2, 2).unwrap();
    let next = cache.peek().map(Page::addr).unwrap();
    let words_before = *cache.peek().unwrap().words();
    cache.peek().unwrap().prefetch();
    let page = cache.alloc().unwrap();
    assert_eq!(page.addr(), next);
    assert_eq!(*page.words(), words_before);
    assert_eq!(cache.nr_free(), 1);
    drop(page);
}

#[test]
fn topup_fills_to_default_capacity_then_is_a_noop() {
    let (counting, mut cache) = page_cache(FailPolicy::Never);
    cache.topup(5).unwrap();
    assert_eq!(cache.nr_free(), DEFAULT_CAPACITY);
    assert_eq!(cache.capacity(), DEFAULT_CAPACITY);
    assert_eq!(counting.gets(), 40);
    for _ in 0..35 {
        drop(cache.alloc().unwrap());
    }
    cache.topup(5).unwrap();
    assert_eq!(cache.nr_free(), 5, "5 >= min: nothing to do");
    assert_eq!(counting.gets(), 40);
    cache.topup(6).unwrap();
    assert_eq!(cache.nr_free(), 40, "below min: fill to capacity");
    assert_eq!(counting.gets(), 75);
}

#[test]
fn topup_with_capacity_fixes_the_capacity() {
    let (_, mut cache) = page_cache(FailPolicy::Never);
    cache.topup_with_capacity(8, 2).unwrap();
    assert_eq!((cache.nr_free(), cache.capacity()), (8, 8));
    drop(cache.alloc().unwrap());
    let err = cache.topup_with_capacity(16, 8).unwrap_err();
    assert!(
        matches!(
            err,
            CacheError::CapacityMismatch {
                fixed: 8,
                requested: 16,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        cache.nr_free(),
        7,
        "contents unchanged by the refused topup"
    );
    cache.topup(1).unwrap(); // 7 >= 1: returns before the capacity check
    let err = cache.topup(8).unwrap_err();
    assert!(matches!(
        err,
        CacheError::CapacityMismatch {
            fixed: 8,
            requested: 40,
            ..
        }
    ));
    assert_eq!(cache.free_all(), 7);
    assert_eq!(cache.capacity(), 0);
    cache.topup_with_capacity(16, 1).unwrap();
    assert_eq!(cache.nr_free(), 16, "free_all unfixed the capacity");
}

#[test]
fn bad_configurations_fail_before_anything_is_allocated() {
    let (counting, mut cache) = page_cache(FailPolicy::Never);
    assert!(matches!(
        cache.topup_with_capacity(0, 1),
        Err(CacheError::ZeroCapacity { .. })
    ));
    assert!(matches!(
        cache.topup_with_capacity(4, 5),
        Err(CacheError::MinAboveCapacity {
            min: 5,
            capacity: 4,
            ..
        })
    ));
    let mut cache = cache.zeroed().with_init_value(1 << 63);
    let err = cache.topup(1).unwrap_err();
    assert!(
        matches!(err, CacheError::InitValueWithZero { init_value, .. } if init_value == 1 << 63)
    );
    assert_eq!(counting.gets() + counting.get_failures(), 0);
    assert_eq!(cache.nr_free(), 0);
}

#[test]
fn partial_fill_succeeds_once_min_is_reached() {
    let (counting, mut cache) = page_cache(FailPolicy::AfterN(10));
    cache.topup(5).unwrap();
    assert_eq!(cache.nr_free(), 10);
    assert_eq!(
        counting.get_failures(),
        1,
        "the fill stops at the first failure"
    );
}

#[test]
fn fill_below_min_fails_and_keeps_what_it_got() {
    let (counting, mut cache) = page_cache(FailPolicy::AfterN(3));
    let err = cache.topup(5).unwrap_err();
    assert!(
        matches!(
            err,
            CacheError::OutOfMemory {
                obtained: 3,
                min: 5,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("injected"), "{err}");
    assert_eq!(cache.nr_free(), 3);
    assert_eq!(counting.inner().inner().pages_outstanding(), 3);
    counting.inner().set_policy(FailPolicy::Never);
    cache.topup(5).unwrap();
    assert_eq!(cache.nr_free(), 40);
}

#[test]
fn alloc_is_lifo() {
    let (_, mut cache) = page_cache(FailPolicy::Never);
    cache.topup(1).unwrap();
    let a = cache.alloc().unwrap();
    let b = cache.alloc().unwrap();
    let (a_addr, b_addr) = (a.addr(), b.addr());
    cache.free(a);
    cache.free(b);
    assert_eq!(cache.alloc().unwrap().addr(), b_addr);
    assert_eq!(cache.alloc().unwrap().addr(), a_addr);
}

#[test]
fn alloc_never_calls_the_allocator_after_topup() {
    let (counting, mut cache) = page_cache(FailPolicy::Never);
    cache.topup(40).unwrap();
    let mut taken = Vec::new();
    {
        let _lock = NoAllocSection::enter();
        for _ in 0..40 {
            taken.push(cache.alloc().unwrap());
        }
    }
    assert_eq!(counting.gets(), 40);
    // One more under the "lock" is the caller bug the counting allocator catches.
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _lock = NoAllocSection::enter();
        cache.alloc()
    }));
    assert!(
        caught.is_err(),
        "the fallback allocation ran inside the section"
    );
}

#[test]
fn empty_alloc_is_counted_and_served_by_a_fallback() {
    let (counting, mut cache) = page_cache(FailPolicy::Never);
    let page = cache.alloc().unwrap();
    assert_eq!(cache.stats().empty_allocs, 1);
    assert_eq!(counting.gets(), 1);
    drop(page);
    counting.inner().set_policy(FailPolicy::Always);
    let err = cache.alloc().unwrap_err();
    assert!(
        matches!(err, CacheError::EmptyFallbackFailed { .. }),
        "{err}"
    );
    assert_eq!(cache.stats().empty_allocs, 2);
}

#[test]
fn init_value_fills_all_512_words_and_zeroed_pages_are_zero() {
    let pool = PagePool::new(ChunkAllocator::anonymous());
    // Dirty some pages so that reuse would show stale contents.
    let mut dirty: Vec<Page> = (0..40).map(|_| pool.get().unwrap()).collect();
    dirty.iter_mut().for_each(|page| page.fill(0xdead_beef));
    drop(dirty);
    let mut cache: PageCache = PageCache::new(pool.clone()).with_init_value(1 << 63);
    cache.topup(40).unwrap();
    for _ in 0..40 {
        let page = cache.alloc().unwrap();
        assert!(page.words().iter().all(|&word| word == 1 << 63));
    }
    let mut dirty: Vec<Page> = (0..40).map(|_| pool.get().unwrap()).collect();
    dirty.iter_mut().for_each(|page| page.fill(0xdead_beef));
    drop(dirty);
    let mut cache: PageCache = PageCache::new(pool).zeroed();
    cache.topup(40).unwrap();
    while cache.nr_free() > 0 {
        assert!(cache.alloc().unwrap().words().iter().all(|&word| word == 0));
    }
}

#[test]
fn free_all_returns_exactly_what_was_cached() {
    let (counting, mut cache) = page_cache(FailPolicy::Never);
    cache.topup(1).unwrap();
    let kept: Vec<_> = (0..7).map(|_| cache.alloc().unwrap()).collect();
    assert_eq!(cache.free_all(), 33);
    assert_eq!(counting.frees(), 33);
    assert_eq!(counting.pages_outstanding(), 7);
    drop(kept);
    assert_eq!(counting.frees(), 40);
    assert_eq!(counting.pages_outstanding(), 0);
}

#[test]
fn free_keeps_objects_up_to_the_capacity() {
    let (counting, mut cache) = page_cache(FailPolicy::Never);
    let extra: Page = PagePool::from_shared(counting.clone(), None).get().unwrap();
    cache.free(extra);
    assert_eq!(
        cache.nr_free(),
        0,
        "no capacity fixed: returned to the allocator"
    );
    assert_eq!(counting.pages_outstanding(), 0);
    cache.topup_with_capacity(2, 2).unwrap();
    let page = cache.alloc().unwrap();
    cache.free(page);
    assert_eq!(cache.nr_free(), 2);
}

#[test]
fn topup_returns_before_any_check_when_min_is_cached() {
    // __kvm_mmu_topup_memory_cache: `if (mc->nobjs >= min) return 0;`
    // comes first, so a call that needs no fill never fails.
    let (counting, mut cache) = page_cache(FailPolicy::Never);
    cache.topup_with_capacity(8, 4).unwrap();
    let gets = counting.gets();
    cache.topup_with_capacity(16, 8).unwrap();
    cache.topup_with_capacity(0, 0).unwrap();
    cache.topup_with_capacity(2, 3).unwrap();
    assert_eq!(counting.gets(), gets);
    assert!(matches!(
        cache.topup_with_capacity(16, 9),
        Err(CacheError::CapacityMismatch { fixed: 8, .. })
    ));
    let mut empty: PageCache = PageCache::new(cache.source().pool().clone())
        .zeroed()
        .with_init_value(7);
    empty.topup_with_capacity(0, 0).unwrap();
    assert!(matches!(
        empty.topup(1),
        Err(CacheError::InitValueWithZero { init_value: 7, .. })
    ));
}

#[test]
fn init_value_zero_with_zeroing_is_no_conflict() {
    let (_, cache) = page_cache(FailPolicy::Never);
    let mut cache = cache.zeroed().with_init_value(0);
    cache.topup(1).unwrap();
    assert!(cache.alloc().unwrap().words().iter().all(|&w| w == 0));
}

#[test]
fn freed_objects_come_back_with_their_fill_restored() {
    let (_, cache) = page_cache(FailPolicy::Never);
    let mut cache = cache.with_init_value(1 << 63);
    cache.topup_with_capacity(2, 1).unwrap();
    let mut page = cache.alloc().unwrap();
    page.words_mut()[17] = 0xdead;
    cache.free(page);
    let page = cache.alloc().unwrap();
    assert!(page.words().iter().all(|&w| w == 1 << 63));
    cache.free(page);

    let (_, cache) = page_cache(FailPolicy::Never);
    let mut cache = cache.zeroed();
    cache.topup_with_capacity(1, 1).unwrap();
    let mut page = cache.alloc().unwrap();
    page.words_mut()[511] = 5;
    cache.free(page);
    assert!(cache.alloc().unwrap().words().iter().all(|&w| w == 0));

    let slab = Slab::<Descriptor>::new(PagePool::new(HeapAllocator::new()), None).unwrap();
    let mut objects = ObjectCache::new(slab);
    objects.topup_with_capacity(1, 1).unwrap();
    let mut desc = objects.alloc().unwrap();
    desc.entries[3] = 9;
    desc.count = 4;
    objects.free(desc);
    let desc = objects.alloc().unwrap();
    assert_eq!((desc.entries, desc.count), ([0; 14], 0));
}

#[test]
fn accounting_charges_caches_and_refuses_past_the_limit() {
    let account = Arc::new(Account::with_limit("vm", 10 * PAGE_SIZE as u64));
    let counting = Arc::new(CountingAllocator::new(HeapAllocator::new()));
    let pool = PagePool::from_shared(counting.clone(), Some(account.clone()));
    let mut cache: PageCache = PageCache::new(pool);
    cache.topup(4).unwrap();
    assert_eq!(cache.nr_free(), 10, "filled as far as the limit allows");
    assert_eq!(account.charged(), 10 * PAGE_SIZE as u64);
    let held = cache.alloc().unwrap();
    cache.free_all();
    assert_eq!(account.charged(), PAGE_SIZE as u64);
    let mut other: PageCache = PageCache::new(PagePool::from_shared(
        counting.clone(),
        Some(account.clone()),
    ));
    let gets = counting.gets();
    let err = other.topup_with_capacity(20, 12).unwrap_err();
    let CacheError::AccountLimit {
        obtained,
        min,
        source: AccountError::LimitExceeded { asked, left, .. },
        ..
    } = &err
    else {
        panic!("unexpected {err}");
    };
    assert_eq!((*obtained, *min), (9, 12), "a charge failing part-way");
    assert_eq!((*asked, *left), (PAGE_SIZE as u64, 0));
    assert!(err.to_string().contains("9 of the 12 objects"), "{err}");
    assert_eq!(counting.gets(), gets + 9, "what the account took stays");
    assert_eq!(other.nr_free(), 9);
    other.topup_with_capacity(20, 9).unwrap();
    assert_eq!(other.free_all(), 9);
    drop(held);
    assert_eq!(account.charged(), 0);
    assert_eq!(account.peak(), 10 * PAGE_SIZE as u64);
}

#[derive(Default)]
struct Descriptor {
    entries: [u64; 14],
    count: u8,
}

#[test]
fn object_caches_serve_default_objects_and_charge_their_size() {
    let account = Arc::new(Account::new("objects"));
    let counting = Arc::new(CountingAllocator::new(HeapAllocator::new()));
    let slab = Slab::<Descriptor>::new(
        PagePool::from_shared(counting.clone(), None),
        Some(account.clone()),
    )
    .unwrap();
    let mut cache = ObjectCache::new(slab.clone());
    cache.topup_with_capacity(553, 513).unwrap();
    assert_eq!(cache.nr_free(), 553);
    let per_page = PAGE_SIZE / std::mem::size_of::<Descriptor>();
    assert_eq!(counting.gets() as usize, 553_usize.div_ceil(per_page));
    assert_eq!(
        account.charged(),
        553 * std::mem::size_of::<Descriptor>() as u64
    );
    let mut descriptor = cache.alloc().unwrap();
    assert_eq!((descriptor.count, descriptor.entries), (0, [0; 14]));
    descriptor.entries[0] = 42;
    descriptor.count = 1;
    cache.free_all();
    assert_eq!(slab.live(), 1);
    drop(descriptor);
    assert_eq!(account.charged(), 0);
    drop(cache);
    drop(slab);
    assert_eq!(counting.pages_outstanding(), 0);
}

crate::cache_set! {
    struct TestSet {
        tables: PageCache => [min 5],
        descriptors: ObjectCache<Descriptor> => [min 513, capacity 553],
    }
}

#[test]
fn cache_sets_top_up_every_member_and_name_the_failing_one() {
    let make_set = |policy| {
        let (counting, pool) = counting_pool(policy);
        let set = TestSet {
            tables: PageCache::new(pool.clone()),
            descriptors: ObjectCache::new(Slab::new(pool.for_kind(), None).unwrap()),
        };
        (counting, set)
    };
    assert_eq!(
        TestSet::MEMBERS,
        &[("tables", 5, 40), ("descriptors", 513, 553)]
    );
    let (_, mut set) = make_set(FailPolicy::Never);
    set.topup().unwrap();
    assert_eq!((set.tables.nr_free(), set.descriptors.nr_free()), (40, 553));
    assert_eq!(set.free_all(), 593);
    // 40 table pages, then one slab page of descriptors: far below 513.
    let (_, mut set) = make_set(FailPolicy::AfterN(41));
    let err = set.topup().unwrap_err();
    assert!(
        matches!(
            &err,
            CacheError::InSet {
                member: "descriptors",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(set.tables.nr_free(), 40);
    assert_eq!(
        set.descriptors.nr_free(),
        PAGE_SIZE / std::mem::size_of::<Descriptor>()
    );
}
