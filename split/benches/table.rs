//! Side-by-side costs of the software MMU, from one run:
//! eager split of 2M and of 1G leaves to 4K on the TDP MMU and of 2M leaves
//! on the shadow MMU (time per new table, GiB/s of guest memory covered)
//! against a memset of as many pages (the bandwidth bound), in paired runs
//! ([`paired_row`]), and a software dirty_log_perf_test with eager
//! splitting on and off. `MMUKIT_BENCH_GIB` sets the slot size (default 16).
//! Run with `cargo bench -p mmukit-split --bench table`; add `-- split` for
//! the split rows alone, `-- shadow` for the shadow row, `-- scaling` for
//! the fault-scaling curve over 1, 2, 4 ... threads (see [`scaling`]).

use split::{Gfn, Gpa, Pfn};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use mmu_cache::alloc::ChunkAllocator;
use mmu_cache::{PAGE_SIZE, Page, PagePool};
use split::AccessKind;
use split::guest::GuestEpt;
use split::shadow::{ShadowConfig, ShadowMmu, Vcpu};
use split::{Level, LogMode, Memslot, MmuConfig, TdpMmu};

const VCPUS: u64 = 2;

/// A pool whose first `warm_pages` pages were touched once, so that the
/// measurements below see reused memory, not the kernel's first-touch faults.
fn warm_pool(warm_pages: usize) -> std::sync::Arc<PagePool> {
    let pool = PagePool::new(ChunkAllocator::anonymous());
    let mut pages: Vec<Page> = (0..warm_pages).map(|_| pool.get().unwrap()).collect();
    pages.iter_mut().for_each(|page| page.zero());
    drop(pages);
    pool
}

/// An MMU with one slot of `gib` GiB at gpa 0 on host frames from
/// `host_base_pfn` (its alignment decides the largest leaf).
fn new_mmu(gib: u64, eager: bool, host_base_pfn: u64) -> TdpMmu {
    let pool = warm_pool((gib as usize) * 530);
    let mmu = TdpMmu::new(
        pool.for_kind(),
        MmuConfig {
            eager_split: eager,
            ..MmuConfig::default()
        },
    )
    .unwrap();
    mmu.add_memslot(Memslot::new(0, Gfn(0), gib << 18, Pfn(host_base_pfn)).unwrap())
        .unwrap();
    mmu
}

fn populate(mmu: &TdpMmu, gib: u64, step: u64) {
    let mut caches = mmu.new_vcpu_caches();
    for gpa in (0..gib << 30).step_by(step as usize) {
        mmu.fault(&mut caches, Gpa(gpa), AccessKind::Write).unwrap();
    }
}

/// An eager split of 2M or 1G leaves to 4K on the TDP MMU, against a memset
/// of as many pages (see [`paired_row`]).
fn split_row(name: &str, gib: u64, leaf: Level) {
    paired_row(name, || split_once(gib, leaf));
}

/// One eager split of a `gib` GiB slot mapped with `leaf` leaves: its time
/// and the tables it made.
fn split_once(gib: u64, leaf: Level) -> (Duration, usize) {
    // Host frames aligned only as far as the leaf size: the slot maps with
    // leaves of exactly that size.
    let host_base_pfn = (1 << 30) + if leaf == Level::L2M { 512 } else { 0 };
    let mmu = new_mmu(gib, true, host_base_pfn);
    populate(&mmu, gib, leaf.entry_bytes());
    assert_eq!(mmu.translate(Gpa(0)).unwrap().level, leaf);
    let tables_before = mmu.live_tables();
    let start = Instant::now();
    let splits = mmu
        .split_huge_pages(Gfn(0), Gfn(gib << 18), Level::L4K)
        .unwrap();
    let elapsed = start.elapsed();
    let tables = mmu.live_tables() - tables_before;
    assert_eq!(splits as usize, tables);
    (elapsed, tables)
}

