//! Model-based property test: random sequences of topup / alloc / free /
//! free_all against a plain model of the cache.

use std::sync::Arc;

use mmu_cache::alloc::{
    ChunkAllocator, CountingAllocator, FailPolicy, FailingAllocator, PageAllocator,
};
use mmu_cache::{CacheError, Page, PageCache, PagePool};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Topup {
        min: usize,
        capacity: usize,
    },
    Alloc,
    /// Give back the held page at this index (modulo the number held).
    Free(usize),
    /// Drop the held page at this index, straight to the allocator.
    Drop(usize),
    FreeAll,
    Policy(FailPolicy),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0usize..48, prop_oneof![Just(40usize), Just(8), 1usize..64])
            .prop_map(|(min, capacity)| Op::Topup { min, capacity }),
        6 => Just(Op::Alloc),
        2 => any::<usize>().prop_map(Op::Free),
        2 => any::<usize>().prop_map(Op::Drop),
        1 => Just(Op::FreeAll),
        1 => prop_oneof![
            Just(FailPolicy::Never),
            (0u64..50).prop_map(FailPolicy::AfterN),
            (1u64..6).prop_map(FailPolicy::EveryKth),
        ]
        .prop_map(Op::Policy),
    ]
}

/// The cache as a stack of entries: `Some(addr)` where the test knows which
/// page sits there (one it gave back), `None` for pages from the allocator.
#[derive(Debug, Default)]
struct Model {
    stack: Vec<Option<usize>>,
    capacity: usize,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn cache_agrees_with_the_model(ops in prop::collection::vec(op(), 1..120)) {
        let counting = Arc::new(CountingAllocator::new(FailingAllocator::new(
            ChunkAllocator::anonymous(),
            FailPolicy::Never,
        )));
        let pool = PagePool::from_shared(counting.clone(), None);
        let mut cache: PageCache = PageCache::new(pool.clone()).with_init_value(!0);
        let mut model = Model::default();
        let mut held: Vec<Page> = Vec::new();

        for op in ops {
            match op {
                Op::Topup { min, capacity } => {
                    let before = model.stack.len();
                    let result = cache.topup_with_capacity(capacity, min);
                    let mismatch = model.capacity != 0 && model.capacity != capacity;
                    // The kernel's order: enough cached returns before any check.
                    if before >= min {
                        prop_assert!(result.is_ok());
                    } else if min > capacity {
                        let is_min_above = matches!(result, Err(CacheError::MinAboveCapacity { .. }));
                        prop_assert!(is_min_above);
                    } else if mismatch {
                        let is_mismatch = matches!(result, Err(CacheError::CapacityMismatch { .. }));
                        prop_assert!(is_mismatch);
                    } else {
                        model.capacity = capacity;
                        let after = cache.nr_free();
                        prop_assert!(after >= before && after <= capacity);
                        model.stack.resize(after, None);
                        match result {
                            Ok(()) => prop_assert!(after >= min),
                            Err(CacheError::OutOfMemory { obtained, .. }) => {
                                prop_assert!(after < min);
                                prop_assert_eq!(obtained, after);
                            }
                            Err(other) => prop_assert!(false, "unexpected {}", other),
                        }
                        if after < capacity {
                            prop_assert!(counting.get_failures() > 0);
                        }
                    }
                    prop_assert_eq!(cache.capacity(), model.capacity);
                }
                Op::Alloc => {
                    let expected = model.stack.pop();
                    match cache.alloc() {
                        Ok(page) => {
                            if let Some(Some(addr)) = expected {
                                prop_assert_eq!(page.addr(), addr, "alloc is LIFO");
                            }
                            // Fresh or given back, never stale.
                            prop_assert!(page.words().iter().all(|&w| w == !0));
                            held.push(page);
                        }
                        Err(err) => {
                            prop_assert!(expected.is_none(), "alloc failed with objects cached: {}", err);
                            let is_fallback = matches!(err, CacheError::EmptyFallbackFailed { .. });
                            prop_assert!(is_fallback);
                        }
                    }
                }
                Op::Free(index) if !held.is_empty() => {
                    let mut page = held.swap_remove(index % held.len());
                    page.words_mut()[index % 512] = index as u64;
                    if model.stack.len() < model.capacity {
                        model.stack.push(Some(page.addr()));
                    }
                    cache.free(page);
                }
                Op::Drop(index) if !held.is_empty() => {
                    held.swap_remove(index % held.len());
                }
                Op::Free(_) | Op::Drop(_) => {}
                Op::FreeAll => {
                    prop_assert_eq!(cache.free_all(), model.stack.len());
                    model = Model::default();
                }
                Op::Policy(policy) => counting.inner().set_policy(policy),
            }
            prop_assert_eq!(cache.nr_free(), model.stack.len());
            prop_assert_eq!(counting.pages_outstanding(), cache.nr_free() + held.len());
            prop_assert_eq!(counting.gets() - counting.frees(), (cache.nr_free() + held.len()) as u64);
        }
        drop(held);
        drop(cache);
        prop_assert_eq!(counting.gets(), counting.frees(), "every page came back");
        prop_assert_eq!(counting.pages_outstanding(), 0);
        prop_assert_eq!(pool.free_errors(), 0, "no page was returned twice");
    }
}
