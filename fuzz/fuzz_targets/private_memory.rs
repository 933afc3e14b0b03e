//! Memory attributes and private faults on a software-protected VM and on a
//! TD (over the software TDX module), with the page allocators failing at
//! times: every mapping left agrees with its frame's attribute (private
//! frames from the slot's private memory, shared ones from the slot), no
//! huge leaf spans a mixed range, a mismatched access is a memory-fault
//! exit naming the faulting page without the shared bit
//! (`kvm_mmu_prepare_memory_fault_exit()`), a private fault with the slot
//! deleted exits the same way (`kvm_handle_noslot_fault()`), attributes a
//! range already has change nothing (`kvm_vm_set_mem_attributes()`), a
//! fault on a uniform range maps the huge leaf over any table left there
//! except on a TD's mirror (`kvm_tdp_mmu_map()`), a failed conversion
//! changes no attribute, and stats equal a recount. On the TD, the module's
//! S-EPT holds exactly the private leaves.
#![no_main]

use std::sync::Arc;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use mmu_cache::PagePool;
use mmu_cache::alloc::{ChunkAllocator, FailPolicy, FailingAllocator};
use split::{
    AccessKind, Gfn, Gpa, Level, MemoryAttribute, Memslot, MmuConfig, MmuError, Pfn, PrivateMemory,
    PrivateMemoryError, PrivatePage, TdpMmu, VmType,
};
use tdx_ext::TdxMirror;
use tdx_ext::pamt::PamtPolicy;

const PAGES: u64 = 4096;
const SHARED_HOST: u64 = 1 << 20;
const PRIVATE_HOST: u64 = 1 << 22;

/// Private memory of 2 MiB pages, the first `split` of them split to 4K.
#[derive(Debug)]
struct Pages {
    split: u64,
}

