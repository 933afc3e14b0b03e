//! vCPU threads faulting private memory with their own caches while another
//! thread zaps and splits: the S-EPT still equals the mirror afterwards,
//! and every page comes back at teardown.

mod common;

use split::{Gfn, Gpa};
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{assert_mirrored, td, teardown_and_check};
use split::AccessKind;
use split::Level;
use tdx_ext::pamt::PamtPolicy;

const FAULTS_PER_VCPU: u64 = 3000;

#[test]
fn faults_zaps_and_splits_race_without_breaking_the_mirror() {
    for policy in [PamtPolicy::OnInstall, PamtPolicy::OnCacheEntry] {
        let t = td(policy, 8192, 0);
        // Each vCPU makes a fixed number of faults; the zapper runs until
        // both are done, so the race lasts as long as they do, however slow
        // the machine.
        let running = AtomicUsize::new(2);
        let caches = std::thread::scope(|scope| {
            let vcpus: Vec<_> = (0..2u64)
                .map(|id| {
                    let (mmu, running) = (&t.mmu, &running);
                    scope.spawn(move || {
                        let mut caches = mmu.new_vcpu_caches();
                        let mut gfn = id * 7;
                        for _ in 0..FAULTS_PER_VCPU {
                            mmu.fault(&mut caches, Gpa((gfn % 8192) << 12), AccessKind::Write)
                                .unwrap();
                            gfn += 13;
                        }
                        running.fetch_sub(1, Ordering::Release);
                        caches
                    })
                })
                .collect();
            let mut round = 0u64;
            while running.load(Ordering::Acquire) > 0 {
                let first = (round * 1536) % 8192;
                t.mmu
                    .split_huge_pages(Gfn(first), Gfn(first + 1024), Level::L4K)
                    .unwrap();
                t.mmu.zap_range(Gfn(first), Gfn(first + 512)).unwrap();
                round += 1;
            }
            vcpus
                .into_iter()
                .map(|v| v.join().unwrap())
                .collect::<Vec<_>>()
        });
        assert_mirrored(&t);
        assert_eq!(t.mmu.counters().faults, 2 * FAULTS_PER_VCPU);
        teardown_and_check(t, caches);
    }
}
