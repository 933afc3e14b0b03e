//! A TD over the software TDX module: faults on the mirror MMU become
//! SEAMCALLs, and the module's S-EPT matches the mirror.

use mmu_cache::PagePool;
use mmu_cache::alloc::ChunkAllocator;
use split::AccessKind;
use split::{Gfn, Gpa, Memslot, MmuConfig, Pfn, TdpMmu};
use tdx_ext::pamt::PamtPolicy;
use tdx_ext::{Seamcall, TdxMirror};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (module, mirror) = TdxMirror::finalized_on_sim(4, PamtPolicy::OnInstall)?;
    let mmu = TdpMmu::with_hooks(
        PagePool::new(ChunkAllocator::anonymous()),
        MmuConfig::default(),
        mirror.clone(),
    )?;
    mmu.add_memslot(Memslot::new(0, Gfn(0), 4096, Pfn(1 << 20))?)?;
    let mut vcpu = mmu.new_vcpu_caches();
    for gpa in [0x1000, 0x20_0000, 0x40_3000] {
        mmu.fault(&mut vcpu, Gpa(gpa), AccessKind::Write)?;
    }
    assert_eq!(module.leaves().len() as u64, {
        let s = mmu.page_stats();
        s.pages_4k + s.pages_2m + s.pages_1g
    });
    for call in [
        Seamcall::MemSeptAdd,
        Seamcall::MemPageAug,
        Seamcall::PhymemPamtAdd,
    ] {
        println!("{call:?}: {}", module.calls(call));
    }
    println!(
        "PAMT pages in use: {}",
        mirror.pamt().counters().pages_in_use
    );
    drop(vcpu);
    mmu.teardown()?;
    Ok(())
}
