//! Random fault / zap / split / convert sequences on a TD, with BUSY
//! injected now and then (PAMT.ADD included) and DEMOTE or REMOVE failing
//! after their BLOCK: after every step the module's S-EPT equals the mirror,
//! no entry is left blocked (a failure after BLOCK is undone with UNBLOCK),
//! no private leaf is above 2M, a demoted range has its 4K PAMT (taken by
//! DEMOTE), and no page is both a PAMT page and an S-EPT page; at the end,
//! after teardown, every page is back with its owner.

mod common;

use split::{Gfn, Gpa, Hpa};
use std::collections::HashSet;

use common::{assert_mirrored, td, teardown_and_check};
use proptest::prelude::*;
use split::AccessKind;
use split::{HookError, Level, MmuError};
use tdx_ext::pamt::PamtPolicy;
use tdx_ext::{Seamcall, TdxStatus};

const PAGES: u64 = 4096;

#[derive(Clone, Debug)]
enum Op {
    Fault { page: u64 },
    Zap { first: u64, pages: u64 },
    Split { first: u64, pages: u64 },
    Convert { first: u64, pages: u64 },
    Busy { leaf: usize },
    FailAfterBlock { demote: bool },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0..PAGES).prop_map(|page| Op::Fault { page }),
        1 => (0..PAGES, 1..1024u64).prop_map(|(first, pages)| Op::Zap { first, pages }),
        2 => (0..PAGES, 1..1024u64).prop_map(|(first, pages)| Op::Split { first, pages }),
        1 => (0..PAGES, 1..64u64).prop_map(|(first, pages)| Op::Convert { first, pages }),
        1 => (0..5usize).prop_map(|leaf| Op::Busy { leaf }),
        1 => any::<bool>().prop_map(|demote| Op::FailAfterBlock { demote }),
    ]
}

const BUSY_LEAVES: [Seamcall; 5] = [
    Seamcall::MemSeptAdd,
    Seamcall::MemPageAug,
    Seamcall::MemPageRemove,
    Seamcall::MemPageDemote,
    Seamcall::PhymemPamtAdd,
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn mirror_and_sept_agree_and_every_page_comes_back(
        ops in prop::collection::vec(op(), 1..30),
        on_install in any::<bool>(),
        pfn_offset in prop_oneof![Just(0u64), Just(1u64)],
    ) {
        let policy = if on_install { PamtPolicy::OnInstall } else { PamtPolicy::OnCacheEntry };
        let t = td(policy, PAGES, pfn_offset);
        let mut vcpu = t.mmu.new_vcpu_caches();
        for op in ops {
            // BUSY twice in a row (two injections) is a persistent failure:
            // the operation reports it, and everything must still agree.
            let result = match op {
                Op::Fault { page } => t.mmu.fault(&mut vcpu, Gpa(page << 12), AccessKind::Write).map(drop),
                Op::Zap { first, pages } => t.mmu.zap_range(Gfn(first), Gfn(first + pages)),
                Op::Split { first, pages } => {
                    t.mmu.split_huge_pages(Gfn(first), Gfn(first + pages), Level::L4K).map(drop)
                }
                Op::Convert { first, pages } => {
                    // Private to shared: split what straddles the range, then
                    // drop the private mappings in it.
                    t.mmu
                        .split_cross_boundary(Gfn(first), Gfn(first + pages))
                        .and_then(|_| t.mmu.zap_range(Gfn(first), Gfn(first + pages)))
                }
                Op::Busy { leaf } => {
                    t.module.inject(BUSY_LEAVES[leaf], 1, TdxStatus::OperandBusy, 1);
                    Ok(())
                }
                Op::FailAfterBlock { demote } => {
                    let leaf = if demote { Seamcall::MemPageDemote } else { Seamcall::MemPageRemove };
                    t.module.inject(leaf, 1, TdxStatus::OperandInvalid, 1);
                    Ok(())
                }
            };
            if let Err(err) = result {
                let expected = matches!(err, MmuError::Hook(HookError::Busy { .. }))
                    || err.to_string().contains("TDX_OPERAND_INVALID");
                prop_assert!(expected, "{}", err);
            }
            assert_mirrored(&t);
            for (&(level, gpa), &(page, blocked)) in &t.module.leaves() {
                prop_assert!(!blocked, "leaf {:#x} left blocked", gpa);
                prop_assert!(level <= 2, "a {}-level private leaf", level);
                if level == 1 {
                    prop_assert!(t.module.pamt_pair(page.align_down(2 << 20)).is_some());
                }
            }
            let tables: HashSet<Hpa> = t.module.tables().values().flatten().copied().collect();
            for page in t.module.pamt_pages() {
                prop_assert!(!tables.contains(&page), "{:#x} is PAMT and S-EPT", page);
            }
        }
        teardown_and_check(t, vec![vcpu]);
    }
}