/// The shadow MMU's eager split of 2M leaves (a nested guest whose own EPT
/// maps the whole slot with 2M pages), without a vCPU, against a memset of
/// as many pages (see [`paired_row`]).
fn shadow_split_row(gib: u64) {
    paired_row("shadow split 2M -> 4K", || shadow_split_once(gib));
}

/// Prints a split against a memset of as many pages, in paired runs: each
/// pair splits on a fresh MMU whose tables come from a pool touched once
/// (`split` returns its time and the tables it made), and memsets as many
/// pages of another such pool once, so both write pages in the same state;
/// pairs alternate which goes first. The machine's speed drifts between
/// runs; a pair's ratio drifts less. The median pair is printed.
fn paired_row(name: &str, mut split: impl FnMut() -> (Duration, usize)) {
    const PAIRS: usize = 7;
    let tables = split().1;
    let mut pairs: Vec<(Duration, Duration, usize)> = (0..PAIRS)
        .map(|pair| {
            if pair % 2 == 0 {
                let (time, tables) = split();
                (time, memset_once(tables), tables)
            } else {
                let memset = memset_once(tables);
                let (time, tables) = split();
                (time, memset, tables)
            }
        })
        .collect();
    let ratio = |(split, memset, _): &(Duration, Duration, usize)| {
        split.as_secs_f64() / memset.as_secs_f64()
    };
    pairs.sort_by(|a, b| ratio(a).total_cmp(&ratio(b)));
    let (time, memset, tables) = pairs[PAIRS / 2];
    let per_table = time.as_nanos() as f64 / tables as f64;
    let memset_per_page = memset.as_nanos() as f64 / tables as f64;
    let gib = (tables as f64 * 512.0 * PAGE_SIZE as f64) / (1u64 << 30) as f64;
    println!(
        "{name:<22} {tables:>8} tables  {per_table:>8.0} ns/table  {:>7.1} GiB/s  memset {memset_per_page:>6.0} ns/page  ratio {:>5.2} (median of {PAIRS} pairs; min {:.2})",
        gib / time.as_secs_f64(),
        ratio(&pairs[PAIRS / 2]),
        ratio(&pairs[0]),
    );
}

/// One memset of `pages` pages of a pool touched once, as a split's tables
/// are.
fn memset_once(pages: usize) -> Duration {
    let pool = warm_pool(pages);
    let held: Vec<Page> = (0..pages).map(|_| pool.get().unwrap()).collect();
    let start = Instant::now();
    for page in &held {
        // SAFETY: each page is PAGE_SIZE writable bytes owned here.
        unsafe { std::ptr::write_bytes(std::hint::black_box(page.as_ptr()), 0x80, PAGE_SIZE) };
    }
    start.elapsed()
}

/// One eager split of a `gib` GiB slot mapped with 2M leaves: its time and
/// the tables it made.
fn shadow_split_once(gib: u64) -> (Duration, usize) {
    let pool = warm_pool((gib as usize) * 530);
    let mmu = ShadowMmu::new(pool.for_kind(), ShadowConfig::default()).unwrap();
    let npages = gib << 18;
    mmu.add_memslot(Memslot::new(0, Gfn(0), npages, Pfn((1 << 30) + 512)).unwrap())
        .unwrap();
    let guest = Arc::new(GuestEpt::new(4, 1 << 36..(1 << 36) + 4096).unwrap());
    for gfn in (0..npages).step_by(512) {
        guest.map(gfn, gfn, Level::L2M, 0b111).unwrap();
    }
    let mut vcpu = Vcpu::new(0, guest);
    let mut caches = mmu.new_caches();
    for gfn in (0..npages).step_by(512) {
        mmu.fault(
            &mut caches,
            &mut vcpu,
            Gpa(gfn << 12),
            split::AccessKind::Write,
        )
        .unwrap();
    }
    let start = Instant::now();
    let tables = mmu
        .split_huge_pages(Gfn(0), Gfn(npages), Level::L4K)
        .unwrap() as usize;
    let elapsed = start.elapsed();
    assert_eq!(mmu.page_stats().pages_4k, npages);
    (elapsed, tables)
}

