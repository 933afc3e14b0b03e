//! The MMU memory cache's rule: top up before the lock, allocate under it
//! without ever calling the allocator, and account for every page.

use std::sync::Arc;

use mmu_cache::alloc::{ChunkAllocator, CountingAllocator, PageAllocator};
use mmu_cache::{CacheError, PageCache, PagePool};

fn main() -> Result<(), CacheError> {
    let counting = Arc::new(CountingAllocator::new(ChunkAllocator::anonymous()));
    let pool = PagePool::from_shared(counting.clone(), None);
    // Non-present EPT entries: bit 63 (suppress #VE) in every word.
    let mut cache: PageCache = PageCache::new(pool).with_init_value(1 << 63);
    cache.topup(5)?; // no lock held: may allocate
    let gets = counting.gets();
    let tables: Vec<_> = (0..5).map(|_| cache.alloc()).collect::<Result<_, _>>()?;
    assert_eq!(counting.gets(), gets, "alloc never allocates");
    assert!(tables[0].words().iter().all(|&word| word == 1 << 63));
    println!(
        "{} pages taken, {} in use, {} still cached",
        counting.gets(),
        tables.len(),
        cache.nr_free()
    );
    drop(tables);
    drop(cache);
    assert_eq!(counting.pages_outstanding(), 0, "every page came back");
    Ok(())
}
