//! Shared/private conversion on every backend, and HugeTLB split and merge:
//! data is kept, private pages fault in host views, and every view follows.

mod common;

use common::{SHARED_MMAP, cases, guest_memfd_case, hugetlb_available, killing_signal, touch};
use gmem::{Attribute, Backend, GmemConfig, GmemError, GuestMemFile, Protection};

/// The page size the kernel uses for the mapping that holds `addr`.
fn kernel_page_size(addr: usize) -> Option<u64> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let mut inside = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ')
            && let Some((start, end)) = range.split_once('-')
            && let (Ok(start), Ok(end)) = (
                usize::from_str_radix(start, 16),
                usize::from_str_radix(end, 16),
            )
        {
            inside = (start..end).contains(&addr);
            continue;
        }
        if inside && let Some(rest) = line.strip_prefix("KernelPageSize:") {
            let kb: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
            return Some(kb << 10);
        }
    }
    None
}

fn pattern(offset: u64) -> u8 {
    (offset / 4096 % 251) as u8 + 1
}

/// Pages filled and checked: every page of small files, a sample of
/// 1 GiB ones (every page would take the test minutes).
fn stride(len: u64) -> usize {
    if len > 64 << 20 { 509 * 4096 } else { 4096 }
}

fn fill_pattern(view: &gmem::View, len: u64) {
    for page in (0..len).step_by(stride(len)) {
        view.fill(page, 4096, pattern(page)).unwrap();
    }
}

/// The filled pages inside `[offset, offset + len)`: one page asked for
/// alone, or the sample grid of the whole file.
fn sampled(offset: u64, len: u64) -> Vec<u64> {
    if len == 4096 {
        return vec![offset];
    }
    let step = stride(offset + len) as u64;
    (offset.next_multiple_of(step)..offset + len)
        .step_by(step as usize)
        .collect()
}

fn assert_pattern(view: &gmem::View, offset: u64, len: u64, what: &str) {
    let mut buf = vec![0u8; 4096];
    for page in sampled(offset, len) {
        view.read_at(page, &mut buf).unwrap();
        assert!(
            buf.iter().all(|&b| b == pattern(page)),
            "{what}: page {page:#x} lost its data"
        );
    }
}

#[test]
fn private_pages_fault_in_host_views_and_keep_their_data() {
    for case in cases(4) {
        let total = 4 * case.page;
        let file = case.create(total, SHARED_MMAP).unwrap();
        let host = file.map(0, total).unwrap();
        let guest = file.map_guest(0, total).unwrap();
        fill_pattern(&host, total);
        let private = case.page + 4096;
        let protection = file.convert(private, 4096, Attribute::Private).unwrap();
        assert_eq!(protection, Protection::HostViewOnly);
        assert_eq!(file.attribute(private), Attribute::Private);
        assert!(matches!(
            host.read_at(private, &mut [0; 8]),
            Err(GmemError::Fault { .. })
        ));
        // SAFETY: a pointer inside the host view.
        let ptr = unsafe { host.as_ptr().add(private as usize) };
        let signal = killing_signal(|| {
            // SAFETY: inside the mapping; expected to fault.
            unsafe { touch(ptr) };
        });
        assert_eq!(signal, Some(libc::SIGBUS), "{}: host access", case.name);
        // The guest view still reaches it, and the rest of the host view too.
        assert_pattern(&guest, private, 4096, case.name);
        assert_pattern(&host, 0, private, case.name);
        assert_pattern(&host, private + 4096, total - private - 4096, case.name);
        guest.fill(private, 8, 0x5a).unwrap();
        file.convert(private, 4096, Attribute::Shared).unwrap();
        let mut back = [0u8; 16];
        host.read_at(private, &mut back).unwrap();
        assert_eq!(back[..8], [0x5a; 8], "{}", case.name);
        assert_eq!(back[8..], [pattern(private); 8], "{}", case.name);
        let metrics = file.metrics();
        assert_eq!((metrics.to_private, metrics.to_shared), (1, 1));
    }
}

