//! Costs of the private-memory path, side by side from one run:
//! - a conversion of one 4 KiB page inside a private 2 MiB HugeTLB page of
//!   a TD, end to end (DEMOTE, PAGE.REMOVE, the file's split), and back
//!   (the file's merge), against a 2 MiB memcpy in the same run;
//! - private fault-in of a TD's memory from a HugeTLB file (2 MiB S-EPT
//!   leaves) against the same from 4 KiB memory (memfd), both files
//!   populated beforehand: time, SEAMCALLs, PAMT memory.
//!
//! `MMUKIT_BENCH_PRIVATE_MIB` sets the fault-in size (default 1024); it is
//! cut to the free 2 MiB HugeTLB pages, and the run says so.
//! Run with `cargo bench -p mmukit-tests --bench private`.

use std::time::{Duration, Instant};

use mmukit_tests::{Td, TdOptions};
use split::{Gfn, MemoryAttribute};
use tdx_ext::Seamcall;

const MIB2_PAGES: u64 = 512;

fn memcpy_2m() -> Duration {
    let source = vec![0x5au8; 2 << 20];
    let mut target = vec![0u8; 2 << 20];
    target.copy_from_slice(&source);
    let mut best = Duration::MAX;
    for _ in 0..20 {
        let start = Instant::now();
        target.copy_from_slice(std::hint::black_box(&source));
        std::hint::black_box(&mut target);
        best = best.min(start.elapsed());
    }
    best
}

fn seamcalls(td: &Td) -> u64 {
    let module = td.module.as_ref().expect("a TD");
    Seamcall::ALL.iter().map(|&s| module.calls(s)).sum()
}

/// Faults in every page of a fresh TD of `bytes` once, writing it.
fn fault_in(options: TdOptions, step_pages: u64) -> (Duration, u64, u64, u64) {
    let pages = options.size / 4096;
    let td = Td::new(options).expect("td");
    td.vm
        .convert(Gfn(0), Gfn(pages), MemoryAttribute::Private)
        .expect("private");
    // The file's pages are populated first: the time is the MMU's and the
    // module's, not the kernel's first touch.
    td.file
        .prefault(0, td.file.size(), 2, &|_, _| {})
        .expect("prefault");
    let before = seamcalls(&td);
    let mut vcpu = td.mmu().new_vcpu_caches();
    let start = Instant::now();
    for gfn in (0..pages).step_by(step_pages as usize) {
        td.write_u64(&mut vcpu, Gfn(gfn).gpa(), gfn).expect("fault");
    }
    let elapsed = start.elapsed();
    let pamt = td.mirror.as_ref().unwrap().pamt().counters().pages_in_use;
    let leaves = td.module.as_ref().unwrap().leaves().len() as u64;
    let calls = seamcalls(&td) - before;
    drop(vcpu);
    td.mmu().teardown().expect("teardown");
    (elapsed, calls, pamt, leaves)
}

