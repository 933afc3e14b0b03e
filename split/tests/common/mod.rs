//! Helpers shared by the split tests.
#![allow(dead_code, reason = "each test binary uses some of the helpers")]

pub mod shadow;

use std::sync::Arc;

use mmu_cache::PagePool;
use mmu_cache::alloc::{ChunkAllocator, CountingAllocator, FailPolicy, FailingAllocator};
use split::{MmuConfig, TdpMmu};

pub type Counting = CountingAllocator<ChunkAllocator>;

/// An MMU over a counting allocator, which panics on any allocation while
/// the MMU holds its lock.
pub fn mmu(config: MmuConfig) -> (Arc<Counting>, TdpMmu) {
    let counting = Arc::new(CountingAllocator::new(ChunkAllocator::anonymous()));
    let pool = PagePool::from_shared(counting.clone(), None);
    let mmu = TdpMmu::new(pool, config).expect("mmu");
    (counting, mmu)
}

pub type FailingCounting = CountingAllocator<FailingAllocator<ChunkAllocator>>;

/// An MMU over a counting allocator that fails as
/// `counting.inner().set_policy(..)` says (it starts never failing).
pub fn failing_mmu(config: MmuConfig) -> (Arc<FailingCounting>, TdpMmu) {
    let counting = Arc::new(CountingAllocator::new(FailingAllocator::new(
        ChunkAllocator::anonymous(),
        FailPolicy::Never,
    )));
    let pool = PagePool::from_shared(counting.clone(), None);
    let mmu = TdpMmu::new(pool, config).expect("mmu");
    (counting, mmu)
}

pub const MIB_PAGES: u64 = 256;
pub const GIB_PAGES: u64 = 1 << 18;

/// Asserts that incremental stats equal a recount and returns them.
pub fn checked_stats(mmu: &TdpMmu) -> split::PageStats {
    let (recount, tables) = mmu.recount();
    assert_eq!(mmu.page_stats(), recount, "stats drifted from the tree");
    assert_eq!(mmu.live_tables(), tables, "table map drifted from the tree");
    recount
}
