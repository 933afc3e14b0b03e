//! Side-by-side costs of populating guest memory, from one run: for 1 GiB
//! (and 4 GiB where memory allows) on each backend, prefault with 1 and 2
//! threads, first touch without prefault (one write per page), and a memset
//! over already-populated memory (the bandwidth bound), with ratios (best of
//! three fresh files each, after a warm-up); then
//! HugeTLB split and merge latency per 2 MiB page against a 2 MiB copy, and
//! a 4 KiB conversion inside a 1 GiB page against a 1 GiB copy.
//! Run with `cargo bench -p gmem --bench table`; `MMUKIT_BENCH_GIB` picks
//! the sizes (default "1,4"); a word after `--` runs only the sections
//! that hold it (`populate`, `qemu`, `split`).

use std::hint::black_box;
use std::time::{Duration, Instant};

use gmem::consts::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
use gmem::{Attribute, Backend, GmemConfig, GuestMemFile, HostCaps, KvmVm};

const FLAGS: u64 = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;

struct Row {
    name: &'static str,
    backend: Backend,
    log2: u8,
}

fn create(row: &Row, size: u64) -> Option<GuestMemFile> {
    match GuestMemFile::create(
        &row.backend,
        GmemConfig {
            size,
            flags: FLAGS,
            huge_page_size_log2: row.log2,
        },
    ) {
        Ok(file) => Some(file),
        Err(err) => {
            println!("{:<12} {:>4} GiB  skipped: {err}", row.name, size >> 30);
            None
        }
    }
}

fn prefault(file: &GuestMemFile, threads: usize) -> Duration {
    file.prefault(0, file.size(), threads, &|_, _| {})
        .expect("prefault")
        .elapsed
}

/// One write per page of a fresh mapping: the page-fault path.
fn first_touch(file: &GuestMemFile) -> Duration {
    let view = file.map(0, file.size()).expect("map");
    let start = Instant::now();
    for offset in (0..file.size()).step_by(4096) {
        // SAFETY: inside the view; every page is shared.
        unsafe { std::ptr::write_volatile(view.as_ptr().add(offset as usize), 1) };
    }
    start.elapsed()
}

/// A memset over memory that is already populated: the bound.
fn memset(file: &GuestMemFile) -> Duration {
    let view = file.map(0, file.size()).expect("map");
    let len = file.size() as usize;
    // Populate through this mapping first, then time a second pass.
    // SAFETY: the view is `len` writable bytes, all shared.
    unsafe { std::ptr::write_bytes(view.as_ptr(), 0x11, len) };
    let start = Instant::now();
    // SAFETY: as above.
    unsafe { std::ptr::write_bytes(black_box(view.as_ptr()), 0x22, len) };
    start.elapsed()
}

/// What QEMU's `memory-backend-ram,prealloc=on` does: private anonymous
/// memory, MADV_HUGEPAGE, then MADV_POPULATE_WRITE from `threads` threads,
/// each over its own part. The baseline for the prefault rows.
fn qemu_prealloc(size: u64, threads: usize) -> Duration {
    let align = 2usize << 20;
    let len = size as usize + align;
    // SAFETY: a fresh private anonymous mapping, unmapped below.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert_ne!(raw, libc::MAP_FAILED, "mmap");
    let base = (raw as usize).next_multiple_of(align);
    // SAFETY: inside the mapping; advice only.
    unsafe {
        libc::madvise(
            base as *mut libc::c_void,
            size as usize,
            libc::MADV_HUGEPAGE,
        )
    };
    let start = Instant::now();
    let part = (size as usize / threads).next_multiple_of(align);
    std::thread::scope(|scope| {
        for t in 0..threads {
            scope.spawn(move || {
                let from = t * part;
                let to = ((t + 1) * part).min(size as usize);
                if from < to {
                    // SAFETY: this thread's part of the mapping.
                    let ret = unsafe {
                        libc::madvise(
                            (base + from) as *mut libc::c_void,
                            to - from,
                            libc::MADV_POPULATE_WRITE,
                        )
                    };
                    assert_eq!(ret, 0, "MADV_POPULATE_WRITE");
                }
            });
        }
    });
    let elapsed = start.elapsed();
    // SAFETY: the whole mapping made above.
    unsafe { libc::munmap(raw, len) };
    elapsed
}

