//! Prefault, and guest regions seen through vm-memory.

mod common;

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use common::{SHARED_MMAP, cases, hugetlb_available};
use gmem::DirtyTracking;
use gmem::consts::GUEST_MEMFD_FLAG_INIT_SHARED;
use gmem::{
    Attribute, Backend, GmemConfig, GuestMemFile, GuestMemoryLayout, GuestRegion, PAGE_SIZE,
};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// Pages of `[ptr, ptr + len)` resident in memory, by mincore.
fn resident_pages(ptr: *mut u8, len: usize) -> usize {
    let mut vec = vec![0u8; len.div_ceil(PAGE_SIZE as usize)];
    // SAFETY: the range is a live mapping; `vec` has one byte per page.
    let ret = unsafe { libc::mincore(ptr.cast(), len, vec.as_mut_ptr()) };
    assert_eq!(ret, 0, "mincore");
    vec.iter().filter(|&&b| b & 1 != 0).count()
}

#[test]
fn prefault_populates_every_page_and_reports_progress() {
    for case in cases(8) {
        let size = (8 * case.page).max(16 << 20);
        let file = case.create(size, SHARED_MMAP).unwrap();
        let view = file.map(0, size).unwrap();
        let last = AtomicU64::new(0);
        let calls = AtomicU64::new(0);
        let report = file
            .prefault(0, size, 2, &|done, total| {
                assert_eq!(total, size);
                last.fetch_max(done, Ordering::Relaxed);
                calls.fetch_add(1, Ordering::Relaxed);
            })
            .unwrap();
        assert_eq!(report.bytes, size);
        assert_eq!(last.load(Ordering::Relaxed), size, "{}", case.name);
        assert!(calls.load(Ordering::Relaxed) >= size / gmem::prefault::CHUNK);
        assert!(report.gib_per_s() > 0.0);
        if case.page == 4096 && !case.is(gmem::BackendKind::Secret) {
            assert_eq!(
                resident_pages(view.as_ptr(), size as usize) as u64,
                size / PAGE_SIZE,
                "{}: every page resident",
                case.name
            );
        }
    }
}

#[test]
fn prefault_refuses_bad_arguments() {
    let file = GuestMemFile::create(
        &Backend::Memfd,
        GmemConfig {
            size: 1 << 20,
            flags: GUEST_MEMFD_FLAG_INIT_SHARED,
            huge_page_size_log2: 0,
        },
    )
    .unwrap();
    let nothing = |_, _| {};
    assert_eq!(
        file.prefault(0, 1 << 20, 0, &nothing).unwrap_err().errno(),
        libc::EINVAL
    );
    assert_eq!(
        file.prefault(1, 4096, 1, &nothing).unwrap_err().errno(),
        libc::EINVAL
    );
    assert_eq!(
        file.prefault(0, 2 << 20, 1, &nothing).unwrap_err().errno(),
        libc::EINVAL
    );
    // Without MMAP there is no way to populate a memfd from here.
    assert_eq!(
        file.prefault(0, 4096, 1, &nothing).unwrap_err().errno(),
        libc::ENODEV
    );
}

#[test]
fn vm_memory_reads_and_writes_through_regions_with_dirty_tracking() {
    for case in cases(8) {
        let size = 4 * case.page;
        let file = case.create(size, SHARED_MMAP).unwrap();
        let low = GuestRegion::new(&file, 0, 2 * case.page, 0, DirtyTracking::Bitmap).unwrap();
        let high = GuestRegion::new(
            &file,
            2 * case.page,
            2 * case.page,
            1 << 32,
            DirtyTracking::Off,
        )
        .unwrap();
        let layout = GuestMemoryLayout::new(vec![high, low]).unwrap();
        let memory = layout.memory();
        assert_eq!(memory.num_regions(), 2);
        memory
            .write_obj(0xdead_beef_u32, GuestAddress(0x1008))
            .unwrap();
        memory
            .write_obj(0x1234_u16, GuestAddress((1 << 32) + 0x10))
            .unwrap();
        // Through the file's own host view.
        let host = file.map(0, size).unwrap();
        let mut word = [0u8; 4];
        host.read_at(0x1008, &mut word).unwrap();
        assert_eq!(u32::from_le_bytes(word), 0xdead_beef, "{}", case.name);
        let mut half = [0u8; 2];
        host.read_at(2 * case.page + 0x10, &mut half).unwrap();
        assert_eq!(u16::from_le_bytes(half), 0x1234, "{}", case.name);
        // The low region tracks dirty pages.
        let region = memory.find_region(GuestAddress(0x1008)).unwrap();
        let bitmap = region.bitmap();
        assert!(bitmap.is_some(), "dirty tracking on");
        assert!(bitmap.dirty_at(0x1008));
        assert!(!bitmap.dirty_at(0));
        let high_region = memory.find_region(GuestAddress(1 << 32)).unwrap();
        assert!(high_region.bitmap().is_none());
    }
}

