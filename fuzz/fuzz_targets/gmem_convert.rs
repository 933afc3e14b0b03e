//! Convert / punch / fallocate / write / read on memfd and anonymous guest
//! memory (HugeTLB too when pages are free) against a model of attribute
//! and contents per page.
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
        mode: u8,
        offset: u32,
        len: u32,
    },
    Write {
        page: u16,
        byte: u8,
    },
    Read {
        page: u16,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    backend: u8,
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
    let host = file.map(0, file.size()).unwrap();
    let guest = file.map_guest(0, file.size()).unwrap();
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
                let mode = i32::from(mode & 0x3f);
                let (offset, len) = (
                    u64::from(offset) % (pages * 8192),
                    u64::from(len) % (pages * 8192),
                );
                let result = file.fallocate(mode, offset, len);
                let punch = mode == 0x3; // KEEP_SIZE | PUNCH_HOLE
                if let Err(err) = &result {
                    assert!(
                        [22, 95].contains(&err.errno()),
                        "unexpected errno {}",
                        err.errno()
                    );
                } else if punch {
                    let end = (offset + len).min(pages * 4096);
                    for page in offset / 4096..end / 4096 {
                        model[page as usize].1 = 0;
                    }
                } else {
                    assert_eq!(mode, 0x1, "only KEEP_SIZE allocates");
                }
            }
            Op::Write { page, byte } => {
                let page = u64::from(page) % pages;
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
    }
});

fn libc_einval() -> i32 {
    22
}
