//! vCPU threads faulting private memory with their own caches while another
//! thread zaps and splits: the S-EPT still equals the mirror afterwards,
//! and every page comes back at teardown.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{assert_mirrored, td, teardown_and_check};
use split::Level;
use tdx_ext::pamt::PamtPolicy;

#[test]
fn faults_zaps_and_splits_race_without_breaking_the_mirror() {
    for policy in [PamtPolicy::OnInstall, PamtPolicy::OnCacheEntry] {
        let t = td(policy, 8192, 0);
        let stop = AtomicBool::new(false);
        let caches = std::thread::scope(|scope| {
            let vcpus: Vec<_> = (0..2u64)
                .map(|id| {
                    let (mmu, stop) = (&t.mmu, &stop);
                    scope.spawn(move || {
                        let mut caches = mmu.new_vcpu_caches();
                        let mut gfn = id * 7;
                        while !stop.load(Ordering::Relaxed) {
                            mmu.fault(&mut caches, (gfn % 8192) << 12, true).unwrap();
                            gfn += 13;
                        }
                        caches
                    })
                })
                .collect();
            let start = Instant::now();
            let mut round = 0u64;
            while start.elapsed() < Duration::from_millis(800) {
                let first = (round * 1536) % 8192;
                t.mmu
                    .split_huge_pages(first, first + 1024, Level::L4K)
                    .unwrap();
                t.mmu.zap_range(first, first + 512).unwrap();
                round += 1;
            }
            stop.store(true, Ordering::Relaxed);
            vcpus
                .into_iter()
                .map(|v| v.join().unwrap())
                .collect::<Vec<_>>()
        });
        assert_mirrored(&t);
        assert!(t.mmu.counters().faults > 100);
        teardown_and_check(t, caches);
    }
}
