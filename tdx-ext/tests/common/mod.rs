//! A TD for tests: a software module, Dynamic PAMT, a mirror and a mirror
//! TDP MMU, each pool over a counting allocator that panics on allocation
//! under the MMU lock.
#![allow(dead_code, reason = "each test binary uses some of the helpers")]

use split::{Gfn, Pfn};
use std::sync::Arc;

use mmu_cache::alloc::{ChunkAllocator, CountingAllocator, PageAllocator};
use mmu_cache::{Account, PagePool};
use split::{Memslot, MmuConfig, TdpMmu};
use tdx_ext::pamt::PamtPolicy;
use tdx_ext::{SimTdxModule, TdPages, TdxMirror};

pub type Counting = CountingAllocator<ChunkAllocator>;

/// Guest frames start at 4 GiB, far from any real address.
pub const HOST_PFN: u64 = 1 << 20;

pub struct Td {
    pub module: Arc<SimTdxModule>,
    pub mirror: Arc<TdxMirror>,
    pub mmu: TdpMmu,
    pub mmu_alloc: Arc<Counting>,
    pub table_alloc: Arc<Counting>,
    pub pamt_alloc: Arc<Counting>,
    pub account: Arc<Account>,
}

fn counting() -> Arc<Counting> {
    Arc::new(CountingAllocator::new(ChunkAllocator::anonymous()))
}

/// A finalized TD with one slot of `pages` guest pages at gpa 0 on host
/// frames from `HOST_PFN + pfn_offset` (1 makes every leaf 4K).
pub fn td(policy: PamtPolicy, pages: u64, pfn_offset: u64) -> Td {
    let account = Arc::new(Account::new("td"));
    let (pamt_alloc, table_alloc) = (counting(), counting());
    let td_pages = TdPages {
        pamt: pamt_alloc.clone(),
        tables: table_alloc.clone(),
        account: Some(account.clone()),
    };
    let (module, mirror) = TdxMirror::finalized_on_sim_with(4, policy, td_pages).unwrap();
    let mmu_alloc = counting();
    let mmu = TdpMmu::with_hooks(
        PagePool::from_shared(mmu_alloc.clone(), Some(account.clone())),
        MmuConfig::default(),
        mirror.clone(),
    )
    .unwrap();
    mmu.add_memslot(Memslot::new(0, Gfn(0), pages, Pfn(HOST_PFN + pfn_offset)).unwrap())
        .unwrap();
    Td {
        module,
        mirror,
        mmu,
        mmu_alloc,
        table_alloc,
        pamt_alloc,
        account,
    }
}

/// The module's S-EPT holds exactly the mirror's leaves and tables.
pub fn assert_mirrored(td: &Td) {
    let leaves = td.module.leaves();
    let stats = td.mmu.page_stats();
    assert_eq!(
        leaves.len() as u64,
        stats.pages_4k + stats.pages_2m + stats.pages_1g,
        "leaf counts differ"
    );
    for (&(level, gpa), &(page, _)) in &leaves {
        let t = td
            .mmu
            .translate(gpa)
            .unwrap_or_else(|| panic!("S-EPT leaf {gpa:#x} missing in the mirror"));
        assert_eq!((t.level.get(), t.hpa), (level, page), "gpa {gpa:#x}");
    }
    assert_eq!(
        td.module.tables().len() - 1,
        td.mmu.live_tables(),
        "S-EPT pages and mirror tables differ"
    );
}

/// Tears the TD down and checks that every page went back to its owner
/// and no PAMT is left.
pub fn teardown_and_check(td: Td, mut caches: Vec<split::VcpuCaches>) {
    let Td {
        module,
        mirror,
        mmu,
        mmu_alloc,
        table_alloc,
        pamt_alloc,
        account,
    } = td;
    let report = mmu.teardown().unwrap();
    assert_eq!((report.leaf_errors, report.external_leaked), (0, 0));
    assert_eq!(module.leaves().len(), 0);
    for cache in &mut caches {
        cache.free_all();
    }
    drop(caches);
    drop(mmu);
    mirror.free_cached();
    assert_eq!(mirror.counters().leaked_pages, 0);
    assert_eq!(mirror.pamt().counters().leaked_pages, 0);
    assert_eq!(mirror.pamt().counters().regions, 0, "PAMT left behind");
    assert_eq!(module.pamt_regions(), 0);
    drop(mirror);
    assert_eq!(mmu_alloc.pages_outstanding(), 0, "MMU pages");
    assert_eq!(table_alloc.pages_outstanding(), 0, "S-EPT pages");
    assert_eq!(pamt_alloc.pages_outstanding(), 0, "PAMT pages");
    assert_eq!(account.charged(), 0);
}
