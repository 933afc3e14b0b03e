//! Random SEAMCALL sequences on the software TDX module: never a panic; the
//! S-EPT stays consistent (every leaf and table hangs off a table, no
//! private leaf is above 2M, every 4K leaf's range has a 4K PAMT); when an
//! operation succeeds, its inverse succeeds right after (UNBLOCK for BLOCK);
//! a DEMOTE of a 2M leaf takes a PAMT pair, and PAMT.ADD is refused on a
//! range mapped 2M.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use split::Level;
use split::{Gpa, Hpa};
use tdx_ext::{PageState, SimTdxModule, TdxModule};

const SEPT: u64 = 0x1_0000_0000;
const GUEST: u64 = 0x2_0000_0000;
const PAMT: u64 = 0x3_0000_0000;

#[derive(Arbitrary, Debug)]
enum Op {
    SeptAdd {
        gpa: u8,
        level: u8,
        page: u8,
        undo: bool,
    },
    Aug {
        gpa: u16,
        level: u8,
        page: u16,
        undo: bool,
    },
    Add {
        gpa: u16,
        page: u16,
    },
    Block {
        gpa: u16,
        level: u8,
    },
    Track,
    Kick,
    Remove {
        gpa: u16,
        level: u8,
    },
    SeptRemove {
        gpa: u8,
        level: u8,
    },
    Demote {
        gpa: u8,
        page: u8,
        pair: Option<u8>,
        /// The same page as both halves of the pair.
        same: bool,
    },
    Unblock {
        gpa: u16,
        level: u8,
    },
    Wbinvd {
        page: u16,
    },
    PamtAdd {
        region: u8,
        pages: u8,
        undo: bool,
        /// The same page as both halves of the pair.
        same: bool,
    },
    PamtRemove {
        region: u8,
    },
    Finalize,
    ReleaseKey,
    Reclaim {
        page: u16,
    },
}

fn level(raw: u8) -> Level {
    Level::new(raw % 4 + 1).unwrap()
}

fn block_track_kick(module: &SimTdxModule, gpa: u64, level: Level) {
    module
        .range_block(Gpa(gpa), level)
        .expect("block after a successful add");
    module.track().unwrap();
    module.kick_vcpus();
}