/// QEMU's own prealloc of `size` bytes of `backend` (`memory-backend-ram`,
/// `memory-backend-memfd`) with
/// `threads` threads: the life of a QEMU process that preallocates and
/// quits over QMP, less that of the same process without prealloc. `None`
/// where QEMU is not installed (or fails).
fn qemu_process_prealloc(backend: &str, size: u64, threads: usize) -> Option<Duration> {
    let life = |prealloc: &str| -> Option<Duration> {
        let start = Instant::now();
        let mut child = std::process::Command::new("qemu-system-x86_64")
            .args([
                "-M",
                "none",
                "-nodefaults",
                "-display",
                "none",
                "-qmp",
                "stdio",
            ])
            .arg("-object")
            .arg(format!(
                "{backend},id=mem,size={size},prealloc={prealloc},prealloc-threads={threads}"
            ))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()?;
        use std::io::Write;
        child
            .stdin
            .take()?
            .write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"quit\"}\n")
            .ok()?;
        child.wait().ok()?.success().then(|| start.elapsed())
    };
    let without = life("off")?;
    let with = life("on")?;
    Some(with.saturating_sub(without))
}

/// The default memory (private anonymous, 2 threads) against QEMU's
/// prealloc, in paired runs: each pair runs QEMU's own process (where
/// installed), the same steps QEMU takes in this process, and gmem, one
/// after another, so that the host's state is alike for all three. Prints
/// the minimum and the median of each and their ratios.
fn default_memory_against_qemu(size: u64, pairs: usize) {
    let mut qemu_process = Vec::new();
    let mut qemu_steps = Vec::new();
    let mut gmem_default = Vec::new();
    let mut qemu_memfd = Vec::new();
    let mut gmem_memfd = Vec::new();
    let default = Row {
        name: "anonymous",
        backend: Backend::PrivateAnonymous,
        log2: 0,
    };
    let memfd = Row {
        name: "memfd",
        backend: Backend::Memfd,
        log2: 0,
    };
    for _ in 0..pairs {
        if let Some(time) = qemu_process_prealloc("memory-backend-ram", size, 2) {
            qemu_process.push(time);
        }
        qemu_steps.push(qemu_prealloc(size, 2));
        let (Some(file), Some(memfd_file)) = (create(&default, size), create(&memfd, size)) else {
            return;
        };
        gmem_default.push(prefault(&file, 2));
        drop(file);
        if let Some(time) = qemu_process_prealloc("memory-backend-memfd", size, 2) {
            qemu_memfd.push(time);
        }
        gmem_memfd.push(prefault(&memfd_file, 2));
    }
    let min_median = |times: &mut Vec<Duration>| {
        times.sort();
        (times[0], times[times.len() / 2])
    };
    let (gmem_min, gmem_median) = min_median(&mut gmem_default);
    println!(
        "default memory against QEMU, {} GiB, 2 threads, {pairs} paired runs (min / median):",
        size >> 30
    );
    println!("  gmem anonymous (private, MADV_HUGEPAGE)   {gmem_min:>8.1?} / {gmem_median:>8.1?}");
    let compare = |name: &str, times: &mut Vec<Duration>| {
        if times.is_empty() {
            println!(
                "  {name:<40}  skipped (qemu-system-x86_64 is not installed: scripts/install-qemu)"
            );
            return;
        }
        let (min, median) = min_median(times);
        println!(
            "  {name:<40} {min:>8.1?} / {median:>8.1?}   gmem/QEMU {:.2}x / {:.2}x",
            gmem_min.as_secs_f64() / min.as_secs_f64(),
            gmem_median.as_secs_f64() / median.as_secs_f64()
        );
    };
    compare("QEMU's process (prealloc on - off)", &mut qemu_process);
    compare(
        "QEMU's steps (mmap, MADV_HUGEPAGE, populate)",
        &mut qemu_steps,
    );
    // memfd memory is shmem on both sides: its huge pages follow the
    // host's shmem mode, which this bench leaves as it is.
    let (memfd_min, memfd_median) = min_median(&mut gmem_memfd);
    if qemu_memfd.is_empty() {
        println!("  gmem memfd {memfd_min:>8.1?} / {memfd_median:>8.1?}; QEMU skipped");
        return;
    }
    let (min, median) = min_median(&mut qemu_memfd);
    println!(
        "  gmem memfd {memfd_min:>8.1?} / {memfd_median:>8.1?}, QEMU memory-backend-memfd {min:>8.1?} / {median:>8.1?}   gmem/QEMU {:.2}x / {:.2}x",
        memfd_min.as_secs_f64() / min.as_secs_f64(),
        memfd_median.as_secs_f64() / median.as_secs_f64()
    );
}

fn gib_s(size: u64, time: Duration) -> f64 {
    size as f64 / (1u64 << 30) as f64 / time.as_secs_f64()
}

