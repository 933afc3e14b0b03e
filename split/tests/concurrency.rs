//! vCPU threads write through the MMU while another thread enables dirty
//! logging and harvests the log repeatedly: no write may be lost.

mod common;

use split::{Gfn, Gpa, Hpa, Pfn};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::{MIB_PAGES, checked_stats, mmu};
use mmu_cache::alloc::PageAllocator;
use split::{LogMode, Memslot, MmuConfig};

const NPAGES: u64 = 16 * MIB_PAGES;
const VCPUS: u64 = 2;

#[test]
fn writes_during_dirty_log_harvests_are_never_lost() {
    let (counting, mmu) = mmu(MmuConfig::default());
    let mmu = Arc::new(mmu);
    mmu.add_memslot(Memslot::new(0, Gfn(0), NPAGES, Pfn(0x80000)).unwrap())
        .unwrap();
    // Per page: the sequence number of the last write, and of the last write
    // seen in a harvested log.
    let written: Arc<Vec<AtomicU64>> = Arc::new((0..NPAGES).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(VCPUS as usize + 1));

    let vcpus: Vec<_> = (0..VCPUS)
        .map(|id| {
            let (mmu, written, stop, start) =
                (mmu.clone(), written.clone(), stop.clone(), start.clone());
            thread::spawn(move || {
                let mut caches = mmu.new_vcpu_caches();
                let share = NPAGES / VCPUS;
                let mut pass = 0u64;
                start.wait();
                while !stop.load(Ordering::Relaxed) {
                    pass += 1;
                    for gfn in id * share..(id + 1) * share {
                        let hpa = mmu.write(&mut caches, Gpa(gfn << 12)).unwrap();
                        assert_eq!(hpa, Hpa((0x80000 + gfn) << 12));
                        written[gfn as usize].store(pass, Ordering::Release);
                    }
                }
                pass
            })
        })
        .collect();

    start.wait();
    thread::sleep(Duration::from_millis(50));
    mmu.enable_dirty_logging(0, LogMode::Classic).unwrap();
    let mut logged = vec![false; NPAGES as usize];
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut harvests = 0;
    while Instant::now() < deadline {
        let log = mmu.get_dirty_log(0).unwrap();
        for page in 0..NPAGES as usize {
            if log[page / 64] & (1 << (page % 64)) != 0 {
                logged[page] = true;
            }
        }
        harvests += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let passes: Vec<u64> = vcpus.into_iter().map(|v| v.join().unwrap()).collect();
    let log = mmu.get_dirty_log(0).unwrap();
    for page in 0..NPAGES as usize {
        if log[page / 64] & (1 << (page % 64)) != 0 {
            logged[page] = true;
        }
    }
    assert!(
        harvests > 1 && passes.iter().all(|&p| p > 1),
        "harvests {harvests}, passes {passes:?}"
    );
    // Every page was written after enabling (each vCPU made more passes), so
    // every page must be in some log.
    let missing = logged.iter().filter(|&&seen| !seen).count();
    assert_eq!(
        missing, 0,
        "{missing} written pages never appeared in a dirty log"
    );
    // Quiet now: a pass over a known subset logs exactly that subset.
    let mut caches = mmu.new_vcpu_caches();
    let subset: Vec<u64> = (0..NPAGES).step_by(13).collect();
    for &gfn in &subset {
        mmu.write(&mut caches, Gpa(gfn << 12)).unwrap();
    }
    let log = mmu.get_dirty_log(0).unwrap();
    let logged_now: Vec<u64> = (0..NPAGES)
        .filter(|&p| log[(p / 64) as usize] & (1 << (p % 64)) != 0)
        .collect();
    assert_eq!(logged_now, subset);
    assert!(written.iter().all(|w| w.load(Ordering::Relaxed) > 0));
    drop(caches);
    let stats = checked_stats(&mmu);
    assert_eq!(stats.pages_4k, NPAGES);
    drop(mmu);
    assert_eq!(counting.pages_outstanding(), 0, "no leak");
}