fuzz_target!(|ops: Vec<Op>| {
    let module = SimTdxModule::new(4);
    for op in ops.into_iter().take(64) {
        match op {
            Op::SeptAdd {
                gpa,
                level: l,
                page,
                undo,
            } => {
                let lvl = level(l % 3);
                let gpa = u64::from(gpa) << (12 + 9 * u32::from(lvl.get()));
                let page = SEPT + u64::from(page) * 4096;
                if module.sept_add(Gpa(gpa), lvl, Hpa(page)).is_ok() && undo {
                    let parent = Level::new(lvl.get() + 1).unwrap();
                    block_track_kick(&module, gpa, parent);
                    assert_eq!(
                        module.sept_remove(Gpa(gpa), lvl),
                        Ok(Hpa(page)),
                        "the inverse of SEPT.ADD"
                    );
                    module.page_wbinvd(Hpa(page)).unwrap();
                }
            }
            Op::Aug {
                gpa,
                level: l,
                page,
                undo,
            } => {
                let lvl = level(l % 2);
                let shift = 12 + 9 * u32::from(lvl.get() - 1);
                let gpa = (u64::from(gpa) << shift) & ((1 << 39) - 1);
                let page = GUEST + (u64::from(page) << shift);
                if module.page_aug(Gpa(gpa), lvl, Hpa(page)).is_ok() && undo {
                    block_track_kick(&module, gpa, lvl);
                    assert_eq!(
                        module.page_remove(Gpa(gpa), lvl),
                        Ok(Hpa(page)),
                        "the inverse of AUG"
                    );
                    for i in 0..lvl.entry_bytes() / 4096 {
                        module.page_wbinvd(Hpa(page + i * 4096)).unwrap();
                    }
                }
            }
            Op::Add { gpa, page } => {
                let _ = module.page_add(
                    Gpa(u64::from(gpa) << 12),
                    Hpa(GUEST + (u64::from(page) << 12)),
                );
            }
            Op::Block { gpa, level: l } => {
                let (gpa, lvl) = (u64::from(gpa) << 12, level(l));
                if module.range_block(Gpa(gpa), lvl).is_ok() {
                    // Its inverse, once tracked.
                    module.track().unwrap();
                    module.kick_vcpus();
                    assert_eq!(
                        module.range_unblock(Gpa(gpa), lvl),
                        Ok(()),
                        "the inverse of BLOCK"
                    );
                    module.range_block(Gpa(gpa), lvl).unwrap();
                }
            }
            Op::Unblock { gpa, level: l } => {
                let _ = module.range_unblock(Gpa(u64::from(gpa) << 12), level(l));
            }
            Op::Track => {
                module.track().unwrap();
            }
            Op::Kick => module.kick_vcpus(),
            Op::Remove { gpa, level: l } => {
                let _ = module.page_remove(Gpa(u64::from(gpa) << 12), level(l));
            }
            Op::SeptRemove { gpa, level: l } => {
                let lvl = level(l % 3);
                let _ =
                    module.sept_remove(Gpa(u64::from(gpa) << (12 + 9 * u32::from(lvl.get()))), lvl);
            }
            Op::Demote {
                gpa,
                page,
                pair,
                same,
            } => {
                let pair = pair.map(|p| {
                    let base = PAMT + (1 << 30) + u64::from(p) * 8192;
                    [Hpa(base), Hpa(if same { base } else { base + 4096 })]
                });
                let result = module.page_demote(
                    Gpa(u64::from(gpa) << 21),
                    Level::L2M,
                    Hpa(SEPT + u64::from(page) * 4096),
                    pair,
                );
                if result.is_ok() {
                    assert!(pair.is_some(), "a 2M DEMOTE needs the PAMT pair");
                    assert!(!same, "DEMOTE took one page as both PAMT pages");
                }
                // `pamt_demote()` never compares the two: the second bitmap
                // test-and-set fails, TDX_PAGE_NOT_FREE, never
                // TDX_OPERAND_INVALID.
                if same {
                    assert_ne!(result, Err(tdx_ext::TdxStatus::OperandInvalid));
                }
            }
            Op::Wbinvd { page } => {
                let _ = module.page_wbinvd(Hpa(GUEST + (u64::from(page) << 12)));
            }
            Op::PamtAdd {
                region,
                pages,
                undo,
                same,
            } => {
                let region =
                    [SEPT, GUEST][usize::from(region & 1)] + (u64::from(region >> 1) << 21);
                let first = PAMT + u64::from(pages) * 8192;
                let pair = [Hpa(first), Hpa(if same { first } else { first + 4096 })];
                let had_pair = module.pamt_pair(Hpa(region)).is_some();
                let mapped_2m = module.leaves().values().any(|&(page, _)| {
                    page == Hpa(region)
                        && module.page_state(page) == Some(PageState::Guest { level: 2 })
                });
                let added = module.pamt_add(Hpa(region), pair);
                if mapped_2m {
                    assert_eq!(added, Err(tdx_ext::TdxStatus::HpaRangeNotFree));
                } else if same && !had_pair {
                    // `tdh_phymem_pamt_add()`: the second PAMT_PAGE_BITMAP
                    // test-and-set fails.
                    assert_eq!(added, Err(tdx_ext::TdxStatus::PageNotFree));
                }
                // Decoding the module's published values (Dynamic PAMT
                // codes from tdx_error_codes_defs.h) gives each status back.
                if let Err(status) = added {
                    assert_eq!(tdx_ext::TdxStatus::from_raw(status.raw()), status);
                }
                if added.is_ok() && undo {
                    assert_eq!(
                        module.pamt_remove(Hpa(region)),
                        Ok(pair),
                        "the inverse of PAMT.ADD"
                    );
                }
            }
            Op::PamtRemove { region } => {
                let region =
                    [SEPT, GUEST][usize::from(region & 1)] + (u64::from(region >> 1) << 21);
                let _ = module.pamt_remove(Hpa(region));
            }
            Op::Finalize => {
                let _ = module.finalize();
            }
            Op::ReleaseKey => {
                let _ = module.release_key();
            }
            Op::Reclaim { page } => {
                let _ = module.page_reclaim(Hpa(GUEST + (u64::from(page) << 12)));
            }
        }
        // Consistency: every S-EPT page is held as one, every leaf's page is
        // guest memory, and every non-root table has its parent.
        let tables = module.tables();
        for (&(lvl, gpa), page) in &tables {
            if let Some(page) = page {
                assert_eq!(module.page_state(*page), Some(PageState::Sept));
            }
            if lvl < 4 {
                let parent_base = gpa.align_down(4096u64 << (9 * u32::from(lvl + 1)));
                let parent_base = if lvl + 1 == 4 { Gpa(0) } else { parent_base };
                assert!(
                    tables.contains_key(&(lvl + 1, parent_base)),
                    "orphan table {lvl}/{gpa:#x}"
                );
            }
        }
        for (&(lvl, gpa), &(page, _)) in &module.leaves() {
            assert!(matches!(
                module.page_state(page),
                Some(PageState::Guest { .. })
            ));
            assert!(lvl <= 2, "a {lvl}-level private leaf");
            if lvl == 1 {
                assert!(module.pamt_pair(page.align_down(2 << 20)).is_some());
            }
            let base = if lvl == 4 {
                Gpa(0)
            } else {
                gpa.align_down(4096u64 << (9 * u32::from(lvl)))
            };
            assert!(tables.contains_key(&(lvl, base)), "leaf without a table");
        }
    }
});
