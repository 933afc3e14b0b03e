//! Shadow MMU helpers shared by the shadow tests: one 16 MiB slot, a
//! guest EPT whose tables live above it, and invariant checks.

use std::sync::Arc;

use mmu_cache::PagePool;
use mmu_cache::alloc::{ChunkAllocator, CountingAllocator, PageAllocator};
use split::ept::RWX;
use split::guest::GuestEpt;
use split::shadow::{ShadowCaches, ShadowConfig, ShadowMmu, Vcpu};
use split::{AccessKind, Gfn, Gpa, Level, Memslot, PageStats, Pfn};

pub type Counting = CountingAllocator<ChunkAllocator>;

/// L1 memory: 16 MiB at gfn 0, on host frames from `HOST`.
pub const HOST: u64 = 0x40_0000;
pub const SLOT_PAGES: u64 = 4096;
/// Guest tables live above the slot.
pub const TABLES: std::ops::Range<u64> = 0x10_0000..0x10_1000;

pub struct Setup {
    pub counting: Arc<Counting>,
    pub mmu: ShadowMmu,
    pub guest: Arc<GuestEpt>,
    pub vcpu: Vcpu,
    pub caches: ShadowCaches,
}

pub fn setup(config: ShadowConfig) -> Setup {
    let counting = Arc::new(CountingAllocator::new(ChunkAllocator::anonymous()));
    let pool = PagePool::from_shared(counting.clone(), None);
    let mmu = ShadowMmu::new(pool, config).unwrap();
    mmu.add_memslot(Memslot::new(0, Gfn(0), SLOT_PAGES, Pfn(HOST)).unwrap())
        .unwrap();
    let guest = Arc::new(GuestEpt::new(4, TABLES).unwrap());
    let vcpu = Vcpu::new(0, guest.clone());
    let caches = mmu.new_caches();
    Setup {
        counting,
        mmu,
        guest,
        vcpu,
        caches,
    }
}

/// Asserts the shadow forest's invariants and returns the stats.
pub fn checked(mmu: &ShadowMmu) -> PageStats {
    let recount = mmu.recount();
    assert_eq!(mmu.page_stats(), recount.stats, "stats drifted");
    let leaves = recount.stats.pages_4k + recount.stats.pages_2m + recount.stats.pages_1g;
    assert_eq!(recount.rmap_entries as u64, leaves, "rmaps drifted");
    assert_eq!(recount.broken_parents, 0, "parent pointers drifted");
    assert_eq!(
        recount.broken_rmaps, 0,
        "rmaps name entries that do not map their frame"
    );
    recount.stats
}

/// The guest maps L2 [0, 16M) to L1 [0, 16M) with 2M pages.
pub fn map_2m(s: &Setup) {
    for i in 0..8u64 {
        s.guest.map(i * 512, i * 512, Level::L2M, RWX).unwrap();
    }
}

pub fn fault_all(s: &mut Setup, pages: u64, step: u64) {
    for ngfn in (0..pages).step_by(step as usize) {
        s.mmu
            .fault(
                &mut s.caches,
                &mut s.vcpu,
                Gpa(ngfn << 12),
                AccessKind::Write,
            )
            .unwrap();
    }
}

pub fn all_freed(s: Setup) {
    let Setup {
        counting,
        mmu,
        vcpu,
        mut caches,
        ..
    } = s;
    caches.free_all();
    drop(caches);
    drop(vcpu);
    drop(mmu);
    assert_eq!(counting.pages_outstanding(), 0, "pages leaked");
}
