//! The kernel's guest_memfd selftest cases, on every backend this host can
//! run: sizes, flags, multiple files, read/write, mmap rules, punch hole,
//! faults past the end and on private memory, the fallocate table, the
//! invalid punch-hole cases, and fallocate without KEEP_SIZE.

mod common;

use common::{SHARED_MMAP, cases, guest_memfd_case, killing_signal, touch};
use gmem::consts::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
use gmem::{GmemError, ViewKind};

const KEEP: i32 = libc::FALLOC_FL_KEEP_SIZE;
const PUNCH: i32 = libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE;

fn errno<T: std::fmt::Debug>(result: Result<T, GmemError>) -> i32 {
    result.expect_err("expected an error").errno()
}

#[test]
fn invalid_sizes_are_einval() {
    for case in cases(4) {
        let sizes: Vec<u64> = if case.page == 4096 {
            (0..case.page).collect()
        } else {
            // Every 4 KiB multiple below a huge page, and a few odd sizes.
            (0..case.page)
                .step_by(4096)
                .chain([1, 4095, case.page - 1, case.page + 4096])
                .collect()
        };
        for size in sizes {
            assert_eq!(
                errno(case.create(size, SHARED_MMAP)),
                libc::EINVAL,
                "{}: size {size}",
                case.name
            );
        }
    }
}

#[test]
fn each_flag_bit_is_accepted_only_when_supported() {
    for case in cases(4) {
        let supported = case.supported_flags();
        for bit in 0..64 {
            let flag = 1u64 << bit;
            let result = case.create(case.page, flag);
            if flag & supported != 0 {
                assert!(result.is_ok(), "{}: flag {flag:#x}: {result:?}", case.name);
            } else {
                assert_eq!(errno(result), libc::EINVAL, "{}: flag {flag:#x}", case.name);
            }
        }
    }
}

#[test]
fn two_files_of_different_sizes_coexist() {
    for case in cases(4) {
        let one = case.create(case.page, SHARED_MMAP).unwrap();
        let two = case.create(2 * case.page, SHARED_MMAP).unwrap();
        assert_eq!(one.stat_size().unwrap(), case.page, "{}", case.name);
        assert_eq!(two.stat_size().unwrap(), 2 * case.page, "{}", case.name);
        assert_eq!((one.size(), two.size()), (case.page, 2 * case.page));
    }
}

#[test]
fn read_write_and_resize_fail() {
    for case in cases(4) {
        let file = case.create(4 * case.page, SHARED_MMAP).unwrap();
        let mut buf = [0u8; 16];
        assert!(file.read(&mut buf).is_err(), "{}: read", case.name);
        assert!(file.write(&buf).is_err(), "{}: write", case.name);
        assert!(
            file.set_len(8 * case.page).is_err(),
            "{}: resize",
            case.name
        );
        assert_eq!(file.stat_size().unwrap(), 4 * case.page);
    }
}

#[test]
fn mmap_needs_the_flag_and_a_shared_mapping() {
    for case in cases(4) {
        let unmappable = case
            .create(case.page, GUEST_MEMFD_FLAG_INIT_SHARED)
            .unwrap();
        assert_eq!(
            errno(unmappable.map(0, case.page)),
            libc::ENODEV,
            "{}: mmap without MMAP",
            case.name
        );
        let file = case.create(case.page, SHARED_MMAP).unwrap();
        assert_eq!(
            errno(file.mmap(0, case.page, libc::MAP_PRIVATE, ViewKind::Host)),
            libc::EINVAL,
            "{}: MAP_PRIVATE",
            case.name
        );
        assert!(file.map(0, case.page).is_ok(), "{}", case.name);
    }
}

#[test]
fn punched_pages_read_back_zero() {
    for case in cases(4) {
        let total = 4 * case.page;
        let file = case.create(total, SHARED_MMAP).unwrap();
        let view = file.map(0, total).unwrap();
        view.fill(0, total, 0xaa).unwrap();
        file.punch_hole(0, case.page).unwrap();
        let mut page = vec![0u8; case.page as usize];
        view.read_at(0, &mut page).unwrap();
        assert!(
            page.iter().all(|&b| b == 0),
            "{}: page 0 not zero",
            case.name
        );
        for i in 1..4 {
            view.read_at(i * case.page, &mut page).unwrap();
            assert!(
                page.iter().all(|&b| b == 0xaa),
                "{}: page {i} lost its data",
                case.name
            );
        }
        // A 4 KiB punch inside a bigger page zeroes just that part.
        file.punch_hole(case.page + 4096, 4096).unwrap();
        let mut small = [0u8; 4096];
        view.read_at(case.page + 4096, &mut small).unwrap();
        assert_eq!(small, [0; 4096], "{}", case.name);
        view.read_at(case.page, &mut small).unwrap();
        assert_eq!(small, [0xaa; 4096], "{}", case.name);
    }
}