#[test]
fn bad_conversions_are_einval() {
    let file = GuestMemFile::create(
        &Backend::Memfd,
        GmemConfig {
            size: 1 << 20,
            flags: SHARED_MMAP,
            huge_page_size_log2: 0,
        },
    )
    .unwrap();
    for (offset, len) in [(1, 4096), (0, 4095), (0, 0), (1 << 20, 4096), (0, 2 << 20)] {
        let err = file.convert(offset, len, Attribute::Private).unwrap_err();
        assert_eq!(err.errno(), libc::EINVAL, "{offset:#x}+{len:#x}");
    }
    assert_eq!(file.attribute(0), Attribute::Shared);
}

fn hugetlb_split_and_merge(log2: u8) {
    let huge = 1u64 << log2;
    if !hugetlb_available(huge, 2) {
        return;
    }
    let total = 2 * huge;
    let file = GuestMemFile::create(
        &Backend::Hugetlb,
        GmemConfig {
            size: total,
            flags: SHARED_MMAP,
            huge_page_size_log2: log2,
        },
    )
    .unwrap();
    let host = file.map(0, total).unwrap();
    let guest = file.map_guest(0, total).unwrap();
    fill_pattern(&host, total);
    let private = huge + 7 * 4096;
    for page in [private - 4096, private, private + 4096] {
        host.fill(page, 4096, pattern(page)).unwrap();
    }
    let base = host.as_ptr() as usize;
    assert_eq!(kernel_page_size(base), Some(huge));
    assert_eq!(file.host_page_size(), huge);
    let order = log2 - 12;
    assert_eq!(file.page_order(private), order);
    let frame = guest.host_frame(private).unwrap();
    assert_eq!(frame, (guest.as_ptr() as u64 + private) >> 12);
    assert_eq!(guest.host_frame(total), None);

    // A 1 GiB page splits in two tiers where the 2 MiB pool can hold its
    // pieces: into 2 MiB pieces, and only the piece with the private page
    // into 4 KiB.
    // (Other tests take 2 MiB pages too: with a comfortable margin the
    // split must tier; with less, it may have had to go to 4 KiB whole.)
    let surely_tiered = log2 == 30
        && gmem::HostCaps::probe()
            .pool(2 << 20)
            .is_some_and(|pool| pool.available >= 640);

    // One 4 KiB page inside the second huge page goes private: that huge
    // page splits, the first does not.
    file.convert(private, 4096, Attribute::Private).unwrap();
    let metrics = file.metrics();
    let tiered = log2 == 30 && metrics.splits == 2;
    assert!(
        tiered || !surely_tiered,
        "a 1 GiB page with 2 MiB pages free splits in two tiers"
    );
    let tiers = if tiered { 2 } else { 1 };
    assert_eq!((metrics.splits, metrics.split_now), (tiers, tiers));
    assert_eq!(file.split_huge_pages(), vec![1]);
    assert_eq!(file.page_order(private), 0, "a split page is 4 KiB");
    assert_eq!(file.page_order(0), order, "the other stays whole");
    assert_eq!(
        guest.host_frame(private),
        Some(frame),
        "a view keeps its frames across a split"
    );
    assert_eq!(kernel_page_size(base + huge as usize), Some(4096));
    assert_eq!(
        kernel_page_size(guest.as_ptr() as usize + huge as usize),
        Some(4096)
    );
    if tiered {
        // The other 511 pieces stay 2 MiB pages, for the MMU too.
        let next_piece = huge + (2 << 20);
        assert_eq!(kernel_page_size(base + next_piece as usize), Some(2 << 20));
        assert_eq!(
            kernel_page_size(guest.as_ptr() as usize + next_piece as usize),
            Some(2 << 20)
        );
        assert_eq!(file.page_order(next_piece), 9);
        assert_pattern(&host, next_piece, 2 << 20, "a 2 MiB piece");
    } else if log2 == 30 {
        eprintln!("the 1 GiB page split to 4 KiB whole: fewer than 512 free 2 MiB pages");
    }
    assert_eq!(
        kernel_page_size(base),
        Some(huge),
        "the other huge page stays"
    );
    assert_pattern(&host, huge, private - huge, "before the private page");
    assert_pattern(&host, private + 4096, total - private - 4096, "after it");
    assert_pattern(&guest, private, 4096, "through the guest view");
    let ptr = (base + private as usize) as *mut u8;
    let signal = killing_signal(|| {
        // SAFETY: inside the host view; expected to fault.
        unsafe { touch(ptr) };
    });
    assert_eq!(signal, Some(libc::SIGBUS));
    // A view made while the page is split sees the split backing.
    let late = file.map(0, total).unwrap();
    assert_pattern(&late, private + 4096, 4096, "late view");
    assert_pattern(&late, private - 4096, 4096, "late view");
    guest.fill(private, 4096, 0x77).unwrap();

    // Back to shared: the huge page is uniform again and merges.
    file.convert(private, 4096, Attribute::Shared).unwrap();
    let metrics = file.metrics();
    assert_eq!((metrics.merges, metrics.split_now), (tiers, 0));
    assert!(file.split_huge_pages().is_empty());
    assert_eq!(file.page_order(private), order, "merged back");
    assert_eq!(kernel_page_size(base + huge as usize), Some(huge));
    assert_eq!(
        kernel_page_size(late.as_ptr() as usize + huge as usize),
        Some(huge)
    );
    let mut page = vec![0u8; 4096];
    host.read_at(private, &mut page).unwrap();
    assert!(
        page.iter().all(|&b| b == 0x77),
        "the guest's write survived"
    );
    assert_pattern(&host, 0, private, "after the merge");
    assert_pattern(
        &late,
        private + 4096,
        total - private - 4096,
        "after the merge",
    );

    // A whole huge page private is uniform: no split, and it faults.
    file.convert(0, huge, Attribute::Private).unwrap();
    assert_eq!(file.metrics().splits, tiers, "no new split");
    assert!(host.read_at(4096, &mut page).is_err());
    file.convert(0, huge, Attribute::Shared).unwrap();
    assert_pattern(&host, 0, huge, "whole huge page round trip");
}