fn main() {
    let free = gmem::HostCaps::probe()
        .pool(2 << 20)
        .map_or(0, |pool| pool.available);
    if !gmem::caps::hugetlb_pages_free("the private-memory table", 2 << 20, 4) {
        return;
    }
    let copy = memcpy_2m();

    // Conversion round trips, one per huge page.
    let huge_pages = free.min(16);
    let td = Td::new(TdOptions::hugetlb_2m(huge_pages << 21)).expect("td");
    td.vm
        .convert(
            Gfn(0),
            Gfn(huge_pages * MIB2_PAGES),
            MemoryAttribute::Private,
        )
        .unwrap();
    let mut vcpu = td.mmu().new_vcpu_caches();
    for huge in 0..huge_pages {
        td.write_u64(&mut vcpu, Gfn(huge * MIB2_PAGES).gpa(), huge)
            .unwrap();
    }
    let (mut to_shared, mut to_private) = (Duration::ZERO, Duration::ZERO);
    // Where the time goes: the file's copy (the destination pages taken as
    // they are written) and remaps (split_time and merge_time less the
    // copies); the rest is the MMU and the SEAMCALLs (BLOCK, TRACK, DEMOTE,
    // PAGE.REMOVE; PAGE.AUG on the way back).
    let (mut shared_copy, mut shared_file) = (Duration::ZERO, Duration::ZERO);
    let (mut private_copy, mut private_file) = (Duration::ZERO, Duration::ZERO);
    let mut shared_calls = 0;
    for huge in 0..huge_pages {
        let page = Gfn(huge * MIB2_PAGES + 77);
        let (before, calls) = (td.vm.file_metrics(), seamcalls(&td));
        let start = Instant::now();
        let report = td
            .vm
            .convert(page, page + 1, MemoryAttribute::Shared)
            .unwrap();
        to_shared += start.elapsed();
        let after = td.vm.file_metrics();
        shared_copy += after.copy_time - before.copy_time;
        shared_file += after.split_time - before.split_time;
        shared_calls += seamcalls(&td) - calls;
        assert_eq!((report.mmu.splits, report.file_splits), (1, 1));
        let before = after;
        let start = Instant::now();
        let report = td
            .vm
            .convert(page, page + 1, MemoryAttribute::Private)
            .unwrap();
        to_private += start.elapsed();
        let after = td.vm.file_metrics();
        private_copy += after.copy_time - before.copy_time;
        private_file += after.merge_time - before.merge_time;
        assert_eq!(report.file_merges, 1);
    }
    let per = |total: Duration| total / huge_pages as u32;
    println!("# private-memory path (TD over the software TDX module)");
    println!();
    println!("| conversion of 4 KiB inside a private 2 MiB HugeTLB page | time | x 2 MiB memcpy |");
    println!("|---|---|---|");
    println!("| 2 MiB memcpy (bound) | {:?} | 1.0 |", copy);
    println!(
        "| to shared: DEMOTE, PAGE.REMOVE, file split (in place: no host view maps the private file) | {:?} | {:.1} |",
        per(to_shared),
        per(to_shared).as_secs_f64() / copy.as_secs_f64()
    );
    println!(
        "| back to private: file merge | {:?} | {:.1} |",
        per(to_private),
        per(to_private).as_secs_f64() / copy.as_secs_f64()
    );
    println!("({huge_pages} round trips)");
    println!();
    println!("| where the time goes | copy | remap views | MMU and SEAMCALLs |");
    println!("|---|---|---|---|");
    let part = |what: Duration, total: Duration| {
        format!(
            "{:?} ({:.0}%)",
            per(what),
            100.0 * what.as_secs_f64() / total.as_secs_f64()
        )
    };
    println!(
        "| to shared ({} SEAMCALLs each) | {} | {} | {} |",
        shared_calls / huge_pages,
        part(shared_copy, to_shared),
        part(shared_file - shared_copy, to_shared),
        part(to_shared.saturating_sub(shared_file), to_shared)
    );
    println!(
        "| back to private | {} | {} | {} |",
        part(private_copy, to_private),
        part(private_file - private_copy, to_private),
        part(to_private.saturating_sub(private_file), to_private)
    );
    drop(vcpu);
    td.mmu().teardown().unwrap();
    drop(td);

    // Fault-in: 2 MiB leaves from HugeTLB against 4 KiB pages.
    let wanted_mib: u64 = std::env::var("MMUKIT_BENCH_PRIVATE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let mib = wanted_mib.min(free * 2) & !1;
    if mib < wanted_mib {
        println!();
        println!("fault-in cut to {mib} MiB: {free} free 2 MiB HugeTLB pages");
    }
    let bytes = mib << 20;
    let (huge_time, huge_calls, huge_pamt, huge_leaves) =
        fault_in(TdOptions::hugetlb_2m(bytes), MIB2_PAGES);
    let (small_time, small_calls, small_pamt, small_leaves) = fault_in(TdOptions::memfd(bytes), 1);
    println!();
    println!(
        "| private fault-in of {mib} MiB | time | SEAMCALLs | PAMT pages (KiB) | S-EPT leaves |"
    );
    println!("|---|---|---|---|---|");
    println!(
        "| HugeTLB 2 MiB pages (2M leaves) | {:?} | {huge_calls} | {huge_pamt} ({}) | {huge_leaves} |",
        huge_time,
        huge_pamt * 4
    );
    println!(
        "| 4 KiB pages (memfd) | {:?} | {small_calls} | {small_pamt} ({}) | {small_leaves} |",
        small_time,
        small_pamt * 4
    );
    println!(
        "| ratio 4 KiB / 2 MiB | {:.1} | {:.1} | {:.1} | |",
        small_time.as_secs_f64() / huge_time.as_secs_f64(),
        small_calls as f64 / huge_calls.max(1) as f64,
        small_pamt as f64 / huge_pamt.max(1) as f64
    );
}
