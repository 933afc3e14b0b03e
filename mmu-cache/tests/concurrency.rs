//! Per-thread caches feeding a shared structure under a lock: the pattern of
//! vCPU threads faulting into one MMU. Runs for a couple of seconds.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use mmu_cache::alloc::{ChunkAllocator, CountingAllocator, NoAllocSection, PageAllocator};
use mmu_cache::{Account, Page, PageCache, PagePool};

#[test]
fn per_thread_caches_feed_a_shared_table_without_leaks() {
    let counting = Arc::new(CountingAllocator::new(ChunkAllocator::anonymous()));
    let account = Arc::new(Account::new("stress"));
    let pool = PagePool::from_shared(counting.clone(), Some(account.clone()));
    let shared: Arc<Mutex<Vec<Page>>> = Arc::new(Mutex::new(Vec::new()));
    let deadline = Instant::now() + Duration::from_secs(2);

    let workers: Vec<_> = (0..4)
        .map(|seed| {
            let pool = pool.clone();
            let shared = shared.clone();
            thread::spawn(move || {
                let mut cache: PageCache = PageCache::new(pool).with_init_value(1 << 63);
                let mut rounds = 0u64;
                let mut state = 0x9e37_79b9_7f4a_7c15_u64 ^ seed;
                while Instant::now() < deadline {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    let need = 1 + (state % 8) as usize;
                    cache.topup(need).expect("topup outside the lock");
                    let mut table = shared.lock().unwrap();
                    let _section = NoAllocSection::enter();
                    for _ in 0..need {
                        let page = cache.alloc().expect("topped up");
                        assert!(page.words().iter().all(|&w| w == 1 << 63));
                        table.push(page);
                    }
                    // Retire some pages, as zaps do.
                    let retire = (state >> 8) as usize % (table.len() + 1);
                    let keep = table.len() - retire.min(table.len());
                    table.truncate(keep);
                    rounds += 1;
                }
                assert_eq!(cache.stats().empty_allocs, 0);
                rounds
            })
        })
        .collect();
    let rounds: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    assert!(rounds > 0);

    let table = std::mem::take(&mut *shared.lock().unwrap());
    let distinct: HashSet<usize> = table.iter().map(Page::addr).collect();
    assert_eq!(distinct.len(), table.len(), "a page was handed out twice");
    assert_eq!(counting.pages_outstanding(), table.len());
    drop(table);
    assert_eq!(counting.pages_outstanding(), 0);
    assert_eq!(counting.gets(), counting.frees());
    assert_eq!(account.charged(), 0);
    assert_eq!(pool.free_errors(), 0);
}
