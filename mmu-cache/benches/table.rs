//! Side-by-side cost table of the memory cache, measured in one run:
//!
//! - (a) `alloc()` from a topped-up cache;
//! - (b) `page_get` straight from each allocator;
//! - (c) `topup` of 40 pages with an `init_value`, per allocator;
//! - (d) a plain memset of 40 pages already allocated: the memory-bandwidth
//!   bound for (c).
//!
//! Prints the median of many repetitions and the ratios (c)/(d) and (b)/(a).
//! Run with `cargo bench -p mmu-cache --bench table`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use mmu_cache::alloc::{ChunkAllocator, HeapAllocator, PageAllocator, SecretAllocator};
use mmu_cache::{PAGE_SIZE, Page, PageCache, PagePool};

const BATCH: usize = 40;
const REPS: usize = 3000;

/// Median nanoseconds per item of `REPS` timed batches of `BATCH` items;
/// `round` runs one batch and returns the time of its measured part.
fn median_ns_per_item(mut round: impl FnMut() -> std::time::Duration) -> f64 {
    for _ in 0..REPS / 10 {
        round();
    }
    let mut samples: Vec<f64> = (0..REPS)
        .map(|_| round().as_nanos() as f64 / BATCH as f64)
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn alloc_from_cache(pool: &Arc<PagePool>) -> f64 {
    let mut cache: PageCache = PageCache::new(pool.clone());
    cache.topup(BATCH).unwrap();
    let mut held: Vec<Page> = Vec::with_capacity(BATCH);
    median_ns_per_item(|| {
        let start = Instant::now();
        for _ in 0..BATCH {
            held.push(black_box(cache.alloc().unwrap()));
        }
        let elapsed = start.elapsed();
        for page in held.drain(..) {
            cache.free(page);
        }
        elapsed
    })
}

fn page_get(allocator: &dyn PageAllocator) -> f64 {
    let mut held = Vec::with_capacity(BATCH);
    median_ns_per_item(|| {
        let start = Instant::now();
        for _ in 0..BATCH {
            held.push(black_box(allocator.page_get().unwrap()));
        }
        let elapsed = start.elapsed();
        for page in held.drain(..) {
            // SAFETY: the page is not used after this.
            unsafe { allocator.page_free(page) }.unwrap();
        }
        elapsed
    })
}

fn topup_with_init_value(pool: &Arc<PagePool>) -> f64 {
    let mut cache: PageCache = PageCache::new(pool.clone()).with_init_value(1 << 63);
    median_ns_per_item(|| {
        let start = Instant::now();
        cache.topup(BATCH).unwrap();
        let elapsed = start.elapsed();
        black_box(cache.nr_free());
        cache.free_all();
        elapsed
    })
}

fn memset_bound(pool: &Arc<PagePool>) -> f64 {
    let pages: Vec<Page> = (0..BATCH).map(|_| pool.get().unwrap()).collect();
    median_ns_per_item(|| {
        let start = Instant::now();
        for page in &pages {
            // SAFETY: each page is PAGE_SIZE writable bytes; nothing else
            // refers to them during the write.
            unsafe { std::ptr::write_bytes(black_box(page.as_ptr()), 0x80, PAGE_SIZE) };
        }
        start.elapsed()
    })
}

fn main() {
    if std::env::args().any(|arg| arg == "--list") {
        return;
    }
    let mut allocators: Vec<(&str, Arc<dyn PageAllocator>)> = vec![
        ("chunk(anonymous)", Arc::new(ChunkAllocator::anonymous())),
        ("heap", Arc::new(HeapAllocator::new())),
    ];
    match SecretAllocator::new() {
        Ok(secret) => allocators.push(("chunk(secret)", Arc::new(secret))),
        Err(err) => println!("skipped chunk(secret): {err}"),
    }
    match ChunkAllocator::hugetlb() {
        Ok(huge) => allocators.push(("chunk(hugetlb-2M)", Arc::new(huge))),
        Err(err) => println!("skipped chunk(hugetlb-2M): {err}"),
    }

    let baseline_pool = PagePool::from_shared(allocators[0].1.clone(), None);
    let a = alloc_from_cache(&baseline_pool);
    let d = memset_bound(&baseline_pool);
    println!("mmu-cache costs, median of {REPS} batches of {BATCH} pages, ns per page");
    println!("(a) alloc() from a topped-up cache          {a:>10.2}");
    println!("(d) memset of {BATCH} allocated pages (bound)    {d:>10.2}");
    println!();
    println!(
        "{:<20} {:>12} {:>10} {:>16} {:>10}",
        "allocator", "(b) page_get", "(b)/(a)", "(c) topup+init", "(c)/(d)"
    );
    for (name, allocator) in &allocators {
        let pool = PagePool::from_shared(allocator.clone(), None);
        let b = page_get(&**allocator);
        let c = topup_with_init_value(&pool);
        println!(
            "{name:<20} {b:>12.2} {:>10.1} {c:>16.2} {:>10.2}",
            b / a,
            c / d
        );
    }
}
