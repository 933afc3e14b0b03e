//! A TD whose private memory is a memfd: private and shared accesses, a
//! memory-fault exit, and a conversion that moves the MMU and the file.

use std::sync::Arc;

use gmem::consts::GUEST_MEMFD_FLAG_MMAP;
use gmem::{Backend, GmemConfig, GuestMemFile};
use mmu_cache::PagePool;
use mmu_cache::alloc::ChunkAllocator;
use mmukit_private::PrivateMemoryVm;
use split::AccessKind;
use split::{Gfn, Gpa, MemoryAttribute, Memslot, MmuConfig, MmuError, Pfn, TdpMmu, VmType};
use tdx_ext::TdxMirror;
use tdx_ext::pamt::PamtPolicy;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (_module, mirror) = TdxMirror::finalized_on_sim(4, PamtPolicy::OnInstall)?;
    let config = MmuConfig {
        vm_type: VmType::td(4),
        ..MmuConfig::default()
    };
    let mmu = Arc::new(TdpMmu::with_hooks(
        PagePool::new(ChunkAllocator::anonymous()),
        config,
        mirror,
    )?);
    let file = GuestMemFile::create(
        &Backend::Memfd,
        GmemConfig {
            size: 4 << 20,
            flags: GUEST_MEMFD_FLAG_MMAP,
            huge_page_size_log2: 0,
        },
    )?;
    let mut vm = PrivateMemoryVm::new(mmu.clone());
    // Shared frames: numbers at 4 GiB (never touched here).
    vm.bind(Memslot::new(0, Gfn(0), 1024, Pfn(1 << 20))?, &file, 0)?;
    vm.convert(Gfn(0), Gfn(1024), MemoryAttribute::Private)?;
    let shared_bit = 1u64 << 47;
    let mut vcpu = mmu.new_vcpu_caches();
    let private = mmu.fault(&mut vcpu, Gpa(0x5000), AccessKind::Write)?;
    println!("private gpa 0x5000 -> {} (the file)", private.hpa);
    match mmu.fault(&mut vcpu, Gpa(shared_bit | 0x5000), AccessKind::Write) {
        Err(MmuError::MemoryFault { gpa, private, .. }) => {
            println!("memory-fault exit at {gpa} (private access: {private})");
        }
        other => panic!("expected a memory-fault exit, got {other:?}"),
    }
    let report = vm.convert(Gfn(5), Gfn(6), MemoryAttribute::Shared)?;
    println!("converted: {report:?}");
    let shared = mmu.fault(&mut vcpu, Gpa(shared_bit | 0x5000), AccessKind::Write)?;
    println!("shared gpa 0x5000 -> {} (the slot)", shared.hpa);
    drop(vcpu);
    mmu.teardown()?;
    Ok(())
}
