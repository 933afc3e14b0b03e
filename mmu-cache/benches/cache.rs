//! Criterion groups for the memory cache: alloc from a topped-up cache,
//! page_get per allocator, topup with init_value, and the memset bound.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use mmu_cache::alloc::{ChunkAllocator, HeapAllocator, PageAllocator};
use mmu_cache::{PAGE_SIZE, Page, PageCache, PagePool};

const BATCH: u64 = 40;

fn alloc(c: &mut Criterion) {
    let pool = PagePool::new(ChunkAllocator::anonymous());
    let mut cache: PageCache = PageCache::new(pool);
    cache.topup(40).unwrap();
    c.bench_function("alloc_from_topped_up_cache", |b| {
        b.iter_custom(|iters| {
            let mut held: Vec<Page> = Vec::with_capacity(BATCH as usize);
            let mut total = Duration::ZERO;
            let batches = iters.div_ceil(BATCH);
            for _ in 0..batches {
                let start = Instant::now();
                for _ in 0..BATCH {
                    held.push(black_box(cache.alloc().unwrap()));
                }
                total += start.elapsed();
                held.drain(..).for_each(|page| cache.free(page));
            }
            total.mul_f64(iters as f64 / (batches * BATCH) as f64)
        })
    });
}

fn page_get(c: &mut Criterion) {
    let mut group = c.benchmark_group("page_get");
    let allocators: [(&str, Box<dyn PageAllocator>); 2] = [
        ("chunk_anonymous", Box::new(ChunkAllocator::anonymous())),
        ("heap", Box::new(HeapAllocator::new())),
    ];
    for (name, allocator) in &allocators {
        group.bench_function(*name, |b| {
            b.iter(|| {
                let page = allocator.page_get().unwrap();
                // SAFETY: the page is not used after this.
                unsafe { allocator.page_free(black_box(page)) }.unwrap();
            })
        });
    }
    group.finish();
}

fn topup(c: &mut Criterion) {
    let pool = PagePool::new(ChunkAllocator::anonymous());
    let mut cache: PageCache = PageCache::new(pool.clone()).with_init_value(1 << 63);
    c.bench_function("topup_40_init_value", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                cache.topup(40).unwrap();
                total += start.elapsed();
                cache.free_all();
            }
            total
        })
    });
    let pages: Vec<Page> = (0..40).map(|_| pool.get().unwrap()).collect();
    c.bench_function("memset_40_pages", |b| {
        b.iter(|| {
            for page in &pages {
                // SAFETY: each page is PAGE_SIZE writable bytes owned here.
                unsafe { std::ptr::write_bytes(black_box(page.as_ptr()), 0x80, PAGE_SIZE) };
            }
        })
    });
}

criterion_group!(benches, alloc, page_get, topup);
criterion_main!(benches);
