//! Private anonymous memory, the form of anonymous memory a VM with no
//! private pages gets: transparent huge pages under the host's stock
//! `madvise` mode, and views that are windows of its one mapping.

mod common;

use common::{SHARED_MMAP, host_allows};
use gmem::consts::GUEST_MEMFD_FLAG_MMAP;
use gmem::{
    Attribute, Backend, BackendKind, Capability, GmemConfig, GmemError, GuestMemFile, Unsupported,
};

const MIB: u64 = 1 << 20;

fn private_anonymous(size: u64) -> GuestMemFile {
    GuestMemFile::create(
        &Backend::PrivateAnonymous,
        GmemConfig {
            size,
            flags: SHARED_MMAP,
            huge_page_size_log2: 0,
        },
    )
    .expect("private anonymous memory")
}

#[test]
fn default_memory_on_a_host_in_madvise_mode_receives_huge_pages() {
    if !host_allows("private anonymous THP", &[Capability::AnonymousThp]) {
        return;
    }
    let size = 64 * MIB;
    let file = private_anonymous(size);
    assert_eq!(file.backend(), BackendKind::Anonymous);
    assert!(file.transparent_huge_pages());
    assert_eq!(file.host_page_size(), 2 * MIB);
    file.prefault(0, size, 2, &|_, _| {}).expect("prefault");
    let seen = file.residency().expect("/proc/self/smaps is readable");
    assert_eq!(seen.resident, size, "{seen:?}");
    // The kernel gave huge pages (with defrag at its default, a mapping
    // that asks compacts for them): the soft MMU's 2 MiB leaves have 2 MiB
    // host pages under them.
    assert!(seen.huge >= size / 2, "{seen:?}");
}

#[test]
fn shared_anonymous_memory_gets_no_huge_pages_where_shmem_thp_is_off() {
    let caps = gmem::HostCaps::get();
    if caps.has(Capability::ShmemThp) {
        eprintln!("shared anonymous memory takes huge pages here: shmem_thp is on");
        return;
    }
    let file = GuestMemFile::create(
        &Backend::Anonymous,
        GmemConfig {
            size: 8 * MIB,
            flags: SHARED_MMAP,
            huge_page_size_log2: 0,
        },
    )
    .expect("shared anonymous memory");
    assert!(!file.transparent_huge_pages());
    file.prefault(0, 8 * MIB, 1, &|_, _| {}).expect("prefault");
    let seen = file.residency().expect("smaps");
    assert_eq!((seen.resident, seen.huge), (8 * MIB, 0));
}

#[test]
fn views_are_windows_of_the_same_pages() {
    let file = private_anonymous(8 * MIB);
    let guest = file.map_guest(0, 8 * MIB).expect("guest view");
    let host = file.map(2 * MIB, 4 * MIB).expect("host view");
    guest
        .write_at(3 * MIB + 0x10, b"written by the guest")
        .expect("write");
    let mut back = [0u8; 20];
    host.read_at(MIB + 0x10, &mut back).expect("read");
    assert_eq!(&back, b"written by the guest");
    // The same host frame through both: one mapping.
    assert_eq!(guest.host_frame(3 * MIB), host.host_frame(3 * MIB));
    assert_eq!(guest.as_ptr() as u64 % (2 * MIB), 0);
    // Dropping a window unmaps nothing: the other still reaches the page.
    drop(host);
    guest.read_at(3 * MIB + 0x10, &mut back).expect("read");
    assert_eq!(&back, b"written by the guest");
}

#[test]
fn a_punched_hole_reads_as_zero() {
    let file = private_anonymous(4 * MIB);
    let view = file.map(0, 4 * MIB).expect("view");
    view.fill(0, 4 * MIB, 0x5a).expect("fill");
    file.punch_hole(MIB, MIB).expect("punch");
    let mut page = [0u8; 4096];
    view.read_at(MIB + 8192, &mut page).expect("read");
    assert!(page.iter().all(|&b| b == 0));
    view.read_at(2 * MIB, &mut page).expect("read");
    assert!(page.iter().all(|&b| b == 0x5a));
}

fn refused(result: Result<impl std::fmt::Debug, GmemError>) -> (i32, String) {
    let err = result.expect_err("refused");
    (err.errno(), err.to_string())
}

#[test]
fn private_pages_and_views_past_the_end_are_refused_with_eopnotsupp() {
    let file = private_anonymous(4 * MIB);
    let (errno, text) = refused(file.convert(0, 4096, Attribute::Private));
    assert_eq!(errno, libc::EOPNOTSUPP);
    assert!(text.contains("Backend::Anonymous"), "{text}");
    assert_eq!(file.attribute(0), Attribute::Shared);
    // Shared to shared changes nothing and is allowed.
    file.convert(0, 4096, Attribute::Shared).expect("shared");
    let (errno, text) = refused(file.map(2 * MIB, 4 * MIB));
    assert_eq!(errno, libc::EOPNOTSUPP);
    assert!(text.contains("passes the end"), "{text}");
    let created_private = GuestMemFile::create(
        &Backend::PrivateAnonymous,
        GmemConfig {
            size: 4 * MIB,
            flags: GUEST_MEMFD_FLAG_MMAP,
            huge_page_size_log2: 0,
        },
    );
    let (errno, text) = refused(created_private);
    assert_eq!(errno, libc::EOPNOTSUPP);
    assert!(text.contains("created private"), "{text}");
    assert!(matches!(
        GuestMemFile::create(
            &Backend::PrivateAnonymous,
            GmemConfig {
                size: 4 * MIB,
                flags: GUEST_MEMFD_FLAG_MMAP,
                huge_page_size_log2: 0,
            },
        ),
        Err(GmemError::NotSupported(
            Unsupported::PrivatePageOnPrivateAnonymous { .. }
        ))
    ));
}