fn row(row: &Row, size: u64) {
    // Warm-up pass, not measured: the first use of physical memory is far
    // slower here than any later one, and would favour whichever run is
    // second.
    let Some(file) = create(row, size) else {
        return;
    };
    prefault(&file, 2);
    drop(file);
    // Best of three, alternating 1 and 2 threads, on fresh files.
    let (mut one, mut two) = (Duration::MAX, Duration::MAX);
    for _ in 0..3 {
        for (threads, best) in [(1, &mut one), (2, &mut two)] {
            let Some(file) = create(row, size) else {
                return;
            };
            *best = (*best).min(prefault(&file, threads));
        }
    }
    let Some(file) = create(row, size) else {
        return;
    };
    let touch = first_touch(&file);
    let bound = memset(&file);
    let thp = if file.transparent_huge_pages() {
        "thp"
    } else {
        "4K "
    };
    drop(file);
    println!(
        "{:<12} {thp} {:>4} GiB  prefault 1T {:>8.1?} {:>5.2} GiB/s  2T {:>8.1?} {:>5.2} GiB/s  first touch {:>8.1?}  memset {:>7.1?} {:>5.2} GiB/s  ratios 1T {:>5.2} 2T {:>5.2} touch {:>5.2}",
        row.name,
        size >> 30,
        one,
        gib_s(size, one),
        two,
        gib_s(size, two),
        touch,
        bound,
        gib_s(size, bound),
        one.as_secs_f64() / bound.as_secs_f64(),
        two.as_secs_f64() / bound.as_secs_f64(),
        touch.as_secs_f64() / bound.as_secs_f64(),
    );
}

/// Splits and merges `pages` 2 MiB pages, one at a time.
/// A 4 KiB conversion inside a 1 GiB HugeTLB page and back: the page
/// splits into 2 MiB pieces and only one piece into 4 KiB (where the 2 MiB
/// pool holds the pieces), against a 1 GiB and a 2 MiB copy.
fn split_merge_1g() {
    let gib = 1u64 << 30;
    let Ok(file) = GuestMemFile::create(
        &Backend::Hugetlb,
        GmemConfig {
            size: gib,
            flags: FLAGS,
            huge_page_size_log2: 30,
        },
    ) else {
        println!("hugetlb 1G partial conversion: skipped (no free 1 GiB page)");
        return;
    };
    let view = file.map(0, gib).expect("map");
    view.fill(0, gib, 0x44).expect("fill");
    // Best of three round trips: the first also pays the host's first
    // touch of the 2 MiB pages the pieces take.
    let (mut split, mut merge, mut split_copy) = (Duration::MAX, Duration::MAX, Duration::MAX);
    let (mut tiers, mut order_elsewhere) = (0, 0);
    for _ in 0..3 {
        let before = file.metrics();
        let start = Instant::now();
        file.convert(0x5000, 4096, Attribute::Private)
            .expect("split");
        let elapsed = start.elapsed();
        let after = file.metrics();
        tiers = after.splits - before.splits;
        if elapsed < split {
            split = elapsed;
            split_copy = after.copy_time - before.copy_time;
        }
        order_elsewhere = file.page_order(gib / 2);
        let start = Instant::now();
        file.convert(0x5000, 4096, Attribute::Shared)
            .expect("merge");
        merge = merge.min(start.elapsed());
    }

    let src = vec![1u8; gib as usize];
    let mut dst = vec![0u8; gib as usize];
    dst.copy_from_slice(&src);
    let start = Instant::now();
    black_box(&mut dst).copy_from_slice(black_box(&src));
    let copy = start.elapsed();
    let (pieces, pages) = if tiers == 2 {
        ("1 GiB of 2 MiB pieces", "2 MiB")
    } else {
        ("no 2 MiB pieces (pool too small)", "1 GiB")
    };
    let fill = if HostCaps::get().userfaultfd {
        "filled in one pass (UFFDIO_COPY)"
    } else {
        "populated (cleared), then copied: no userfaultfd"
    };
    println!(
        "hugetlb 1G 4 KiB conversion: split {split:>8.1?} (copying {split_copy:>7.1?})  merge {merge:>8.1?}  (1 GiB copy {copy:>7.1?}: ratios {:.2} (goal <= 1.5) / {:.2}); held while split: {pieces}, {pages} of 4 KiB pages, the new pieces {fill}; the other pieces map at order {order_elsewhere}",
        split.as_secs_f64() / copy.as_secs_f64(),
        merge.as_secs_f64() / copy.as_secs_f64(),
    );
}