#[test]
fn access_past_the_end_faults() {
    for case in cases(4) {
        let total = 4 * case.page;
        let file = case.create(total, SHARED_MMAP).unwrap();
        // A mapping one page longer than the file.
        let view = file.map(0, total + case.page).unwrap();
        view.fill(0, total, 1).unwrap();
        let inside = view.as_ptr();
        let signal = killing_signal(|| {
            // SAFETY: inside the mapping and the file.
            unsafe { touch(inside) };
        });
        assert_eq!(signal, None, "{}: access inside the file", case.name);
        // SAFETY: past the end of the file but inside the mapping.
        let past = unsafe { view.as_ptr().add(total as usize) };
        let signal = killing_signal(|| {
            // SAFETY: inside the mapping; the access is expected to fault.
            unsafe { touch(past) };
        });
        assert!(
            signal == Some(libc::SIGBUS),
            "{}: access past the end gave {signal:?}",
            case.name
        );
        assert!(matches!(
            view.read_at(total, &mut [0; 1]),
            Err(GmemError::Fault { .. })
        ));
    }
}

#[test]
fn access_to_private_memory_faults() {
    for case in cases(4) {
        // Created private (no INIT_SHARED): the host cannot touch it.
        let file = case.create(case.page, GUEST_MEMFD_FLAG_MMAP).unwrap();
        let view = file.map(0, case.page).unwrap();
        let ptr = view.as_ptr();
        let signal = killing_signal(|| {
            // SAFETY: inside the mapping; the access is expected to fault.
            unsafe { touch(ptr) };
        });
        assert!(
            signal == Some(libc::SIGBUS),
            "{}: access to private memory gave {signal:?}",
            case.name
        );
        assert!(matches!(
            view.read_at(0, &mut [0; 1]),
            Err(GmemError::Fault { .. })
        ));
    }
}

#[test]
fn the_fallocate_table() {
    for case in cases(4) {
        let page = case.page;
        let total = 4 * page;
        let file = case.create(total, SHARED_MMAP).unwrap();
        let steps: [(i32, u64, u64, bool); 9] = [
            (KEEP, 0, total, true),
            (KEEP, page - 1, page, false),
            (KEEP, total, page, false),
            (KEEP, total + page, page, false),
            (PUNCH, total, page, true),
            (PUNCH, total + page, page, true),
            (PUNCH, page, page - 1, false),
            (PUNCH, page, page, true),
            (KEEP, page, page, true),
        ];
        for (i, (mode, offset, len, ok)) in steps.into_iter().enumerate() {
            let result = file.fallocate(mode, offset, len);
            assert_eq!(
                result.is_ok(),
                ok,
                "{}: step {} fallocate({mode:#x}, {offset:#x}, {len:#x}) gave {result:?}",
                case.name,
                i + 1
            );
        }
    }
}

#[test]
fn unaligned_punch_holes_are_einval() {
    for case in cases(4) {
        let page = 4096;
        let file = case.create(4 * case.page, SHARED_MMAP).unwrap();
        let cases: [(u64, u64); 10] = [
            (0, 1),
            (0, page - 1),
            (0, page + 1),
            (1, 1),
            (1, page - 1),
            (1, page),
            (1, page + 1),
            (page, 1),
            (page, page - 1),
            (page, page + 1),
        ];
        for (offset, len) in cases {
            assert_eq!(
                errno(file.punch_hole(offset, len)),
                libc::EINVAL,
                "{}: punch {offset:#x}+{len:#x}",
                case.name
            );
        }
    }
}

#[test]
fn fallocate_without_keep_size_is_eopnotsupp() {
    for case in cases(4) {
        let file = case.create(4 * case.page, SHARED_MMAP).unwrap();
        for mode in [0, libc::FALLOC_FL_PUNCH_HOLE] {
            assert_eq!(
                errno(file.fallocate(mode, 0, case.page)),
                libc::EOPNOTSUPP,
                "{}: mode {mode:#x}",
                case.name
            );
        }
        assert_eq!(
            errno(file.fallocate(KEEP | libc::FALLOC_FL_ZERO_RANGE, 0, case.page)),
            libc::EOPNOTSUPP,
            "{}",
            case.name
        );
    }
}

