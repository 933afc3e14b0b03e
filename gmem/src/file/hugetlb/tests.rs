//! The merge's rollback, driven through the remap seam.

use std::cell::Cell;
use std::io;
use std::os::fd::OwnedFd;

use crate::attrs::Attribute;
use crate::consts::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
use crate::file::error::GmemError;
use crate::file::mapping::map_file_at;
use crate::file::{Backend, GmemConfig, GuestMemFile};

thread_local! {
    /// Remaps of a huge page to let through before one fails.
    static REMAPS_BEFORE_FAILURE: Cell<Option<u32>> = const { Cell::new(None) };
}

/// Whether the remap about to happen is the one to fail.
fn remap_should_fail() -> bool {
    REMAPS_BEFORE_FAILURE.with(|left| match left.get() {
        Some(0) => {
            left.set(None);
            true
        }
        Some(n) => {
            left.set(Some(n - 1));
            false
        }
        None => false,
    })
}

/// The test build's seam for remapping a whole huge page of a view: fails
/// with ENOMEM on cue (`REMAPS_BEFORE_FAILURE`), else maps as the library
/// does.
///
/// # Safety
///
/// As [`map_file_at`].
pub(super) unsafe fn remap_whole_page(
    addr: *mut u8,
    fd: &OwnedFd,
    offset: u64,
    len: u64,
) -> Result<(), GmemError> {
    if remap_should_fail() {
        return Err(GmemError::Os {
            op: "mmap(MAP_FIXED)",
            source: io::Error::from_raw_os_error(libc::ENOMEM),
        });
    }
    // SAFETY: guaranteed by the caller.
    unsafe { map_file_at(addr, fd, offset, len) }
}

/// A HugeTLB file of `size` bytes in 2 MiB pages, or `None` (the skip
/// of the running test reported) where the pool has too few free.
fn hugetlb_file(size: u64) -> Option<GuestMemFile> {
    let test = std::thread::current()
        .name()
        .unwrap_or("hugetlb")
        .to_string();
    if !crate::caps::hugetlb_pages_free(&test, 2 << 20, size >> 21) {
        return None;
    }
    let file = GuestMemFile::create(
        &Backend::Hugetlb,
        GmemConfig {
            size,
            flags: GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
            huge_page_size_log2: 21,
        },
    );
    Some(file.expect("the pool had the pages free"))
}

/// A merge whose second remap fails moves the first view back onto the
/// 4 KiB pieces and keeps the page split: both views still see the same
/// memory, nothing written is lost, and a later merge succeeds. (A host
/// view maps the page, so the split moves it to the 4 KiB backing.)
#[test]
fn a_merge_that_fails_half_way_keeps_every_view_on_the_same_data() {
    let huge = 2u64 << 20;
    let Some(file) = hugetlb_file(huge) else {
        return;
    };
    let a = file.map(0, huge).unwrap();
    let b = file.map_guest(0, huge).unwrap();
    a.fill(0, huge, 0x11).unwrap();
    file.convert(0x3000, 0x1000, Attribute::Private).unwrap();
    assert_eq!(file.split_huge_pages(), vec![0]);
    a.write_at(0x10_0000, &[0x22; 8]).unwrap();
    REMAPS_BEFORE_FAILURE.with(|left| left.set(Some(1)));
    assert!(file.convert(0x3000, 0x1000, Attribute::Shared).is_err());
    assert_eq!(file.split_huge_pages(), vec![0], "still split");
    assert_eq!(
        file.attribute(0x3000),
        Attribute::Private,
        "attributes kept"
    );
    // The two views still share one copy of the memory.
    b.write_at(0x20_0000 - 8, &[0x33; 8]).unwrap();
    let mut back = [0u8; 8];
    a.read_at(0x20_0000 - 8, &mut back).unwrap();
    assert_eq!(back, [0x33; 8]);
    b.read_at(0x10_0000, &mut back).unwrap();
    assert_eq!(back, [0x22; 8]);
    // The merge goes through now, and keeps all of it.
    file.convert(0x3000, 0x1000, Attribute::Shared).unwrap();
    assert!(file.split_huge_pages().is_empty());
    for (view, at, byte) in [
        (&a, 0x10_0000, 0x22),
        (&b, 0x20_0000 - 8, 0x33),
        (&a, 0, 0x11),
    ] {
        view.read_at(at, &mut back).unwrap();
        assert_eq!(back, [byte; 8], "at {at:#x}");
    }
}