fn split_merge(pages: u64) {
    let huge = 2u64 << 20;
    let Ok(file) = GuestMemFile::create(
        &Backend::Hugetlb,
        GmemConfig {
            size: pages * huge,
            flags: FLAGS,
            huge_page_size_log2: 21,
        },
    ) else {
        println!("hugetlb split/merge: skipped (no 2 MiB pages)");
        return;
    };
    let view = file.map(0, file.size()).expect("map");
    view.fill(0, file.size(), 0x33).expect("fill");
    for page in 0..pages {
        file.convert(page * huge + 4096, 4096, Attribute::Private)
            .expect("split");
    }
    for page in 0..pages {
        file.convert(page * huge + 4096, 4096, Attribute::Shared)
            .expect("merge");
    }
    let metrics = file.metrics();
    assert_eq!((metrics.splits, metrics.merges), (pages, pages));
    let split = metrics.split_time / pages as u32;
    let merge = metrics.merge_time / pages as u32;
    let src = vec![1u8; huge as usize];
    let mut dst = vec![0u8; huge as usize];
    dst.copy_from_slice(&src);
    let start = Instant::now();
    for _ in 0..pages {
        black_box(&mut dst).copy_from_slice(black_box(&src));
    }
    let copy = start.elapsed() / pages as u32;
    println!(
        "hugetlb 2M split {split:>8.1?}  merge {merge:>8.1?}  (2 MiB copy {copy:>7.1?}: ratios {:.1} / {:.1}; {pages} pages)",
        split.as_secs_f64() / copy.as_secs_f64(),
        merge.as_secs_f64() / copy.as_secs_f64(),
    );
}

fn available_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("MemAvailable:"))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
        })
        .map_or(0, |kb| kb << 10)
}

fn main() {
    if std::env::args().any(|arg| arg == "--list") {
        return;
    }
    // `cargo bench -p gmem --bench table -- split` runs the sections whose
    // name holds the word: populate, qemu (the paired runs), split.
    let only: Option<String> = std::env::args().skip(1).find(|arg| !arg.starts_with('-'));
    let runs = |section: &str| only.as_deref().is_none_or(|word| section.contains(word));
    if !runs("populate") {
        if runs("qemu") && available_bytes() >= 2 << 30 {
            default_memory_against_qemu(1 << 30, 9);
        }
        if runs("split") {
            split_merge(32);
            split_merge_1g();
        }
        return;
    }
    let sizes: Vec<u64> = std::env::var("MMUKIT_BENCH_GIB")
        .unwrap_or_else(|_| "1,4".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let caps = HostCaps::probe();
    let mut rows = vec![
        Row {
            name: "anonymous",
            backend: Backend::PrivateAnonymous,
            log2: 0,
        },
        Row {
            name: "anon-shared",
            backend: Backend::Anonymous,
            log2: 0,
        },
        Row {
            name: "memfd",
            backend: Backend::Memfd,
            log2: 0,
        },
        Row {
            name: "hugetlb-2M",
            backend: Backend::Hugetlb,
            log2: 21,
        },
    ];
    if caps.memfd_secret {
        rows.push(Row {
            name: "secret",
            backend: Backend::Secret,
            log2: 0,
        });
    }
    match KvmVm::new() {
        Ok(vm) if vm.caps().guest_memfd_flags & GUEST_MEMFD_FLAG_MMAP != 0 => rows.push(Row {
            name: "guest_memfd",
            backend: Backend::Kvm(vm.clone()),
            log2: 0,
        }),
        Ok(_) => println!("guest_memfd: skipped (no mappable guest_memfd)"),
        Err(err) => println!("guest_memfd: skipped ({err})"),
    }
    println!(
        "gmem: populating guest memory, side by side (memset over populated memory is the bound)"
    );
    // Warm up: the first touch of memory this machine never used is far
    // slower than any later one.
    if let Some(file) = create(&rows[0], 1 << 30) {
        memset(&file);
    }
    println!(
        "THP: {} (a row says thp where gmem's memory asked for huge pages)",
        caps.thp.as_ref().map_or("none".to_string(), |thp| format!(
            "private anonymous {}, shmem {}",
            thp.anonymous, thp.shmem
        ))
    );
    for &gib in &sizes {
        let size = gib << 30;
        if available_bytes() < 2 * size {
            println!(
                "{gib} GiB: skipped (MemAvailable is {} GiB)",
                available_bytes() >> 30
            );
            continue;
        }
        qemu_prealloc(size, 2);
        let one = (0..3).map(|_| qemu_prealloc(size, 1)).min().unwrap();
        let two = (0..3).map(|_| qemu_prealloc(size, 2)).min().unwrap();
        println!(
            "{:<16} {:>4} GiB  prefault 1T {:>8.1?} {:>5.2} GiB/s  2T {:>8.1?} {:>5.2} GiB/s  (QEMU memory-backend-ram,prealloc=on: private anonymous, MADV_HUGEPAGE)",
            "qemu-prealloc",
            gib,
            one,
            gib_s(size, one),
            two,
            gib_s(size, two)
        );
        for r in &rows {
            row(r, size);
        }
    }
    if runs("qemu") && available_bytes() >= 2 << 30 {
        default_memory_against_qemu(1 << 30, 9);
    }
    if runs("split") {
        split_merge(32);
        split_merge_1g();
    }
}
