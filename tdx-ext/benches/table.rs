//! Fault-in of 1 GiB of private TD memory through a mirror TDP MMU and the
//! software TDX module, at 4K and at 2M, with each PAMT policy: time,
//! SEAMCALLs per GiB, PAMT pages in use and idle in caches, and Dynamic
//! PAMT memory against the static PAMT share (about 0.4% of memory); then
//! the TD's teardown per GiB and its ratio to the fault-in time.
//! Run with `cargo bench -p tdx-ext --bench table`.

use split::{Gfn, Gpa, Pfn};
use std::sync::Arc;
use std::time::Instant;

use mmu_cache::PagePool;
use mmu_cache::alloc::ChunkAllocator;
use split::AccessKind;
use split::{Memslot, MmuConfig, TdpMmu};
use tdx_ext::pamt::{DynamicPamt, PamtPolicy};
use tdx_ext::{Seamcall, SimTdxModule, TdxMirror};

const GIB_PAGES: u64 = 1 << 18;
/// The static PAMT covers all memory at about 0.4%.
const STATIC_SHARE: f64 = 0.004;

fn run(policy: PamtPolicy, leaf_4k: bool) {
    let module = Arc::new(SimTdxModule::new(4));
    let pamt = DynamicPamt::new(module.clone(), PagePool::new(ChunkAllocator::anonymous()));
    let mirror = TdxMirror::new(
        module.clone(),
        pamt.clone(),
        ChunkAllocator::anonymous(),
        None,
        policy,
    );
    mirror.finalize().expect("finalize");
    let mmu = TdpMmu::with_hooks(
        PagePool::new(ChunkAllocator::anonymous()),
        MmuConfig::default(),
        mirror.clone(),
    )
    .expect("mmu");
    // Host frames near 4 GiB: 2M-aligned but not 1G-aligned, or off by one
    // page for 4K leaves.
    let host = (1 << 20) + if leaf_4k { 1 } else { 512 };
    mmu.add_memslot(Memslot::new(0, Gfn(0), GIB_PAGES, Pfn(host)).expect("slot"))
        .expect("add slot");
    let mut vcpu = mmu.new_vcpu_caches();
    let step = if leaf_4k { 1 } else { 512 };
    let start = Instant::now();
    for gfn in (0..GIB_PAGES).step_by(step) {
        mmu.fault(&mut vcpu, Gpa(gfn << 12), AccessKind::Write)
            .expect("fault");
    }
    let elapsed = start.elapsed();
    let seamcalls: u64 = Seamcall::ALL.iter().map(|&s| module.calls(s)).sum();
    let counters = pamt.counters();
    let cached = mirror.counters().pamt_cached;
    let dynamic_bytes = counters.pages_in_use * 4096;
    let static_bytes = (GIB_PAGES * 4096) as f64 * STATIC_SHARE;
    println!(
        "{:<14} {:<3} {:>8.1?}  {:>7} SEAMCALLs/GiB  PAMT pages in use {:>5} idle in caches {:>3}  PAMT memory {:>6} KiB = {:>5.2} x static ({:.0} KiB)",
        format!("{policy:?}"),
        if leaf_4k { "4K" } else { "2M" },
        elapsed,
        seamcalls,
        counters.pages_in_use,
        cached,
        dynamic_bytes >> 10,
        dynamic_bytes as f64 / static_bytes,
        static_bytes / 1024.0,
    );
    let start = Instant::now();
    let report = mmu.teardown().expect("teardown");
    let teardown = start.elapsed();
    assert_eq!(report.leaf_errors, 0);
    println!(
        "{:<18} teardown {:>8.1?}/GiB = {:>4.2} x fault-in ({} leaves, {} tables reclaimed)",
        "",
        teardown,
        teardown.as_secs_f64() / elapsed.as_secs_f64(),
        report.leaves,
        report.tables
    );
}

fn main() {
    if std::env::args().any(|arg| arg == "--list") {
        return;
    }
    println!(
        "tdx-ext: fault-in of 1 GiB of private memory, mirror TDP MMU over the software TDX module"
    );
    for leaf_4k in [true, false] {
        for policy in [PamtPolicy::OnInstall, PamtPolicy::OnCacheEntry] {
            run(policy, leaf_4k);
        }
    }
}