#[test]
fn hugetlb_2m_split_and_merge_keep_data() {
    hugetlb_split_and_merge(21);
}

#[test]
fn hugetlb_1g_split_and_merge_keep_data() {
    hugetlb_split_and_merge(30);
}

/// A 2 MiB page that no host view maps splits in place: only its order
/// changes (the kernel's guest_memfd splits a huge folio without moving
/// it), its memory stays on the HugeTLB page and nothing is copied. A host
/// view that comes to map it moves it to 4 KiB pages first, so that the
/// view faults on its private page alone; the data goes along.
#[test]
fn a_2m_page_no_host_view_maps_splits_in_place_and_moves_when_one_comes() {
    let huge = 2u64 << 20;
    let total = 2 * huge;
    if !hugetlb_available(huge, 2) {
        return;
    }
    let file = GuestMemFile::create(
        &Backend::Hugetlb,
        GmemConfig {
            size: total,
            flags: SHARED_MMAP,
            huge_page_size_log2: 21,
        },
    )
    .unwrap();
    let guest = file.map_guest(0, total).unwrap();
    fill_pattern(&guest, total);
    let frame = guest.host_frame(0x3000).unwrap();
    file.convert(0x3000, 4096, Attribute::Private).unwrap();
    let metrics = file.metrics();
    assert_eq!((metrics.splits, metrics.split_now), (1, 1));
    assert_eq!(
        metrics.copy_time,
        std::time::Duration::ZERO,
        "nothing copied"
    );
    assert_eq!(file.split_huge_pages(), vec![0]);
    assert_eq!((file.page_order(0x3000), file.page_order(huge)), (0, 9));
    assert_eq!(guest.host_frame(0x3000), Some(frame));
    let base = guest.as_ptr() as usize;
    assert_eq!(kernel_page_size(base), Some(huge), "still the HugeTLB page");
    assert_pattern(&guest, 0, total, "split in place");
    // Merged back with no host view: the order again, nothing copied.
    file.convert(0x3000, 4096, Attribute::Shared).unwrap();
    assert!(file.split_huge_pages().is_empty());
    assert_eq!(file.page_order(0x3000), 9);
    assert_eq!(file.metrics().merges, 1);
    assert_eq!(file.metrics().copy_time, std::time::Duration::ZERO);

    // Split in place again; then a host view comes.
    file.convert(0x3000, 4096, Attribute::Private).unwrap();
    let host = file.map(0, total).unwrap();
    let metrics = file.metrics();
    assert_eq!((metrics.splits, metrics.split_now), (2, 1), "no new split");
    assert!(
        metrics.copy_time > std::time::Duration::ZERO,
        "moved to 4 KiB"
    );
    assert_eq!(kernel_page_size(base), Some(4096), "the guest view follows");
    assert!(host.read_at(0x3000, &mut [0; 8]).is_err(), "private");
    assert_pattern(&host, 0x4000, huge - 0x4000, "host view, after the move");
    assert_pattern(&guest, 0, total, "guest view, after the move");
    file.convert(0x3000, 4096, Attribute::Shared).unwrap();
    assert!(file.split_huge_pages().is_empty());
    assert_eq!(kernel_page_size(base), Some(huge));
    assert_pattern(&host, 0, total, "merged");
}