/// One dirty-memory pass: every vCPU writes every page of its share.
fn dirty_pass(mmu: &Arc<TdpMmu>, gib: u64) -> Duration {
    dirty_pass_with(mmu, gib << 18, VCPUS)
}

/// One dirty-memory pass of `vcpus` threads over `npages` pages.
/// One pass of `vcpus` threads over their shares of `npages`: from the
/// first thread's start to the last one's end, each taken by the threads
/// themselves (a main thread that reads the clock after the barrier may
/// be scheduled out while the workers run).
fn dirty_pass_with(mmu: &Arc<TdpMmu>, npages: u64, vcpus: u64) -> Duration {
    let barrier = Arc::new(Barrier::new(vcpus as usize));
    let workers: Vec<_> = (0..vcpus)
        .map(|id| {
            let (mmu, barrier) = (mmu.clone(), barrier.clone());
            thread::spawn(move || {
                let mut caches = mmu.new_vcpu_caches();
                let share = npages / vcpus;
                barrier.wait();
                let start = Instant::now();
                for gfn in id * share..(id + 1) * share {
                    mmu.write(&mut caches, Gpa(gfn << 12)).unwrap();
                }
                (start, Instant::now())
            })
        })
        .collect();
    let spans: Vec<(Instant, Instant)> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    let first = spans
        .iter()
        .map(|span| span.0)
        .min()
        .expect("one thread or more");
    let last = spans
        .iter()
        .map(|span| span.1)
        .max()
        .expect("one thread or more");
    last - first
}

fn dirty_log_perf(gib: u64, eager: bool) -> Vec<Duration> {
    let mmu = Arc::new(new_mmu(gib, eager, 1 << 30));
    let populate = dirty_pass(&mmu, gib);
    let start = Instant::now();
    mmu.enable_dirty_logging(0, LogMode::Classic).unwrap();
    let enable = start.elapsed();
    let mut times = vec![populate, enable];
    println!(
        "  eager split {:<5}  populate {:>9.3?}  enable dirty logging {:>9.3?}",
        eager, populate, enable
    );
    for iteration in 1..=3 {
        let dirty = dirty_pass(&mmu, gib);
        let start = Instant::now();
        let log = mmu.get_dirty_log(0).unwrap();
        let get = start.elapsed();
        let dirty_pages: u64 = log.iter().map(|w| u64::from(w.count_ones())).sum();
        assert_eq!(dirty_pages, gib << 18, "every written page is logged");
        println!(
            "    iteration {iteration}: dirty memory {dirty:>9.3?}  get+clear dirty log {get:>9.3?}"
        );
        if iteration == 1 {
            // Lazy mode: each first write to a 2M leaf split it into a full
            // table of 512 children; eager mode split them all at enable.
            let stats = mmu.page_stats();
            let counters = mmu.counters();
            println!(
                "      after iteration 1: 4K leaves {}, 2M {}, splits {} eager + {} lazy, {} fell back",
                stats.pages_4k,
                stats.pages_2m,
                counters.splits,
                counters.lazy_splits,
                counters.split_fallbacks
            );
        }
        times.push(dirty);
    }
    times
}