/// The fallocate argument rules, compared with the kernel's guest_memfd on
/// this host (when KVM offers it) over a matrix of modes (every mode bit of
/// `vfs_fallocate` alone and with KEEP_SIZE, combinations, unknown bits) and
/// offsets and lengths at the edges of `loff_t`. Without KVM, every backend
/// must still agree with the others.
#[test]
fn fallocate_arguments_are_checked_in_the_kernels_order_on_every_backend() {
    let modes = [
        0, 0x1, 0x2, 0x3, 0x8, 0x9, 0x10, 0x11, 0x12, 0x13, 0x20, 0x21, 0x40, 0x41, 0x80, 0x81,
        0x100, 0x101,
    ];
    let values: [u64; 9] = [
        0,
        1,
        4096,
        1 << 62,
        (1 << 63) - 4096,
        1 << 63,
        u64::MAX - 4095,
        u64::MAX,
        (1 << 63) - 1,
    ];
    let mut answers: Option<(&'static str, Vec<i32>)> = None;
    for case in cases(4) {
        let file = case.create(4 * case.page, SHARED_MMAP).unwrap();
        let mut got = Vec::new();
        for mode in modes {
            for offset in values {
                for len in values {
                    let errno = file
                        .fallocate(mode, offset, len)
                        .err()
                        .map_or(0, |e| e.errno());
                    got.push(errno);
                }
            }
        }
        // The kernel's guest_memfd (last in `cases`) is the reference; the
        // others must agree with the first backend until then.
        if let Some((first, reference)) = &answers {
            let mut at = 0;
            for mode in modes {
                for offset in values {
                    for len in values {
                        assert_eq!(
                            got[at], reference[at],
                            "{} vs {first}: fallocate({mode:#x}, {offset:#x}, {len:#x})",
                            case.name
                        );
                        at += 1;
                    }
                }
            }
        }
        if answers.is_none() || case.is(gmem::BackendKind::Kvm) {
            answers = Some((case.name, got));
        }
    }
}

/// A punch whose length is negative as a `loff_t` must never be cut at the
/// end of the file and wipe it: it is EINVAL, and the data stays.
#[test]
fn a_punch_of_half_the_address_space_wipes_nothing() {
    for case in cases(4) {
        let total = 4 * case.page;
        let file = case.create(total, SHARED_MMAP).unwrap();
        let view = file.map(0, total).unwrap();
        view.fill(0, total, 0x5a).unwrap();
        for (offset, len, errno) in [
            (0, 1u64 << 63, libc::EINVAL),
            (0, !4095, libc::EINVAL),
            (1 << 63, 4096, libc::EINVAL),
            (4096, (1 << 63) - 4096, libc::EFBIG),
            (0, 0, libc::EINVAL),
        ] {
            assert_eq!(
                errno_of(file.punch_hole(offset, len)),
                errno,
                "{}: punch {offset:#x}+{len:#x}",
                case.name
            );
        }
        assert_eq!(
            errno_of(file.fallocate(0, 0, 0)),
            libc::EINVAL,
            "{}: mode 0, length 0",
            case.name
        );
        let mut back = vec![0u8; total as usize];
        view.read_at(0, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 0x5a), "{}: data lost", case.name);
    }
}

fn errno_of(result: Result<(), GmemError>) -> i32 {
    result.err().map_or(0, |e| e.errno())
}