#[test]
fn a_region_on_hugetlb_follows_a_split() {
    if !hugetlb_available(2 << 20, 2) {
        return;
    }
    let file = GuestMemFile::create(
        &Backend::Hugetlb,
        GmemConfig {
            size: 2 << 20,
            flags: SHARED_MMAP,
            huge_page_size_log2: 21,
        },
    )
    .unwrap();
    let layout = GuestMemoryLayout::new(vec![
        GuestRegion::new(&file, 0, 2 << 20, 0, DirtyTracking::Off).unwrap(),
    ])
    .unwrap();
    let memory = layout.memory();
    memory.write_obj(7u64, GuestAddress(0x10_0000)).unwrap();
    file.convert(0x5000, 0x1000, Attribute::Private).unwrap();
    assert_eq!(file.split_huge_pages(), vec![0]);
    // The guest still reaches the private page and everything else.
    memory.write_obj(9u64, GuestAddress(0x5000)).unwrap();
    assert_eq!(memory.read_obj::<u64>(GuestAddress(0x10_0000)).unwrap(), 7);
    let host = file.map(0, 2 << 20).unwrap();
    let mut buf = [0u8; 8];
    host.read_at(0x10_0000, &mut buf).unwrap();
    assert_eq!(u64::from_le_bytes(buf), 7);
    assert!(host.read_at(0x5000, &mut buf).is_err());
    file.convert(0x5000, 0x1000, Attribute::Shared).unwrap();
    host.read_at(0x5000, &mut buf).unwrap();
    assert_eq!(
        u64::from_le_bytes(buf),
        9,
        "the guest's write survived the merge"
    );
}

#[test]
fn a_clone_of_the_memory_keeps_its_mapping_after_the_layout_goes() {
    let file = GuestMemFile::create(
        &Backend::Memfd,
        GmemConfig {
            size: 1 << 20,
            flags: SHARED_MMAP,
            huge_page_size_log2: 0,
        },
    )
    .unwrap();
    let layout = GuestMemoryLayout::new(vec![
        GuestRegion::new(&file, 0, 1 << 20, 0, DirtyTracking::Off).unwrap(),
    ])
    .unwrap();
    let clone = layout.memory().clone();
    drop(layout);
    let shared = Mutex::new(clone);
    let memory = shared.lock().unwrap();
    memory.write_obj(5u32, GuestAddress(0x100)).unwrap();
    assert_eq!(memory.read_obj::<u32>(GuestAddress(0x100)).unwrap(), 5);
}

#[test]
fn anonymous_and_memfd_memory_ask_for_transparent_huge_pages_where_the_host_allows() {
    use gmem::consts::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
    use gmem::{Backend, GmemConfig, GuestMemFile, ThpModes};
    let allowed = ThpModes::read().is_some_and(|modes| modes.shmem_allows());
    for backend in [Backend::Anonymous, Backend::Memfd] {
        let file = GuestMemFile::create(
            &backend,
            GmemConfig {
                size: 4 << 20,
                flags: GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
                huge_page_size_log2: 0,
            },
        )
        .unwrap();
        assert_eq!(
            file.transparent_huge_pages(),
            allowed,
            "{:?}: shmem THP allowed = {allowed}",
            backend.kind()
        );
        let host_page = if allowed { 2 << 20 } else { 4096 };
        assert_eq!(file.host_page_size(), host_page);
        // Asked or not, the memory works the same.
        let view = file.map(0, 4 << 20).unwrap();
        view.write_at(3 << 20, &[7; 8]).unwrap();
        let mut back = [0; 8];
        view.read_at(3 << 20, &mut back).unwrap();
        assert_eq!(back, [7; 8]);
    }
}
