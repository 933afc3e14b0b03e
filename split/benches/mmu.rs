//! Criterion groups for the software MMU: eager split of one 2M leaf (per
//! table) against a memset of one page, a software access hit, a 4K fault,
//! and a shadow-MMU split of one 2M leaf without a vCPU.

use split::{Gfn, Gpa, Pfn};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use mmu_cache::alloc::ChunkAllocator;
use mmu_cache::{PAGE_SIZE, Page, PagePool};
use split::AccessKind;
use split::guest::GuestEpt;
use split::shadow::{ShadowConfig, ShadowMmu, Vcpu};
use split::{Level, Memslot, MmuConfig, TdpMmu};

/// 2M leaves per measured batch (1 GiB of guest memory).
const LEAVES: u64 = 512;

fn tdp_with_2m_leaves(pool: Arc<PagePool<split::tdp::TablePage>>) -> TdpMmu {
    let mmu = TdpMmu::new(pool, MmuConfig::default()).unwrap();
    // Host frames aligned to 2M but not 1G, so that faults map 2M leaves.
    mmu.add_memslot(Memslot::new(0, Gfn(0), LEAVES * 512, Pfn((1 << 30) + 512)).unwrap())
        .unwrap();
    let mut caches = mmu.new_vcpu_caches();
    for leaf in 0..LEAVES {
        mmu.fault(&mut caches, Gpa(leaf << 21), AccessKind::Write)
            .unwrap();
    }
    mmu
}

fn split(c: &mut Criterion) {
    let pool = PagePool::new(ChunkAllocator::anonymous());
    let mut group = c.benchmark_group("split");
    group.bench_function("tdp_2m_to_4k_per_table", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let batches = iters.div_ceil(LEAVES);
            for _ in 0..batches {
                let mmu = tdp_with_2m_leaves(pool.clone());
                let start = Instant::now();
                black_box(
                    mmu.split_huge_pages(Gfn(0), Gfn(LEAVES * 512), Level::L4K)
                        .unwrap(),
                );
                total += start.elapsed();
            }
            total.mul_f64(iters as f64 / (batches * LEAVES) as f64)
        })
    });
    group.bench_function("memset_one_page", |b| {
        let mut page: Page = pool.for_kind().get().unwrap();
        b.iter(|| {
            // SAFETY: the page is PAGE_SIZE writable bytes owned here.
            unsafe { std::ptr::write_bytes(black_box(page.as_ptr()), 0x80, PAGE_SIZE) };
            black_box(&mut page);
        })
    });
    group.bench_function("shadow_2m_to_4k_per_table", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let batches = iters.div_ceil(LEAVES);
            for _ in 0..batches {
                let mmu = ShadowMmu::new(pool.for_kind(), ShadowConfig::default()).unwrap();
                mmu.add_memslot(
                    Memslot::new(0, Gfn(0), LEAVES * 512, Pfn((1 << 30) + 512)).unwrap(),
                )
                .unwrap();
                let guest = Arc::new(GuestEpt::new(4, 1 << 30..(1 << 30) + 64).unwrap());
                for leaf in 0..LEAVES {
                    guest
                        .map(leaf * 512, leaf * 512, Level::L2M, 0b111)
                        .unwrap();
                }
                let mut vcpu = Vcpu::new(0, guest);
                let mut caches = mmu.new_caches();
                for leaf in 0..LEAVES {
                    mmu.fault(
                        &mut caches,
                        &mut vcpu,
                        Gpa(leaf << 21),
                        split::AccessKind::Write,
                    )
                    .unwrap();
                }
                let start = Instant::now();
                black_box(
                    mmu.split_huge_pages(Gfn(0), Gfn(LEAVES * 512), Level::L4K)
                        .unwrap(),
                );
                total += start.elapsed();
            }
            total.mul_f64(iters as f64 / (batches * LEAVES) as f64)
        })
    });
    group.finish();
}

fn access_and_fault(c: &mut Criterion) {
    let pool = PagePool::new(ChunkAllocator::anonymous());
    let mut group = c.benchmark_group("tdp");
    let mmu = tdp_with_2m_leaves(pool.clone());
    mmu.split_huge_pages(Gfn(0), Gfn(LEAVES * 512), Level::L4K)
        .unwrap();
    let mut gpa = 0u64;
    let mut vcpu = mmu.new_vcpu_caches();
    group.bench_function("access_hit_write", |b| {
        b.iter(|| {
            gpa = (gpa + 4096) & ((LEAVES << 21) - 1);
            black_box(mmu.access(&mut vcpu, Gpa(black_box(gpa)), AccessKind::Write))
        })
    });
    group.bench_function("fault_4k", |b| {
        b.iter_custom(|iters| {
            let mmu = TdpMmu::new(pool.for_kind(), MmuConfig::default()).unwrap();
            // Unaligned host frames: every fault maps a 4K leaf.
            mmu.add_memslot(Memslot::new(0, Gfn(0), iters.max(1), Pfn(0x12_3457)).unwrap())
                .unwrap();
            let mut caches = mmu.new_vcpu_caches();
            let start = Instant::now();
            for gfn in 0..iters {
                black_box(
                    mmu.fault(&mut caches, Gpa(gfn << 12), AccessKind::Write)
                        .unwrap(),
                );
            }
            start.elapsed()
        })
    });
    group.finish();
}

criterion_group!(benches, split, access_and_fault);
criterion_main!(benches);
