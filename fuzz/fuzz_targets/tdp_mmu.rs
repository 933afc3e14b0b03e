//! Fault / zap / split / dirty-log operations on the TDP MMU against a flat
//! model: translation agrees with the memslot mapping wherever the model
//! says a page is mapped, never maps where it is not, and stats equal a
//! recount. Software accesses (through the walk cache) agree with a fresh
//! translation.
#![no_main]

use std::collections::HashSet;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use mmu_cache::PagePool;
use mmu_cache::alloc::ChunkAllocator;
use split::tdp::Access;
use split::{Level, LogMode, Memslot, MmuConfig, TdpMmu};

const PAGES: u64 = 4096;
const HOST: u64 = 1 << 20;

#[derive(Arbitrary, Debug)]
enum Op {
    Fault { page: u16, write: bool },
    Zap { first: u16, pages: u16 },
    Split { first: u16, pages: u16 },
    Boundary { first: u16, pages: u16 },
    Enable { manual: bool },
    GetLog,
    Clear { word: u8, mask: u64 },
    Disable,
    Access { page: u16, write: bool },
}

#[derive(Arbitrary, Debug)]
struct Input {
    eager: bool,
    unaligned: bool,
    ops: Vec<Op>,
}

fuzz_target!(|input: Input| {
    let config = MmuConfig {
        eager_split: input.eager,
        ..MmuConfig::default()
    };
    let mmu = TdpMmu::new(PagePool::new(ChunkAllocator::anonymous()), config).unwrap();
    let host = HOST + u64::from(input.unaligned);
    mmu.add_memslot(Memslot::new(0, 0, PAGES, host).unwrap())
        .unwrap();
    let mut caches = mmu.new_vcpu_caches();
    let mut faulted: HashSet<u64> = HashSet::new();
    for op in input.ops.into_iter().take(48) {
        match op {
            Op::Fault { page, write } => {
                let gfn = u64::from(page) % PAGES;
                mmu.fault(&mut caches, gfn << 12, write).unwrap();
                faulted.insert(gfn);
            }
            Op::Access { page, write } => {
                let gfn = u64::from(page) % PAGES;
                let expected = match mmu.translate(gfn << 12) {
                    Some(t) if !write || t.perms & split::ept::WRITE != 0 => Access::Hit(t.hpa),
                    _ => Access::Miss,
                };
                assert_eq!(mmu.access(gfn << 12, write), expected, "gfn {gfn:#x}");
            }
            Op::Zap { first, pages } => {
                let first = u64::from(first) % PAGES;
                let end = first + u64::from(pages) % 1024;
                mmu.zap_range(first, end).unwrap();
                // A huge leaf that overlaps goes whole: forget its pages.
                faulted.retain(|&g| {
                    let base = g & !511;
                    !(base < end && first < base + 512)
                });
            }
            Op::Split { first, pages } => {
                let first = u64::from(first) % PAGES;
                mmu.split_huge_pages(first, first + u64::from(pages) % 2048, Level::L4K)
                    .unwrap();
            }
            Op::Boundary { first, pages } => {
                let first = u64::from(first) % PAGES;
                mmu.split_cross_boundary(first, first + u64::from(pages) % 2048)
                    .unwrap();
            }
            Op::Enable { manual } => {
                let mode = if manual {
                    LogMode::ManualInitiallySet
                } else {
                    LogMode::Classic
                };
                mmu.enable_dirty_logging(0, mode).unwrap();
            }
            Op::GetLog => {
                let _ = mmu.get_dirty_log(0);
            }
            Op::Clear { word, mask } => {
                let word = u64::from(word) % (PAGES / 64);
                let _ = mmu.clear_dirty_log(0, word * 64, &[mask]);
            }
            Op::Disable => {
                mmu.disable_dirty_logging(0).unwrap();
                faulted.clear();
            }
        }
        let (recount, tables) = mmu.recount();
        assert_eq!(mmu.page_stats(), recount);
        assert_eq!(mmu.live_tables(), tables);
        for &gfn in &faulted {
            let t = mmu.translate(gfn << 12);
            if let Some(t) = t {
                assert_eq!(t.hpa, (host + gfn) << 12, "gfn {gfn:#x}");
            }
        }
        for gfn in (0..PAGES).step_by(97) {
            if let Some(t) = mmu.translate(gfn << 12) {
                assert_eq!(t.hpa, (host + gfn) << 12, "a wrong mapping at {gfn:#x}");
            }
        }
    }
});