impl PrivateMemory for Pages {
    fn get_pfn(&self, slot_page: u64) -> Result<PrivatePage, PrivateMemoryError> {
        Ok(PrivatePage {
            pfn: Pfn(PRIVATE_HOST + slot_page),
            order: if slot_page >> 9 < self.split { 0 } else { 9 },
        })
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    Fault {
        page: u16,
        write: bool,
    },
    FaultAs {
        page: u16,
        offset: u16,
        write: bool,
        private: bool,
    },
    /// Deletes the slot, or adds it back.
    ToggleSlot,
    Convert {
        first: u16,
        pages: u16,
        private: bool,
    },
    Zap {
        first: u16,
        pages: u16,
    },
    Fail {
        k: u8,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    td: bool,
    split: u8,
    ops: Vec<Op>,
}

fuzz_target!(|input: Input| {
    let failing = Arc::new(FailingAllocator::new(
        ChunkAllocator::anonymous(),
        FailPolicy::Never,
    ));
    let pool = PagePool::from_shared(failing.clone(), None);
    let (vm_type, td) = if input.td {
        let (module, mirror) =
            TdxMirror::finalized_on_sim(4, PamtPolicy::OnInstall).expect("sim TD");
        (VmType::td(4), Some((module, mirror)))
    } else {
        (VmType::SoftwareProtected, None)
    };
    let config = MmuConfig {
        vm_type,
        ..MmuConfig::default()
    };
    let mmu = match &td {
        Some((_, mirror)) => TdpMmu::with_hooks(pool, config, mirror.clone()),
        None => TdpMmu::new(pool, config),
    }
    .expect("mmu");
    let private = Arc::new(Pages {
        split: u64::from(input.split % 9),
    });
    mmu.add_memslot(
        Memslot::new(0, Gfn(0), PAGES, Pfn(SHARED_HOST))
            .unwrap()
            .with_private_memory(private.clone()),
    )
    .unwrap();
    let shared_gpa = |gfn: u64| match vm_type {
        VmType::Td { shared_bit } => Gpa(Gfn(gfn).gpa().0 | 1 << shared_bit),
        _ => Gfn(gfn).gpa(),
    };
    let slot = || {
        Memslot::new(0, Gfn(0), PAGES, Pfn(SHARED_HOST))
            .unwrap()
            .with_private_memory(private.clone())
    };
    let mut slot_present = true;
    let mut vcpu = mmu.new_vcpu_caches();
    for op in input.ops.into_iter().take(64) {
        match op {
            Op::Fault { page, write } => {
                let gfn = u64::from(page) % PAGES;
                let attribute = mmu.memory_attribute(Gfn(gfn));
                // The address the guest uses for the frame's own kind.
                let gpa = match attribute {
                    MemoryAttribute::Private => Gfn(gfn).gpa(),
                    MemoryAttribute::Shared => shared_gpa(gfn),
                };
                match mmu.fault(&mut vcpu, gpa, AccessKind::data(write)) {
                    Ok(t) => {
                        let expected = match attribute {
                            MemoryAttribute::Private => Pfn(PRIVATE_HOST + gfn),
                            MemoryAttribute::Shared => Pfn(SHARED_HOST + gfn),
                        };
                        assert_eq!(t.hpa.pfn(), expected, "gfn {gfn:#x}");
                        // A shared fault on a uniform 2 MiB range maps 2M,
                        // over any 4K table a conversion left there.
                        let region = Gfn(gfn).align_down(512);
                        let uniform = mmu.memory_attributes().uniform(region, region + 512);
                        if attribute == MemoryAttribute::Shared && uniform.is_some() {
                            assert_eq!(t.level, Level::L2M, "gfn {gfn:#x}");
                        }
                    }
                    Err(MmuError::NoSlot { .. }) => {
                        assert!(!slot_present && attribute == MemoryAttribute::Shared);
                    }
                    Err(MmuError::MemoryFault { private: true, .. }) => {
                        // `kvm_handle_noslot_fault()` on a private fault.
                        assert!(!slot_present && attribute == MemoryAttribute::Private);
                    }
                    Err(MmuError::Cache(_) | MmuError::Hook(_)) => {}
                    Err(other) => panic!("fault of gfn {gfn:#x}: {other}"),
                }
            }
            Op::FaultAs {
                page,
                offset,
                write,
                private,
            } => {
                let gfn = u64::from(page) % PAGES;
                let within = u64::from(offset) % 4096;
                let gpa = if private {
                    Gpa(Gfn(gfn).gpa().0 | within)
                } else {
                    Gpa(shared_gpa(gfn).0 | within)
                };
                let attribute = mmu.memory_attribute(Gfn(gfn));
                match mmu.fault_as(
                    &mut vcpu,
                    gpa,
                    AccessKind::data(write),
                    MemoryAttribute::of_access(private),
                ) {
                    Ok(_) => {
                        assert!(slot_present);
                        assert_eq!(attribute == MemoryAttribute::Private, private);
                    }
                    Err(MmuError::MemoryFault {
                        gpa: exit_gpa,
                        size,
                        private: p,
                    }) => {
                        // The page, without the shared bit, one page long.
                        assert_eq!((exit_gpa, size), (Gfn(gfn).gpa(), 4096));
                        assert_eq!(p, private);
                        // A mismatch, or a private fault with no slot.
                        assert!(
                            (attribute == MemoryAttribute::Private) != private
                                || (!slot_present && private)
                        );
                    }
                    Err(MmuError::NoSlot { .. }) => {
                        assert!(!slot_present && !private);
                        assert_eq!(attribute, MemoryAttribute::Shared);
                    }
                    Err(MmuError::Cache(_) | MmuError::Hook(_)) => {}
                    Err(other) => panic!("fault_as of gfn {gfn:#x}: {other}"),
                }
            }
            Op::Convert {
                first,
                pages,
                private,
            } => {
                let start = u64::from(first) % PAGES;
                let end = (start + 1 + u64::from(pages) % 1100).min(PAGES);
                let attribute = if private {
                    MemoryAttribute::Private
                } else {
                    MemoryAttribute::Shared
                };
                let before = mmu.memory_attributes();
                let stats = mmu.page_stats();
                let already = before.uniform(Gfn(start), Gfn(end)) == Some(attribute);
                match mmu.set_memory_attributes(Gfn(start), Gfn(end), attribute) {
                    Ok(change) => {
                        assert_eq!(
                            mmu.memory_attributes().uniform(Gfn(start), Gfn(end)),
                            Some(attribute)
                        );
                        if already {
                            // Nothing to do: nothing zapped or split.
                            assert_eq!(change, split::AttributeChange::default());
                            assert_eq!(mmu.page_stats(), stats);
                        }
                    }
                    Err(MmuError::Cache(_) | MmuError::Hook(_)) => {
                        // Nothing recorded: the attributes are as they were.
                        let now = mmu.memory_attributes();
                        for gfn in start..end {
                            assert_eq!(now.get(Gfn(gfn)), before.get(Gfn(gfn)));
                        }
                    }
                    Err(other) => panic!("convert {start:#x}..{end:#x}: {other}"),
                }
            }
            Op::Zap { first, pages } => {
                let start = u64::from(first) % PAGES;
                let end = (start + 1 + u64::from(pages) % 1100).min(PAGES);
                let _ = mmu.zap_range(Gfn(start), Gfn(end));
            }
            Op::ToggleSlot => {
                if slot_present {
                    mmu.remove_memslot(0).expect("the slot is there");
                } else {
                    // A slot add may fail while the allocator fails.
                    if mmu.add_memslot(slot()).is_err() {
                        continue;
                    }
                }
                slot_present = !slot_present;
            }
            Op::Fail { k } => failing.set_policy(match k % 8 {
                0 => FailPolicy::Never,
                k => FailPolicy::EveryKth(u64::from(k) + 1),
            }),
        }
        // Every mapping agrees with its frame's attribute; no huge leaf
        // spans a mixed range.
        let attributes = mmu.memory_attributes();
        for gfn in (0..PAGES).step_by(13) {
            let kind = attributes.get(Gfn(gfn));
            for (gpa, private) in [(Gfn(gfn).gpa(), true), (shared_gpa(gfn), false)] {
                let Some(t) = mmu.translate(gpa) else {
                    continue;
                };
                if vm_type == VmType::SoftwareProtected {
                    // One tree: its frame says what it maps.
                    let expected = match kind {
                        MemoryAttribute::Private => Pfn(PRIVATE_HOST + gfn),
                        MemoryAttribute::Shared => Pfn(SHARED_HOST + gfn),
                    };
                    assert_eq!(t.hpa.pfn(), expected, "gfn {gfn:#x}");
                } else {
                    assert_eq!(
                        kind == MemoryAttribute::Private,
                        private,
                        "a TD maps gfn {gfn:#x} in the tree of the wrong kind"
                    );
                }
                if t.level > Level::L4K {
                    let pages = t.level.entry_pages();
                    let start = Gfn(gfn).align_down(pages);
                    assert!(attributes.uniform(start, start + pages).is_some());
                }
            }
        }
    }
    failing.set_policy(FailPolicy::Never);
    let (recount, _) = mmu.recount();
    assert_eq!(recount, mmu.page_stats());
    if let Some((module, _)) = &td {
        // The S-EPT holds exactly the private leaves of the main tree.
        let leaves = module.leaves();
        for &(level, gpa) in leaves.keys() {
            let t = mmu.translate(gpa).expect("every S-EPT leaf is mirrored");
            assert_eq!(t.level.get(), level);
        }
        drop(vcpu);
        mmu.teardown().expect("teardown");
    }
});
