//! Model-based property test: random fault / access / zap / split / dirty-log
//! sequences, with the page allocator failing at times, against a flat map
//! of gfn -> hpa. Only zaps and disabling dirty logging remove mappings
//! (a lazy split keeps the 511 neighbours), and dirty logging never fails
//! for lack of memory (eager splitting is best effort).

mod common;

use common::{MIB_PAGES, checked_stats, failing_mmu};
use mmu_cache::alloc::{FailPolicy, PageAllocator};
use proptest::prelude::*;
use split::AccessKind;
use split::{Gfn, Gpa, Hpa, Pfn};
use split::{Level, LogMode, Memslot, MmuConfig};

/// Two slots: 8 MiB at gfn 0 (host frames 2M-aligned) and 4 MiB + 12 KiB
/// at gfn 0x1000 whose host frames are offset by 3 (so only 4K leaves).
const SLOTS: [(u32, u64, u64, u64); 2] = [
    (0, 0, 8 * MIB_PAGES, 0x10000),
    (1, 0x1000, 4 * MIB_PAGES + 3, 0x20003),
];

#[derive(Clone, Debug)]
enum Op {
    Fault { gfn: u64, write: bool },
    Access { gfn: u64, write: bool },
    Zap { start: u64, len: u64 },
    Split { start: u64, len: u64, to_2m: bool },
    Boundary { start: u64, len: u64 },
    Enable { slot: u32, manual: bool },
    GetLog { slot: u32 },
    ClearAll { slot: u32 },
    Disable { slot: u32 },
    Policy(FailPolicy),
}

fn gfn() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..8 * MIB_PAGES,
        0x1000u64..0x1000 + 4 * MIB_PAGES + 3,
        Just(5 * MIB_PAGES * 4)
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (gfn(), any::<bool>()).prop_map(|(gfn, write)| Op::Fault { gfn, write }),
        4 => (gfn(), any::<bool>()).prop_map(|(gfn, write)| Op::Access { gfn, write }),
        1 => (gfn(), 1u64..2048).prop_map(|(start, len)| Op::Zap { start, len }),
        1 => (gfn(), 1u64..2048, any::<bool>()).prop_map(|(start, len, to_2m)| Op::Split { start, len, to_2m }),
        1 => (gfn(), 1u64..2048).prop_map(|(start, len)| Op::Boundary { start, len }),
        1 => (0u32..2, any::<bool>()).prop_map(|(slot, manual)| Op::Enable { slot, manual }),
        2 => (0u32..2).prop_map(|slot| Op::GetLog { slot }),
        1 => (0u32..2).prop_map(|slot| Op::ClearAll { slot }),
        1 => (0u32..2).prop_map(|slot| Op::Disable { slot }),
        1 => prop_oneof![
            Just(FailPolicy::Never),
            Just(FailPolicy::Always),
            (1u64..6).prop_map(FailPolicy::EveryKth),
        ].prop_map(Op::Policy),
    ]
}

