//! A TDP MMU over 64 MiB: faults map 2 MiB leaves, dirty logging splits
//! them eagerly, and the log names exactly the pages written.

use mmu_cache::PagePool;
use mmu_cache::alloc::ChunkAllocator;
use split::{Gfn, Gpa, LogMode, Memslot, MmuConfig, MmuError, Pfn, TdpMmu};

fn main() -> Result<(), MmuError> {
    let mmu = TdpMmu::new(
        PagePool::new(ChunkAllocator::anonymous()),
        MmuConfig::default(),
    )?;
    let pages = 64 * 256;
    // Guest frames from 0 on host frames from 4 GiB: numbers, not memory.
    mmu.add_memslot(Memslot::new(0, Gfn(0), pages, Pfn(1 << 20))?)?;
    let mut vcpu = mmu.new_vcpu_caches();
    for gpa in (0..pages << 12).step_by(2 << 20) {
        mmu.write(&mut vcpu, Gpa(gpa))?;
    }
    println!("after the faults: {:?}", mmu.page_stats());
    mmu.enable_dirty_logging(0, LogMode::Classic)?;
    println!("after enabling dirty logging: {:?}", mmu.page_stats());
    for gfn in [3, 700, 9000] {
        mmu.write(&mut vcpu, Gfn(gfn).gpa())?;
    }
    let log = mmu.get_dirty_log(0)?;
    let dirty: Vec<u64> = (0..pages)
        .filter(|&page| log[(page / 64) as usize] & (1 << (page % 64)) != 0)
        .collect();
    assert_eq!(dirty, [3, 700, 9000]);
    println!("dirty pages: {dirty:?}; counters: {:?}", mmu.counters());
    Ok(())
}
