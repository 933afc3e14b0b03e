//! Convert / punch / fallocate / mmap / write / read on memfd and anonymous
//! guest memory (HugeTLB too when pages are free) against a model of
//! attribute and contents per page. fallocate and mmap arguments reach the
//! edges of `loff_t`; every answer must be what `check_fallocate` and
//! `check_mmap` (the kernel's order) say, and a refused punch changes no
//! byte. The host view may come only at the first host access, so that a
//! HugeTLB page splits in place (no host view maps it) and moves to 4 KiB
//! pages when the view comes; a huge page is of order 0 exactly while its
//! pages disagree.
#![no_main]

use arbitrary::Arbitrary;
use gmem::consts::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
use gmem::{Attribute, Backend, GmemConfig, GuestMemFile};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Op {
    Convert {
        first: u16,
        pages: u16,
        private: bool,
    },
    Fallocate {
        mode: u16,
        offset: Edge,
        len: Edge,
    },
    Mmap {
        offset: Edge,
        len: Edge,
        flags: u8,
    },
    Write {
        page: u16,
        byte: u8,
    },
    Read {
        page: u16,
    },
}

/// A file offset or length: small, or at the edges of `loff_t`.
#[derive(Arbitrary, Debug)]
enum Edge {
    Small(u32),
    Near2Pow63(i16),
    NearMax(u16),
    Any(u64),
}

impl Edge {
    fn value(&self, pages: u64) -> u64 {
        match *self {
            Edge::Small(v) => u64::from(v) % (pages * 8192),
            Edge::Near2Pow63(d) => (1u64 << 63).wrapping_add_signed(i64::from(d) * 4096),
            Edge::NearMax(d) => u64::MAX - u64::from(d),
            Edge::Any(v) => v,
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Input {
    backend: u8,
    /// Map the host view at the first host access, not at the start.
    host_later: bool,
    ops: Vec<Op>,
}

fuzz_target!(|input: Input| {
    let (backend, log2, pages) = match input.backend % 3 {
        0 => (Backend::Memfd, 0, 32u64),
        1 => (Backend::Anonymous, 0, 32),
        _ => (Backend::Hugetlb, 21, 1024),
    };
    let Ok(file) = GuestMemFile::create(
        &backend,
        GmemConfig {
            size: pages * 4096,
            flags: GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
            huge_page_size_log2: log2,
        },
    ) else {
        return; // no huge pages free here
    };
    let guest = file.map_guest(0, file.size()).unwrap();
    let mut host = (!input.host_later).then(|| file.map(0, file.size()).unwrap());
    let mut model = vec![(Attribute::Shared, 0u8); pages as usize];
    for op in input.ops.into_iter().take(40) {
        match op {
            Op::Convert {
                first,
                pages: count,
                private,
            } => {
                let first = u64::from(first) % pages;
                let count = (u64::from(count) % 64).max(1);
                let to = if private {
                    Attribute::Private
                } else {
                    Attribute::Shared
                };
                let result = file.convert(first * 4096, count * 4096, to);
                if first + count <= pages {
                    result.unwrap();
                    for p in &mut model[first as usize..(first + count) as usize] {
                        p.0 = to;
                    }
                } else {
                    assert_eq!(result.unwrap_err().errno(), libc_einval());
                }
            }
            Op::Fallocate { mode, offset, len } => {
                let mode = i32::from(mode & 0x1ff);
                let (offset, len) = (offset.value(pages), len.value(pages));
                let result = file.fallocate(mode, offset, len);
                let expected = gmem::check_fallocate(mode, offset, len, file.size());
                assert_eq!(
                    result.as_ref().err().map(|e| e.errno()),
                    expected.as_ref().err().map(|e| e.errno()),
                    "fallocate({mode:#x}, {offset:#x}, {len:#x})"
                );
                let punch = mode == 0x3; // KEEP_SIZE | PUNCH_HOLE
                if result.is_err() {
                    // Refused: nothing changed (checked against the model below).
                } else if punch {
                    let end = (offset + len).min(pages * 4096);
                    for page in offset / 4096..end / 4096 {
                        model[page as usize].1 = 0;
                    }
                } else {
                    assert_eq!(mode, 0x1, "only KEEP_SIZE allocates");
                }
            }
            Op::Mmap { offset, len, flags } => {
                let (offset, len) = (offset.value(pages), len.value(pages));
                let flags = [0x01, 0x02, 0x03, 0x00, 0x0f, 0x03 | 0x80000, 0x01 | 0x8000]
                    [usize::from(flags) % 7];
                let expected = gmem::check_mmap(offset, len, flags, file.flags(), file.granule());
                let result = file.mmap(offset, len, flags, gmem::ViewKind::Host);
                match (&expected, &result) {
                    (Ok(_), Ok(_)) => {}
                    // The kernel may still refuse a mapping the rules allow
                    // (no address space left for a huge one).
                    (Ok(_), Err(err)) => assert_eq!(err.errno(), 12, "{err}"),
                    (Err(want), got) => assert_eq!(
                        Some(want.errno()),
                        got.as_ref().err().map(|e| e.errno()),
                        "mmap({offset:#x}, {len:#x}, {flags:#x})"
                    ),
                }
            }
            Op::Write { page, byte } => {
                let page = u64::from(page) % pages;
                let host = host.get_or_insert_with(|| file.map(0, file.size()).unwrap());
                let result = host.fill(page * 4096, 4096, byte);
                match model[page as usize].0 {
                    Attribute::Private => assert!(result.is_err()),
                    Attribute::Shared => {
                        result.unwrap();
                        model[page as usize].1 = byte;
                    }
                }
            }
            Op::Read { page } => {
                let page = u64::from(page) % pages;
                let mut buf = [0u8; 16];
                let host = host.get_or_insert_with(|| file.map(0, file.size()).unwrap());
                let result = host.read_at(page * 4096 + 4000, &mut buf);
                match model[page as usize] {
                    (Attribute::Private, _) => assert!(result.is_err()),
                    (Attribute::Shared, byte) => {
                        result.unwrap();
                        assert_eq!(buf, [byte; 16]);
                    }
                }
            }
        }
        for (page, &(attr, byte)) in model.iter().enumerate() {
            assert_eq!(file.attribute(page as u64 * 4096), attr);
            let mut head = [0u8; 4];
            guest.read_at(page as u64 * 4096, &mut head).unwrap();
            assert_eq!(head, [byte; 4], "page {page}");
        }
        if log2 == 21 {
            for (huge, chunk) in model.chunks(512).enumerate() {
                let mixed = chunk.iter().any(|p| p.0 != chunk[0].0);
                let order = file.page_order(huge as u64 * (2 << 20));
                assert_eq!(order, if mixed { 0 } else { 9 }, "huge page {huge}");
            }
        }
    }
});

fn libc_einval() -> i32 {
    22
}