fn host_frame(gfn: u64) -> Option<u64> {
    SLOTS
        .iter()
        .find(|(_, base, npages, _)| (*base..base + npages).contains(&gfn))
        .map(|(_, base, _, host)| host + (gfn - base))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn mmu_agrees_with_a_flat_model(ops in prop::collection::vec(op(), 1..60), eager in any::<bool>()) {
        let (counting, mmu) = failing_mmu(MmuConfig { eager_split: eager, split_cache_capacity: 7, ..MmuConfig::default() });
        for (id, base, npages, host) in SLOTS {
            mmu.add_memslot(Memslot::new(id, Gfn(base), npages, Pfn(host)).unwrap()).unwrap();
        }
        let mut vcpu = mmu.new_vcpu_caches();
        let mut logging = [false; 2];
        let mut failing = false;
        for op in ops {
            let removes = matches!(op, Op::Zap { .. } | Op::Disable { .. });
            let before = mapped(&mmu);
            match op {
                Op::Fault { gfn, write } => match mmu.fault(&mut vcpu, Gpa(gfn << 12), AccessKind::data(write)) {
                    Ok(t) => {
                        prop_assert_eq!(Some(t.hpa.pfn().0), host_frame(gfn));
                        prop_assert_eq!(mmu.translate(Gpa(gfn << 12)).map(|t| t.hpa.pfn().0), host_frame(gfn));
                    }
                    Err(split::MmuError::NoSlot { .. }) => prop_assert!(host_frame(gfn).is_none()),
                    Err(split::MmuError::Cache(_)) if failing => {}
                    Err(other) => prop_assert!(false, "fault: {}", other),
                },
                Op::Access { gfn, write } => match mmu.access(&mut vcpu, Gpa(gfn << 12), AccessKind::data(write)) {
                    split::Access::Hit(hpa) => prop_assert_eq!(Some(hpa.pfn().0), host_frame(gfn)),
                    split::Access::Miss => {}
                },
                Op::Zap { start, len } => {
                    mmu.zap_range(Gfn(start), Gfn(start + len)).unwrap();
                    for g in start..start + len { prop_assert!(mmu.translate(Gpa(g << 12)).is_none()); }
                }
                Op::Split { start, len, to_2m } => {
                    let target = if to_2m { Level::L2M } else { Level::L4K };
                    match mmu.split_huge_pages(Gfn(start), Gfn(start + len), target) {
                        Ok(_) => {
                            for g in [start, start + len - 1] {
                                if let Some(t) = mmu.translate(Gpa(g << 12)) { prop_assert!(t.level <= target); }
                            }
                        }
                        Err(split::MmuError::Cache(_)) if failing => {}
                        Err(other) => prop_assert!(false, "split: {}", other),
                    }
                }
                Op::Boundary { start, len } => match mmu.split_cross_boundary(Gfn(start), Gfn(start + len)) {
                    Ok(_) | Err(split::MmuError::Cache(_)) if failing => {}
                    result => { result.unwrap(); }
                },
                Op::Enable { slot, manual } => {
                    let mode = if manual { LogMode::ManualInitiallySet } else { LogMode::Classic };
                    mmu.enable_dirty_logging(slot, mode).unwrap();
                    logging[slot as usize] = true;
                }
                Op::GetLog { slot } => {
                    let result = mmu.get_dirty_log(slot);
                    prop_assert_eq!(result.is_ok(), logging[slot as usize]);
                }
                Op::ClearAll { slot } => {
                    let Ok(log) = mmu.get_dirty_log(slot) else { continue };
                    let manual = mmu.slot(slot).unwrap().log_mode() == Some(LogMode::ManualInitiallySet);
                    prop_assert_eq!(mmu.clear_dirty_log(slot, 0, &log).is_ok(), true);
                    // A page whose bit was cleared is split to 4K (eager,
                    // allocator willing) or write-protected under a huge
                    // leaf; its next write is logged either way.
                    let s = mmu.slot(slot).unwrap();
                    for g in [s.base_gfn().0, s.end_gfn().0 - 1] {
                        let page = g - s.base_gfn().0;
                        let cleared = log[(page / 64) as usize] & (1 << (page % 64)) != 0;
                        let Some(t) = mmu.translate(Gpa(g << 12)) else { continue };
                        if manual && cleared {
                            if eager && !failing {
                                prop_assert_eq!(t.level, Level::L4K);
                            }
                            if t.level > Level::L4K {
                                prop_assert!(t.perms & split::ept::WRITE == 0, "huge leaf left writable");
                            }
                        }
                    }
                }
                Op::Disable { slot } => {
                    mmu.disable_dirty_logging(slot).unwrap();
                    logging[slot as usize] = false;
                    let s = mmu.slot(slot).unwrap();
                    for (&g, _) in before.range(s.base_gfn().0..s.end_gfn().0) {
                        let now = mmu.translate(Gpa(g << 12));
                        if slot == 0 {
                            // Slot 0 can be mapped huge everywhere: every 4K
                            // mapping went, huge ones stay.
                            prop_assert!(now.is_none_or(|t| t.level > Level::L4K), "gfn {:#x}", g);
                        } else {
                            // Slot 1 can only be mapped 4K: nothing is zapped.
                            prop_assert!(now.is_some(), "4K-only gfn {:#x} was zapped", g);
                        }
                    }
                }
                Op::Policy(policy) => {
                    counting.inner().set_policy(policy);
                    failing = policy != FailPolicy::Never;
                }
            }
            if !removes {
                for (&g, &hpa) in &before {
                    prop_assert_eq!(mmu.translate(Gpa(g << 12)).map(|t| t.hpa), Some(hpa), "gfn {:#x} lost", g);
                }
            }
            // Every translation the tree gives agrees with the model.
            for (_, base, npages, _) in SLOTS {
                for g in (base..base + npages).step_by(61) {
                    if let Some(t) = mmu.translate(Gpa(g << 12)) {
                        prop_assert_eq!(Some(t.hpa.pfn().0), host_frame(g), "gfn {:#x}", g);
                    }
                }
            }
            checked_stats(&mmu);
            // Live tables == pages taken - pages returned.
            prop_assert_eq!(
                counting.pages_outstanding(),
                mmu.pages_held() + vcpu.tables.nr_free()
            );
        }
        drop(vcpu);
        drop(mmu);
        prop_assert_eq!(counting.pages_outstanding(), 0);
        prop_assert_eq!(counting.gets(), counting.frees());
    }
}

/// The sampled gfns the tree maps now, with their host addresses.
fn mapped(mmu: &split::TdpMmu) -> std::collections::BTreeMap<u64, Hpa> {
    SLOTS
        .iter()
        .flat_map(|&(_, base, npages, _)| (base..base + npages).step_by(61))
        .filter_map(|g| Some((g, mmu.translate(Gpa(g << 12))?.hpa)))
        .collect()
}
