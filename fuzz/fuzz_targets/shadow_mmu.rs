//! Guest EPT changes (every R/W/X combination, at leaves and tables),
//! faults of every access kind, syncs, splits, zaps and dirty logging on the
//! shadow MMU: stats equal a recount, rmaps match the leaves, parent
//! pointers hold, every translation stays inside the slot, a fault succeeds
//! exactly when the guest's walk allows its access, and after a sync no
//! shadow leaf allows more than the guest's EPT does.
#![no_main]

use split::{Gfn, Gpa, Pfn};
use std::sync::Arc;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use mmu_cache::PagePool;
use mmu_cache::alloc::{ChunkAllocator, FailPolicy, FailingAllocator};
use split::guest::{GuestEpt, GuestTables};
use split::shadow::ShadowError;
use split::shadow::{ShadowConfig, ShadowMmu, Vcpu};
use split::{AccessKind, Entry, Level, LogMode, Memslot};

const PAGES: u64 = 2048;
const HOST: u64 = 1 << 20;

#[derive(Arbitrary, Debug)]
enum Op {
    Map {
        ngfn: u16,
        gfn: u16,
        huge: bool,
        perms: u8,
    },
    Unmap {
        ngfn: u16,
    },
    Fault {
        ngfn: u16,
        kind: u8,
    },
    TablePerms {
        ngfn: u16,
        level: u8,
        perms: u8,
    },
    Sync,
    Split {
        first: u16,
        pages: u16,
    },
    ZapAll,
    ZapRange {
        first: u16,
        pages: u16,
    },
    Enable,
    GetLog,
    Clear {
        word: u8,
        mask: u64,
    },
    /// Make the page allocator fail every `k`th call (0: never, 1: always).
    Fail {
        k: u8,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    eager: bool,
    ops: Vec<Op>,
}

fuzz_target!(|input: Input| {
    let config = ShadowConfig {
        eager_split: input.eager,
        ..ShadowConfig::default()
    };
    let failing = Arc::new(FailingAllocator::new(
        ChunkAllocator::anonymous(),
        FailPolicy::Never,
    ));
    let mmu = ShadowMmu::new(PagePool::from_shared(failing.clone(), None), config).unwrap();
    let mut failing_now = false;
    mmu.add_memslot(Memslot::new(0, Gfn(0), PAGES, Pfn(HOST)).unwrap())
        .unwrap();
    let guest = Arc::new(GuestEpt::new(4, 0x10_0000..0x10_0400).unwrap());
    let mut vcpu = Vcpu::new(0, guest.clone());
    let mut caches = mmu.new_caches();
    for op in input.ops.into_iter().take(48) {
        match op {
            Op::Map {
                ngfn,
                gfn,
                huge,
                perms,
            } => {
                let (level, mask) = if huge {
                    (Level::L2M, !511u64)
                } else {
                    (Level::L4K, !0)
                };
                let ngfn = (u64::from(ngfn) % PAGES) & mask;
                let gfn = (u64::from(gfn) % PAGES) & mask;
                // Any R/W/X: read-only, execute-only, none, misconfigured.
                let perms = u64::from(perms) & 0b111;
                if let Ok(written) = guest.map(ngfn, gfn, level, perms) {
                    for table in written {
                        mmu.guest_table_written(Gfn(table));
                    }
                }
            }
            Op::Unmap { ngfn } => {
                if let Some(table) = guest.unmap(u64::from(ngfn) % PAGES) {
                    mmu.guest_table_written(Gfn(table));
                }
            }
            Op::Fault { ngfn, kind } => {
                let ngfn = u64::from(ngfn) % PAGES;
                let kind = AccessKind::ALL[usize::from(kind) % 3];
                let allowed = guest_walk(&guest, ngfn, Some(kind)).map(|p| kind.allowed_by(p));
                match mmu.fault(&mut caches, &mut vcpu, Gpa(ngfn << 12), kind) {
                    Ok(t) => {
                        assert_eq!(allowed, Some(true), "{kind} at {ngfn:#x}");
                        assert!(kind.allowed_by(t.perms));
                    }
                    Err(ShadowError::GuestViolation { .. }) => {
                        assert_eq!(allowed, Some(false), "{kind} at {ngfn:#x}")
                    }
                    Err(ShadowError::GuestMisconfig { .. }) => assert_eq!(allowed, None),
                    Err(ShadowError::Cache(_)) if failing_now => {}
                    Err(ShadowError::NoSlot { .. }) => {}
                    Err(err) => panic!("fault: {err}"),
                }
            }
            Op::TablePerms { ngfn, level, perms } => {
                let level = Level::new(2 + level % 3).expect("2 to 4");
                let ngfn = u64::from(ngfn) % PAGES;
                if let Ok(table) = guest.set_table_perms(ngfn, level, u64::from(perms) & 0b111) {
                    mmu.guest_table_written(Gfn(table));
                }
            }
            Op::Sync => {
                mmu.sync(&vcpu);
                for ngfn in (0..PAGES).step_by(7) {
                    let Some(t) = mmu.translate(&vcpu, Gpa(ngfn << 12)) else {
                        continue;
                    };
                    let guest = guest_walk(&guest, ngfn, None).unwrap_or(0);
                    assert_eq!(
                        t.perms & !guest,
                        0,
                        "shadow leaf above the guest's permissions"
                    );
                }
            }
            Op::Split { first, pages } => {
                let first = u64::from(first) % PAGES;
                let result = mmu.split_huge_pages(
                    Gfn(first),
                    Gfn(first + u64::from(pages) % 1024),
                    Level::L4K,
                );
                assert!(result.is_ok() || failing_now);
            }
            Op::ZapAll => mmu.zap_all(),
            Op::ZapRange { first, pages } => {
                let first = u64::from(first) % PAGES;
                mmu.zap_gfn_range(Gfn(first), Gfn(first + u64::from(pages) % 1024));
            }
            Op::Enable => {
                // Best effort: never fails for lack of memory.
                mmu.enable_dirty_logging(0, LogMode::Classic).unwrap();
            }
            Op::Clear { word, mask } => {
                let word = u64::from(word) % (PAGES / 64);
                let _ = mmu.clear_dirty_log(0, word * 64, &[mask]);
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
            Op::GetLog => {
                let _ = mmu.get_dirty_log(0);
            }
        }
        let recount = mmu.recount();
        assert_eq!(mmu.page_stats(), recount.stats);
        let leaves = recount.stats.pages_4k + recount.stats.pages_2m + recount.stats.pages_1g;
        assert_eq!(recount.rmap_entries as u64, leaves);
        assert_eq!(recount.broken_parents, 0);
        assert_eq!(recount.broken_rmaps, 0);
        for ngfn in (0..PAGES).step_by(61) {
            if let Some(t) = mmu.translate(&vcpu, Gpa(ngfn << 12)) {
                let pfn = t.hpa.pfn().0;
                assert!((HOST..HOST + PAGES).contains(&pfn), "maps outside the slot");
            }
        }
    }
    mmu.unload_root(&mut vcpu);
});

/// What the CPU's walk of the guest's EPT gives for `ngfn`: the effective
/// R/W/X (the AND over the walk; 0 when not mapped), stopping as soon as an
/// access of `kind` is denied; `None` when it meets a misconfiguration first.
fn guest_walk(guest: &GuestEpt, ngfn: u64, kind: Option<AccessKind>) -> Option<u64> {
    let mut table = guest.root_gfn();
    let mut level = Level::new(guest.levels()).expect("4 or 5");
    let mut perms = 0b111;
    loop {
        let entry: Entry = guest.read_entry(table, level.index(ngfn));
        entry.validate(level).ok()?;
        if !entry.is_present() {
            return Some(0);
        }
        perms &= entry.perms();
        if kind.is_some_and(|kind| !kind.allowed_by(perms)) || entry.is_leaf(level) {
            return Some(perms);
        }
        table = entry.addr(level) >> 12;
        level = level.below()?;
    }
}