/// `mmap` arguments, compared with the kernel's guest_memfd on this host
/// over offsets, lengths and map flags at their edges, on files with and
/// without GUEST_MEMFD_FLAG_MMAP: the offset and the length are checked
/// before the MMAP flag, `MAP_SHARED_VALIDATE` is a shared mapping, and an
/// unaligned length is rounded up to whole pages. (HugeTLB files, whose
/// pages are bigger, are left out of the comparison.)
#[test]
fn mmap_arguments_are_checked_in_the_kernels_order() {
    let offsets: [u64; 5] = [0, 1, 4096, 1 << 63, !4095u64];
    let lens: [u64; 7] = [0, 1, 4096, 4097, 1 << 48, (1 << 63) - 4096, u64::MAX];
    let map_flags = [
        libc::MAP_SHARED,
        libc::MAP_PRIVATE,
        0x03, // MAP_SHARED_VALIDATE
        0,
        0x0f,
        libc::MAP_SHARED | libc::MAP_POPULATE,
        0x03 | libc::MAP_NORESERVE,
        0x03 | 0x80000, // MAP_SYNC, which guest_memfd does not take
    ];
    let mut reference: Option<(&'static str, Vec<i32>)> = None;
    for case in cases(0).into_iter().filter(|case| case.page == 4096) {
        let mut got = Vec::new();
        for file_flags in [SHARED_MMAP, GUEST_MEMFD_FLAG_INIT_SHARED] {
            let file = case.create(4 * case.page, file_flags).unwrap();
            for offset in offsets {
                for len in lens {
                    for flags in map_flags {
                        let result = file.mmap(offset, len, flags, ViewKind::Host);
                        if let Ok(view) = &result {
                            assert_eq!(view.len(), len.next_multiple_of(4096));
                        }
                        got.push(result.err().map_or(0, |e| e.errno()));
                    }
                }
            }
        }
        if let Some((first, answers)) = &reference {
            let mut at = 0;
            for file_flags in [SHARED_MMAP, GUEST_MEMFD_FLAG_INIT_SHARED] {
                for offset in offsets {
                    for len in lens {
                        for flags in map_flags {
                            assert_eq!(
                                got[at], answers[at],
                                "{} vs {first}: file flags {file_flags:#x}, \
                                 mmap({offset:#x}, {len:#x}, {flags:#x})",
                                case.name
                            );
                            at += 1;
                        }
                    }
                }
            }
        }
        if reference.is_none() || case.is(gmem::BackendKind::Kvm) {
            reference = Some((case.name, got));
        }
    }
}

/// `check_mmap` predicts what the kernel's own `mmap(2)` of a guest_memfd
/// says, called directly on the descriptor (no reservation of ours in
/// between), over the same edges.
#[test]
fn check_mmap_predicts_the_kernels_mmap_of_a_guest_memfd() {
    let Some(case) = guest_memfd_case() else {
        return;
    };
    use std::os::fd::AsRawFd;
    for file_flags in [SHARED_MMAP, GUEST_MEMFD_FLAG_INIT_SHARED] {
        let file = case.create(4 * 4096, file_flags).unwrap();
        let fd = file.fd().expect("guest_memfd has a descriptor").as_raw_fd();
        for offset in [0u64, 1, 4096, 1 << 62, 1 << 63, !4095u64] {
            for len in [0u64, 1, 4097, 1 << 48, (1 << 63) - 4096, u64::MAX] {
                for flags in [
                    libc::MAP_SHARED,
                    libc::MAP_PRIVATE,
                    0x03,
                    0,
                    0x0f,
                    0x03 | 0x80000,
                ] {
                    // SAFETY: a fresh mapping at an address the kernel picks,
                    // unmapped at once; nothing reads or writes it.
                    let addr = unsafe {
                        libc::mmap(
                            std::ptr::null_mut(),
                            len as usize,
                            libc::PROT_READ | libc::PROT_WRITE,
                            flags,
                            fd,
                            offset as libc::off_t,
                        )
                    };
                    let kernel = if addr == libc::MAP_FAILED {
                        std::io::Error::last_os_error().raw_os_error().unwrap()
                    } else {
                        // SAFETY: the mapping just made, of this length.
                        unsafe { libc::munmap(addr, len as usize) };
                        0
                    };
                    let predicted = gmem::check_mmap(offset, len, flags, file_flags, 4096)
                        .err()
                        .map_or(0, |e| e.errno());
                    assert_eq!(
                        predicted, kernel,
                        "file flags {file_flags:#x}: mmap({offset:#x}, {len:#x}, {flags:#x})"
                    );
                }
            }
        }
    }
}

/// Resident memory of this process, in bytes.
fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// A large file is sparse on every backend the kernel would create it on
/// (guest_memfd creates any size): 64 GiB and 1 TiB files are created,
/// mapped and used at both ends without taking more than a few pages.
/// HugeTLB is left out: it reserves its huge pages when the file is made.
#[test]
fn large_sparse_files_allocate_nothing_until_used() {
    for case in cases(0).into_iter().filter(|case| case.page == 4096) {
        for size in [64u64 << 30, 1 << 40] {
            let before = resident_bytes();
            let file = case
                .create(size, SHARED_MMAP)
                .unwrap_or_else(|err| panic!("{}: {size:#x}: {err}", case.name));
            let view = file.map(0, size).unwrap();
            for at in [0, size / 2, size - 4096] {
                view.write_at(at, &[0xa5; 64]).unwrap();
                let mut back = [0u8; 64];
                view.read_at(at, &mut back).unwrap();
                assert_eq!(back, [0xa5; 64], "{}: {size:#x} at {at:#x}", case.name);
            }
            let grown = resident_bytes().saturating_sub(before);
            assert!(
                grown < 64 << 20,
                "{}: a {size:#x}-byte file took {grown} resident bytes",
                case.name
            );
        }
    }
}
