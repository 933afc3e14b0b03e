//! Fault / zap / split / dirty-log operations on the TDP MMU, with the page
//! allocator failing at times, against a flat model: translation agrees with
//! the memslot mapping, a faulted page stays mapped until a zap or a disable
//! of dirty logging takes it (lazy splits keep neighbours; disabling keeps
//! 4K-only ranges), dirty logging never fails for lack of memory, a huge leaf
//! over a page whose log bit was cleared is write-protected, and stats equal
//! a recount. Software accesses (through the walk cache) agree with a fresh
//! translation.
#![no_main]

use split::{Gfn, Gpa, Hpa, Pfn};
use std::collections::HashSet;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use mmu_cache::PagePool;
use mmu_cache::alloc::{ChunkAllocator, FailPolicy, FailingAllocator};
use split::tdp::Access;
use split::{AccessKind, Level, LogMode, Memslot, MmuConfig, TdpMmu};

const PAGES: u64 = 4096;
const HOST: u64 = 1 << 20;

#[derive(Arbitrary, Debug)]
enum Op {
    Fault {
        page: u16,
        write: bool,
    },
    Zap {
        first: u16,
        pages: u16,
    },
    Split {
        first: u16,
        pages: u16,
    },
    Boundary {
        first: u16,
        pages: u16,
    },
    Enable {
        manual: bool,
    },
    GetLog,
    Clear {
        word: u8,
        mask: u64,
    },
    Disable,
    Access {
        page: u16,
        write: bool,
    },
    /// Make the page allocator fail every `k`th call (0: never, 1: always).
    Fail {
        k: u8,
    },
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
    let failing = std::sync::Arc::new(FailingAllocator::new(
        ChunkAllocator::anonymous(),
        FailPolicy::Never,
    ));
    let mmu = TdpMmu::new(PagePool::from_shared(failing.clone(), None), config).unwrap();
    let mut failing_now = false;
    let host = HOST + u64::from(input.unaligned);
    mmu.add_memslot(Memslot::new(0, Gfn(0), PAGES, Pfn(host)).unwrap())
        .unwrap();
    let mut caches = mmu.new_vcpu_caches();
    let mut faulted: HashSet<u64> = HashSet::new();
    for op in input.ops.into_iter().take(48) {
        match op {
            Op::Fault { page, write } => {
                let gfn = u64::from(page) % PAGES;
                match mmu.fault(&mut caches, Gpa(gfn << 12), AccessKind::data(write)) {
                    Ok(_) => {
                        faulted.insert(gfn);
                    }
                    Err(split::MmuError::Cache(_)) if failing_now => {}
                    Err(err) => panic!("fault: {err}"),
                }
            }
            Op::Access { page, write } => {
                let gfn = u64::from(page) % PAGES;
                let expected = match mmu.translate(Gpa(gfn << 12)) {
                    Some(t) if !write || t.perms & split::ept::WRITE != 0 => Access::Hit(t.hpa),
                    _ => Access::Miss,
                };
                assert_eq!(
                    mmu.access(&mut caches, Gpa(gfn << 12), AccessKind::data(write)),
                    expected,
                    "gfn {gfn:#x}"
                );
            }
            Op::Zap { first, pages } => {
                let first = u64::from(first) % PAGES;
                let end = first + u64::from(pages) % 1024;
                mmu.zap_range(Gfn(first), Gfn(end)).unwrap();
                // A huge leaf that overlaps goes whole: forget its pages.
                faulted.retain(|&g| {
                    let base = g & !511;
                    !(base < end && first < base + 512)
                });
            }
            Op::Split { first, pages } => {
                let first = u64::from(first) % PAGES;
                let result = mmu.split_huge_pages(
                    Gfn(first),
                    Gfn(first + u64::from(pages) % 2048),
                    Level::L4K,
                );
                assert!(result.is_ok() || failing_now);
            }
            Op::Boundary { first, pages } => {
                let first = u64::from(first) % PAGES;
                let result =
                    mmu.split_cross_boundary(Gfn(first), Gfn(first + u64::from(pages) % 2048));
                assert!(result.is_ok() || failing_now);
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
                let manual = mmu.slot(0).unwrap().log_mode() == Some(LogMode::ManualInitiallySet);
                if !manual {
                    let _ = mmu.clear_dirty_log(0, word * 64, &[mask]);
                    continue;
                }
                let before = mmu.get_dirty_log(0).unwrap()[word as usize];
                mmu.clear_dirty_log(0, word * 64, &[mask]).unwrap();
                let cleared = before & mask;
                for bit in (0..64).filter(|bit| cleared & (1 << bit) != 0) {
                    if let Some(t) = mmu.translate(Gpa((word * 64 + bit) << 12))
                        && t.level > Level::L4K
                    {
                        assert_eq!(t.perms & split::ept::WRITE, 0, "huge leaf left writable");
                    }
                }
            }
            Op::Disable => {
                mmu.disable_dirty_logging(0).unwrap();
                if input.unaligned {
                    // 4K-only memory: nothing can be huge again, nothing goes.
                    for &gfn in &faulted {
                        assert!(
                            mmu.translate(Gpa(gfn << 12)).is_some(),
                            "gfn {gfn:#x} zapped"
                        );
                    }
                } else {
                    for &gfn in &faulted {
                        if let Some(t) = mmu.translate(Gpa(gfn << 12)) {
                            assert!(t.level > Level::L4K, "a 4K leaf stayed at {gfn:#x}");
                        }
                    }
                    faulted.clear();
                }
            }
            Op::Fail { k } => {
                let policy = match k % 4 {
                    0 => FailPolicy::Never,
                    1 => FailPolicy::Always,
                    k => FailPolicy::EveryKth(u64::from(k)),
                };
                failing.set_policy(policy);
                failing_now = policy != FailPolicy::Never;
            }
        }
        let (recount, tables) = mmu.recount();
        assert_eq!(mmu.page_stats(), recount);
        assert_eq!(mmu.live_tables(), tables);
        for &gfn in &faulted {
            let t = mmu
                .translate(Gpa(gfn << 12))
                .expect("a faulted page stays mapped");
            assert_eq!(t.hpa, Hpa((host + gfn) << 12), "gfn {gfn:#x}");
        }
        for gfn in (0..PAGES).step_by(97) {
            if let Some(t) = mmu.translate(Gpa(gfn << 12)) {
                assert_eq!(
                    t.hpa,
                    Hpa((host + gfn) << 12),
                    "a wrong mapping at {gfn:#x}"
                );
            }
        }
    }
});
