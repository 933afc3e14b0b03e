//! Topup / alloc / free / free_all on a page cache over a failing, counting
//! allocator: the counts always balance, nothing is freed twice, a topup
//! with `min` cached returns at once, and a page given back never comes out
//! stale.
#![no_main]

use std::sync::Arc;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use mmu_cache::alloc::{
    ChunkAllocator, CountingAllocator, FailPolicy, FailingAllocator, PageAllocator,
};
use mmu_cache::{Page, PageCache, PagePool};

#[derive(Arbitrary, Debug)]
enum Op {
    Topup { min: u8, capacity: u8 },
    Alloc,
    Free { index: u8 },
    FreeAll,
    Drop { index: u8 },
}

#[derive(Arbitrary, Debug)]
struct Input {
    every_kth: u8,
    init: bool,
    ops: Vec<Op>,
}

fuzz_target!(|input: Input| {
    let policy = match input.every_kth {
        0 => FailPolicy::Never,
        k => FailPolicy::EveryKth(u64::from(k % 8) + 2),
    };
    let counting = Arc::new(CountingAllocator::new(FailingAllocator::new(
        ChunkAllocator::anonymous(),
        policy,
    )));
    let pool = PagePool::from_shared(counting.clone(), None);
    let mut cache: PageCache = PageCache::new(pool);
    if input.init {
        cache = cache.with_init_value(1 << 63);
    }
    let mut held: Vec<Page> = Vec::new();
    for op in input.ops.into_iter().take(64) {
        match op {
            Op::Topup { min, capacity } => {
                let before = cache.nr_free();
                let min = usize::from(min % 64);
                let result = cache.topup_with_capacity(usize::from(capacity % 64), min);
                if before >= min {
                    // The kernel returns before any check when min is cached.
                    assert!(result.is_ok());
                    assert_eq!(cache.nr_free(), before);
                } else if result.is_ok() {
                    assert!(cache.nr_free() >= min);
                }
            }
            Op::Alloc => {
                if cache.nr_free() > 0 {
                    let page = cache.alloc().expect("a non-empty cache pops");
                    if input.init {
                        // Fresh or given back, never stale.
                        assert!(page.words().iter().all(|&w| w == 1 << 63));
                    }
                    held.push(page);
                }
            }
            Op::Free { index } => {
                if !held.is_empty() {
                    let mut page = held.swap_remove(usize::from(index) % held.len());
                    page.words_mut()[usize::from(index)] = u64::from(index);
                    cache.free(page);
                }
            }
            Op::FreeAll => {
                cache.free_all();
            }
            Op::Drop { index } => {
                if !held.is_empty() {
                    drop(held.swap_remove(usize::from(index) % held.len()));
                }
            }
        }
        assert_eq!(
            counting.pages_outstanding(),
            cache.nr_free() + held.len(),
            "pages out of the allocator == cached + held"
        );
        assert!(cache.nr_free() <= cache.capacity().max(cache.nr_free()));
    }
    drop(held);
    drop(cache);
    assert_eq!(counting.pages_outstanding(), 0);
    assert_eq!(counting.gets(), counting.frees());
});
