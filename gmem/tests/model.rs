//! Random convert / punch / write / read sequences against a model of
//! (attribute, contents) per 4 KiB page, on memfd and HugeTLB files.

mod common;

use common::{SHARED_MMAP, hugetlb_available};
use gmem::{Attribute, Backend, GmemConfig, GmemError, GuestMemFile};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Convert {
        first: u64,
        pages: u64,
        private: bool,
    },
    Punch {
        first: u64,
        pages: u64,
    },
    Write {
        page: u64,
        byte: u8,
    },
    Read {
        page: u64,
    },
}

fn ops(pages: u64) -> impl Strategy<Value = Vec<Op>> {
    let op = prop_oneof![
        3 => (0..pages, 1..pages / 2, any::<bool>())
            .prop_map(|(first, pages, private)| Op::Convert { first, pages, private }),
        1 => (0..pages, 1..8u64).prop_map(|(first, pages)| Op::Punch { first, pages }),
        3 => (0..pages, 1..=255u8).prop_map(|(page, byte)| Op::Write { page, byte }),
        2 => (0..pages).prop_map(|page| Op::Read { page }),
    ];
    prop::collection::vec(op, 1..40)
}

/// Applies a convert, punch or write to the file and the model (`modeled`
/// pages of it); a read is the caller's. Returns whether it was applied.
fn apply(
    file: &GuestMemFile,
    host: &gmem::View,
    model: &mut [(Attribute, u8)],
    op: &Op,
) -> Result<bool, TestCaseError> {
    let modeled = model.len() as u64;
    match *op {
        Op::Convert {
            first,
            pages: count,
            private,
        } => {
            let end = (first + count).min(modeled);
            let to = if private {
                Attribute::Private
            } else {
                Attribute::Shared
            };
            file.convert(first * 4096, (end - first) * 4096, to)
                .unwrap();
            for page in &mut model[first as usize..end as usize] {
                page.0 = to;
            }
        }
        Op::Punch {
            first,
            pages: count,
        } => {
            // A punch may pass the end of what is modeled (and of the file).
            let end = (first + count).min(modeled);
            if modeled * 4096 == file.size() {
                file.punch_hole(first * 4096, count * 4096).unwrap();
            } else {
                file.punch_hole(first * 4096, (end - first) * 4096).unwrap();
            }
            for page in &mut model[first as usize..end as usize] {
                page.1 = 0;
            }
        }
        Op::Write { page, byte } => {
            let result = host.fill(page * 4096, 4096, byte);
            if model[page as usize].0 == Attribute::Private {
                let faulted = matches!(result, Err(GmemError::Fault { .. }));
                prop_assert!(faulted);
            } else {
                result.unwrap();
                model[page as usize].1 = byte;
            }
        }
        Op::Read { .. } => return Ok(false),
    }
    Ok(true)
}

fn run(backend: Backend, log2: u8, pages: u64, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let size = pages * 4096;
    let file = GuestMemFile::create(
        &backend,
        GmemConfig {
            size,
            flags: SHARED_MMAP,
            huge_page_size_log2: log2,
        },
    )
    .unwrap();
    let host = file.map(0, size).unwrap();
    let guest = file.map_guest(0, size).unwrap();
    let mut model = vec![(Attribute::Shared, 0u8); pages as usize];
    for op in ops {
        if !apply(&file, &host, &mut model, &op)?
            && let Op::Read { page } = op
        {
            let mut buf = [0u8; 64];
            let result = host.read_at(page * 4096 + 4032, &mut buf);
            match model[page as usize] {
                (Attribute::Private, _) => prop_assert!(result.is_err()),
                (Attribute::Shared, byte) => {
                    result.unwrap();
                    prop_assert_eq!(buf, [byte; 64]);
                }
            }
        }
        // The file agrees with the model everywhere, through the guest view.
        for (page, &(attr, byte)) in model.iter().enumerate() {
            let offset = page as u64 * 4096;
            prop_assert_eq!(file.attribute(offset), attr);
            let mut head = [0u8; 8];
            guest.read_at(offset, &mut head).unwrap();
            prop_assert_eq!(head, [byte; 8], "page {}", page);
        }
        // HugeTLB: a huge page is split exactly when its pages disagree.
        if log2 != 0 {
            let per_huge = (1u64 << log2) / 4096;
            let expected: Vec<u64> = (0..pages / per_huge)
                .filter(|&huge| {
                    let slice =
                        &model[(huge * per_huge) as usize..((huge + 1) * per_huge) as usize];
                    slice.iter().any(|p| p.0 != slice[0].0)
                })
                .collect();
            prop_assert_eq!(file.split_huge_pages(), expected);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn memfd_agrees_with_the_model(ops in ops(24)) {
        run(Backend::Memfd, 0, 24, ops)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn hugetlb_agrees_with_the_model(ops in ops(1024)) {
        if !hugetlb_available(2 << 20, 2) {
            return Ok(());
        }
        run(Backend::Hugetlb, 21, 1024, ops)?;
    }
}

/// Pages of a 1 GiB file the 1 GiB model converts, writes and checks: its
/// first 16 MiB (eight 2 MiB pieces); the rest stays shared and zero.
const TIERED_PAGES: u64 = 4096;

fn run_1g(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let size = 1u64 << 30;
    let file = GuestMemFile::create(
        &Backend::Hugetlb,
        GmemConfig {
            size,
            flags: SHARED_MMAP,
            huge_page_size_log2: 30,
        },
    )
    .unwrap();
    let host = file.map(0, size).unwrap();
    let mut model = vec![(Attribute::Shared, 0u8); TIERED_PAGES as usize];
    let mut guest = file.map_guest(0, size).unwrap();
    for (step, op) in ops.into_iter().enumerate() {
        if !apply(&file, &host, &mut model, &op)? {
            // A read: a view made now maps every unit from where it lies.
            guest = file.map_guest(0, size).unwrap();
        }
        for (page, &(attr, byte)) in model.iter().enumerate() {
            let offset = page as u64 * 4096;
            prop_assert_eq!(file.attribute(offset), attr);
            let mut head = [0u8; 8];
            guest.read_at(offset, &mut head).unwrap();
            prop_assert_eq!(head, [byte; 8], "step {} page {}", step, page);
        }
        // The 1 GiB page is split exactly when its pages disagree, and then
        // only the mixed 2 MiB pieces are on 4 KiB pages.
        let mixed_piece = |piece: usize| {
            let slice = &model[piece * 512..(piece + 1) * 512];
            slice.iter().any(|p| p.0 != slice[0].0)
        };
        let whole_mixed = model.iter().any(|p| p.0 != model[0].0);
        prop_assert_eq!(
            file.split_huge_pages(),
            if whole_mixed { vec![0] } else { vec![] }
        );
        let tiered = file.metrics().split_now > 0 && whole_mixed;
        for piece in 0..(TIERED_PAGES / 512) as usize {
            let order = file.page_order(piece as u64 * (2 << 20));
            let expected = match (whole_mixed, mixed_piece(piece)) {
                (false, _) => 18,
                (true, true) => 0,
                (true, false) if tiered => 9,
                (true, false) => 0,
            };
            prop_assert_eq!(order, expected, "piece {}", piece);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]

    #[test]
    fn a_1g_hugetlb_page_splits_in_two_tiers_as_the_model_says(ops in ops(TIERED_PAGES)) {
        if !hugetlb_available(1 << 30, 1) || !hugetlb_available(2 << 20, 600) {
            return Ok(());
        }
        run_1g(ops)?;
    }
}