/// A file the 2 MiB pool cannot hold fails at creation with ENOMEM, naming
/// the pool, the pages needed and the pages free. It asks for one page
/// more than the whole pool, since tests running beside this one take and
/// give back pages between a count of the free ones and the creation.
#[test]
fn a_hugetlb_shortfall_fails_at_creation_with_the_numbers() {
    let total = gmem::HostCaps::probe()
        .pool(2 << 20)
        .map_or(0, |pool| pool.total);
    let needed = total + 1;
    let err = GuestMemFile::create(
        &Backend::Hugetlb,
        GmemConfig {
            size: needed * (2 << 20),
            flags: SHARED_MMAP,
            huge_page_size_log2: 21,
        },
    )
    .unwrap_err();
    assert_eq!(err.errno(), libc::ENOMEM);
    let message = err.to_string();
    assert!(message.contains("hugepages-2048kB"), "{message}");
    assert!(
        message.contains(&format!("needs {needed} pages")),
        "{message}"
    );
    let free: u64 = message
        .split(" are free")
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .and_then(|count| count.parse().ok())
        .unwrap_or_else(|| panic!("no free count in {message}"));
    assert!(free <= total, "{message}");
}

/// On this host's guest_memfd (no memory attributes, no in-place
/// conversion), a file created private stays private: converting it to
/// shared is EOPNOTSUPP with the reason, and the safe accessors of every
/// view answer EFAULT instead of letting the kernel's SIGBUS kill us.
#[test]
fn a_private_guest_memfd_cannot_be_made_shared_where_the_kernel_cannot_convert() {
    let Some(case) = guest_memfd_case() else {
        return;
    };
    let file = case
        .create(4 * 4096, gmem::consts::GUEST_MEMFD_FLAG_MMAP)
        .unwrap();
    let err = file.convert(0, 4096, Attribute::Shared).unwrap_err();
    assert_eq!(err.errno(), libc::EOPNOTSUPP, "{err}");
    assert!(err.to_string().contains("in place"), "{err}");
    assert_eq!(file.attribute(0), Attribute::Private, "unchanged");
    for view in [
        file.map(0, 4 * 4096).unwrap(),
        file.map_guest(0, 4 * 4096).unwrap(),
    ] {
        assert!(matches!(
            view.read_at(0, &mut [0; 8]),
            Err(GmemError::Fault { .. })
        ));
        assert!(matches!(
            view.write_at(4096, &[1; 8]),
            Err(GmemError::Fault { .. })
        ));
    }
    // Converting to private (what it is) is fine.
    file.convert(0, 4096, Attribute::Private).unwrap();
}
