//! Stress: vCPU threads write through the MMU while one thread harvests and
//! clears the dirty log (manual protect) and another zaps ranges and splits
//! across conversion boundaries. No write may be lost, stats must equal a
//! recount, translations stay right, and nothing leaks.
//!
//! The suite runs it for 1 s; `MMUKIT_STRESS_SECS=600 cargo test -p mmukit-split
//! --release --test stress` runs it for longer.

mod common;

use split::{Gfn, Gpa, Hpa, Pfn};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{MIB_PAGES, checked_stats, mmu};
use mmu_cache::alloc::PageAllocator;
use split::{LogMode, Memslot, MmuConfig};

const NPAGES: u64 = 8 * MIB_PAGES;
const HOST: u64 = 0x80000;

#[test]
fn writes_zaps_splits_and_clears_race_without_losing_a_write() {
    let seconds: u64 = std::env::var("MMUKIT_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let (counting, mmu) = mmu(MmuConfig::default());
    mmu.add_memslot(Memslot::new(0, Gfn(0), NPAGES, Pfn(HOST)).unwrap())
        .unwrap();
    mmu.enable_dirty_logging(0, LogMode::ManualInitiallySet)
        .unwrap();
    let stop = AtomicBool::new(false);
    // Per page: writes made, and the count when the log last saw it.
    let writes: Vec<AtomicU64> = (0..NPAGES).map(|_| AtomicU64::new(0)).collect();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let (harvests, zaps) = std::thread::scope(|scope| {
        for id in 0..2u64 {
            let (mmu, stop, writes) = (&mmu, &stop, &writes);
            scope.spawn(move || {
                let mut caches = mmu.new_vcpu_caches();
                let mut gfn = id * 17;
                while !stop.load(Ordering::Relaxed) {
                    gfn = (gfn + 7919) % NPAGES;
                    let hpa = mmu.write(&mut caches, Gpa(gfn << 12)).unwrap();
                    assert_eq!(hpa, Hpa((HOST + gfn) << 12));
                    writes[gfn as usize].fetch_add(1, Ordering::AcqRel);
                }
            });
        }
        let zapper = {
            let (mmu, stop) = (&mmu, &stop);
            scope.spawn(move || {
                let mut zaps = 0u64;
                let mut start = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    start = (start + 1237) % NPAGES;
                    let end = (start + 300).min(NPAGES);
                    mmu.split_cross_boundary(Gfn(start), Gfn(end)).unwrap();
                    mmu.zap_range(Gfn(start), Gfn(end)).unwrap();
                    zaps += 1;
                    std::thread::sleep(Duration::from_micros(200));
                }
                zaps
            })
        };
        // The harvester: every page written must show up in some log.
        let mut logged = vec![false; NPAGES as usize];
        let mut harvests = 0u64;
        while Instant::now() < deadline {
            let log = mmu.get_dirty_log(0).unwrap();
            mmu.clear_dirty_log(0, 0, &log).unwrap();
            for (page, seen) in logged.iter_mut().enumerate() {
                *seen |= log[page / 64] & (1 << (page % 64)) != 0;
            }
            harvests += 1;
        }
        stop.store(true, Ordering::Relaxed);
        let zaps = zapper.join().unwrap();
        let log = mmu.get_dirty_log(0).unwrap();
        let lost = (0..NPAGES as usize)
            .filter(|&page| {
                let in_last = log[page / 64] & (1 << (page % 64)) != 0;
                writes[page].load(Ordering::Acquire) > 0 && !(logged[page] || in_last)
            })
            .count();
        assert_eq!(
            lost, 0,
            "{lost} written pages never appeared in a dirty log"
        );
        (harvests, zaps)
    });
    assert!(harvests > 2 && zaps > 2, "harvests {harvests}, zaps {zaps}");
    checked_stats(&mmu);
    for gfn in (0..NPAGES).step_by(101) {
        if let Some(t) = mmu.translate(Gpa(gfn << 12)) {
            assert_eq!(t.hpa, Hpa((HOST + gfn) << 12));
        }
    }
    drop(mmu);
    assert_eq!(counting.pages_outstanding(), 0, "no leak");
}
