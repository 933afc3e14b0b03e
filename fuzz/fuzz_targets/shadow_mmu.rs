//! Guest EPT changes, faults, syncs, splits, zaps and dirty logging on the
//! shadow MMU: stats equal a recount, rmaps match the leaves, parent
//! pointers hold, and every translation agrees with the guest and the slot.
#![no_main]

use std::sync::Arc;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use mmu_cache::PagePool;
use mmu_cache::alloc::ChunkAllocator;
use split::guest::GuestEpt;
use split::shadow::{ShadowConfig, ShadowMmu, Vcpu};
use split::{Level, LogMode, Memslot};

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
        write: bool,
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
    let mmu = ShadowMmu::new(PagePool::new(ChunkAllocator::anonymous()), config).unwrap();
    mmu.add_memslot(Memslot::new(0, 0, PAGES, HOST).unwrap())
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
                let ngfn = u64::from(ngfn) % PAGES & mask;
                let gfn = u64::from(gfn) % PAGES & mask;
                // Readable, maybe writable and executable.
                let perms = 1 | (u64::from(perms) & 0b110);
                if let Ok(written) = guest.map(ngfn, gfn, level, perms) {
                    for table in written {
                        mmu.guest_table_written(table);
                    }
                }
            }
            Op::Unmap { ngfn } => {
                if let Some(table) = guest.unmap(u64::from(ngfn) % PAGES) {
                    mmu.guest_table_written(table);
                }
            }
            Op::Fault { ngfn, write } => {
                let _ = mmu.fault(
                    &mut caches,
                    &mut vcpu,
                    (u64::from(ngfn) % PAGES) << 12,
                    write,
                );
            }
            Op::Sync => {
                mmu.sync(&vcpu);
            }
            Op::Split { first, pages } => {
                let first = u64::from(first) % PAGES;
                mmu.split_huge_pages(first, first + u64::from(pages) % 1024, Level::L4K)
                    .unwrap();
            }
            Op::ZapAll => mmu.zap_all(),
            Op::ZapRange { first, pages } => {
                let first = u64::from(first) % PAGES;
                mmu.zap_gfn_range(first, first + u64::from(pages) % 1024);
            }
            Op::Enable => {
                let _ = mmu.enable_dirty_logging(0, LogMode::Classic);
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
        for ngfn in (0..PAGES).step_by(61) {
            if let Some(t) = mmu.translate(&vcpu, ngfn << 12) {
                let pfn = t.hpa >> 12;
                assert!((HOST..HOST + PAGES).contains(&pfn), "maps outside the slot");
            }
        }
    }
    mmu.unload_root(&mut vcpu);
});