/// The scaling curve: lazy iteration 1 (every write a fault, the first in
/// each 2 MiB region a lazy split) with 1, 2, 4 ... threads up to the
/// machine's cores (or `MMUKIT_BENCH_SCALING_THREADS`), each thread with
/// the same share (`MMUKIT_BENCH_SCALING_MIB`, default 512), against the
/// 1-thread time. Past the cores the threads share them, so the time
/// grows by threads / cores even without contention; the last column
/// divides that out (CPU time per fault, against 1 thread's).
fn scaling() {
    let per_thread_mib: u64 = std::env::var("MMUKIT_BENCH_SCALING_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    let cores = thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let top = std::env::var("MMUKIT_BENCH_SCALING_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cores)
        .max(1);
    let mut counts = vec![1u64];
    while counts.last().unwrap() * 2 <= top {
        counts.push(counts.last().unwrap() * 2);
    }
    if *counts.last().unwrap() != top {
        counts.push(top);
    }
    println!(
        "split: TDP MMU fault scaling, lazy dirty logging, {per_thread_mib} MiB per thread, {cores} cores"
    );
    println!("| threads | lazy iteration 1 | per fault | x 1 thread | CPU per fault x 1 thread |");
    println!("|---|---|---|---|---|");
    let mut one = None;
    for threads in counts {
        let npages = threads * (per_thread_mib << 8);
        let mut runs = Vec::new();
        for _ in 0..RUNS {
            let pool = warm_pool((npages / 512 * 530 / 512) as usize + 64);
            let mmu = Arc::new(
                TdpMmu::new(
                    pool.for_kind(),
                    MmuConfig {
                        eager_split: false,
                        ..MmuConfig::default()
                    },
                )
                .unwrap(),
            );
            mmu.add_memslot(Memslot::new(0, Gfn(0), npages, Pfn(1 << 30)).unwrap())
                .unwrap();
            dirty_pass_with(&mmu, npages, threads);
            mmu.enable_dirty_logging(0, LogMode::Classic).unwrap();
            runs.push(dirty_pass_with(&mmu, npages, threads));
        }
        let time = median(runs);
        let base = *one.get_or_insert(time);
        let ratio = time.as_secs_f64() / base.as_secs_f64();
        let sharing = threads.div_ceil(cores) as f64;
        println!(
            "| {threads} | {time:.3?} | {:.0} ns | {ratio:.2} | {:.2} |",
            time.as_nanos() as f64 / (per_thread_mib << 8) as f64,
            ratio / sharing
        );
    }
}

fn main() {
    if std::env::args().any(|arg| arg == "--list") {
        return;
    }
    if std::env::args().any(|arg| arg == "scaling") {
        scaling();
        return;
    }
    if std::env::args().any(|arg| arg == "shadow" || arg == "split") {
        let gib = std::env::var("MMUKIT_BENCH_GIB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(16);
        if std::env::args().any(|arg| arg == "split") {
            split_row("eager split 2M -> 4K", gib, Level::L2M);
            split_row("eager split 1G -> 4K", gib, Level::L1G);
        }
        shadow_split_row(gib);
        return;
    }
    let gib: u64 = std::env::var("MMUKIT_BENCH_GIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);
    println!("split: software MMU costs over a {gib} GiB slot (guest memory itself not allocated)");
    split_row("eager split 2M -> 4K", gib, Level::L2M);
    split_row("eager split 1G -> 4K", gib, Level::L1G);
    shadow_split_row(gib);
    println!("software dirty_log_perf_test, {VCPUS} vCPU threads, {RUNS} runs each way:");
    // Iteration 1 of the lazy runs depends on how the vCPU threads are
    // scheduled against each other, so the ratio is taken between medians.
    let mut eager = Vec::new();
    let mut lazy = Vec::new();
    for _ in 0..RUNS {
        eager.push(dirty_log_perf(gib, true)[2]);
        lazy.push(dirty_log_perf(gib, false)[2]);
    }
    let (eager, lazy) = (median(eager), median(lazy));
    println!(
        "iteration-1 dirty memory time, median of {RUNS}: eager {eager:.3?}, lazy {lazy:.3?}, eager / lazy: {:.3}",
        eager.as_secs_f64() / lazy.as_secs_f64()
    );
}

/// Runs of the dirty-log test in each mode.
const RUNS: usize = 3;

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort_unstable();
    times[times.len() / 2]
}
