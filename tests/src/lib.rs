//! # mmukit-tests
//!
//! Cross-crate scenarios: what no one crate can test alone. The builders
//! here put the crates together the way a VMM does; the scenarios live in
//! `tests/`.
//!
//! - [`Td`]: a soft TD: the software TDX module with Dynamic PAMT, a
//!   mirror, a TD's TDP MMU (private main tree, shared tree) and one slot
//!   whose shared frames are anonymous memory and whose private memory is
//!   a guest memory file on any backend.
//!
//! Tests that need HugeTLB pages or KVM ask gmem's probe
//! (`gmem::HostCaps::allows`, `gmem::caps::hugetlb_pages_free`), which
//! skips them with one line naming what is missing.
//!
//! ```
//! use mmukit_tests::{Td, TdOptions};
//! use split::{Gfn, Gpa, MemoryAttribute};
//!
//! let td = Td::new(TdOptions::memfd(4 << 20))?;
//! td.vm.convert(Gfn(0), Gfn(1024), MemoryAttribute::Private)?;
//! let mut vcpu = td.mmu().new_vcpu_caches();
//! td.write_u64(&mut vcpu, Gpa(0x2000), 7)?;
//! assert_eq!(td.read_u64(&mut vcpu, Gpa(0x2000))?, 7);
//! # Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
//! ```

use std::sync::Arc;

use gmem::consts::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
use gmem::{Backend, GmemConfig, GuestMemFile, View};
use mmu_cache::alloc::{
    ChunkAllocator, CountingAllocator, FailPolicy, FailingAllocator, PageAllocator,
};
use mmu_cache::{Account, PagePool};
use mmukit_private::PrivateMemoryVm;
use split::{Gfn, Gpa, MmuConfig, MmuError, TdpMmu, VcpuCaches, VmType};
use tdx_ext::TdPages;
use tdx_ext::pamt::PamtPolicy;
use tdx_ext::{SimTdxModule, TdxMirror};

/// An allocator that counts its pages and fails when told to.
pub type Failing = CountingAllocator<FailingAllocator<ChunkAllocator>>;

/// A counting allocator that never fails until its policy says so.
pub fn failing() -> Arc<Failing> {
    Arc::new(CountingAllocator::new(FailingAllocator::new(
        ChunkAllocator::anonymous(),
        FailPolicy::Never,
    )))
}

/// What a [`Td`] is made of.
#[derive(Clone, Debug)]
pub struct TdOptions {
    /// Guest memory in bytes (one slot at gpa 0).
    pub size: u64,
    /// The backend of the private memory file.
    pub backend: Backend,
    /// HugeTLB page size as log2 (21 or 30), 0 for other backends.
    pub huge_page_size_log2: u8,
    /// The VM type: a TD (the default) or a software-protected VM.
    pub vm_type: VmType,
    /// When PAMT pages are taken.
    pub pamt_policy: PamtPolicy,
}

impl TdOptions {
    /// A TD whose private memory is a memfd.
    pub fn memfd(size: u64) -> Self {
        Self {
            size,
            backend: Backend::Memfd,
            huge_page_size_log2: 0,
            vm_type: VmType::td(4),
            pamt_policy: PamtPolicy::OnInstall,
        }
    }

    /// A TD whose private memory is a HugeTLB file of 2 MiB pages.
    pub fn hugetlb_2m(size: u64) -> Self {
        Self {
            backend: Backend::Hugetlb,
            huge_page_size_log2: 21,
            ..Self::memfd(size)
        }
    }

    /// The same memory, for a software-protected VM (no TDX module).
    pub fn software_protected(self) -> Self {
        Self {
            vm_type: VmType::SoftwareProtected,
            ..self
        }
    }
}

/// A soft TD (or software-protected VM) over a guest memory file.
pub struct Td {
    /// The software TDX module (a TD only).
    pub module: Option<Arc<SimTdxModule>>,
    /// The mirror that keeps the module's S-EPT (a TD only).
    pub mirror: Option<Arc<TdxMirror>>,
    /// The MMU with the file bound to slot 0.
    pub vm: PrivateMemoryVm,
    /// The private memory file.
    pub file: GuestMemFile,
    /// The shared memory: an anonymous file's host view, whose frames the
    /// slot maps for shared accesses.
    pub shared: View,
    /// The shared memory's file.
    pub shared_file: GuestMemFile,
    /// The MMU's table pages.
    pub mmu_alloc: Arc<Failing>,
    /// The S-EPT pages.
    pub table_alloc: Arc<Failing>,
    /// The PAMT pages.
    pub pamt_alloc: Arc<Failing>,
    /// The account every TD page is charged to.
    pub account: Arc<Account>,
}

impl Td {
    /// Builds it: module, PAMT, mirror and MMU for a TD, then the files
    /// and slot 0 over all of `options.size`.
    pub fn new(options: TdOptions) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let account = Arc::new(Account::new("td"));
        let (mmu_alloc, table_alloc, pamt_alloc) = (failing(), failing(), failing());
        let pool = PagePool::from_shared(mmu_alloc.clone(), Some(account.clone()));
        let config = MmuConfig {
            vm_type: options.vm_type,
            ..MmuConfig::default()
        };
        let (module, mirror, mmu) = match options.vm_type {
            VmType::Td { .. } => {
                let pages = TdPages {
                    pamt: pamt_alloc.clone(),
                    tables: table_alloc.clone(),
                    account: Some(account.clone()),
                };
                let (module, mirror) =
                    TdxMirror::finalized_on_sim_with(4, options.pamt_policy, pages)?;
                let mmu = TdpMmu::with_hooks(pool, config, mirror.clone())?;
                (Some(module), Some(mirror), mmu)
            }
            _ => (None, None, TdpMmu::new(pool, config)?),
        };
        let file = GuestMemFile::create(
            &options.backend,
            GmemConfig {
                size: options.size,
                flags: GUEST_MEMFD_FLAG_MMAP,
                huge_page_size_log2: options.huge_page_size_log2,
            },
        )?;
        let shared_file = GuestMemFile::create(
            &Backend::Anonymous,
            GmemConfig {
                size: options.size,
                flags: GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
                huge_page_size_log2: 0,
            },
        )?;
        let shared = shared_file.map(0, options.size)?;
        let mut vm = PrivateMemoryVm::new(Arc::new(mmu));
        let slot = mmukit_private::slot_over_view(0, Gfn(0), &shared_file, &shared)?;
        vm.bind(slot, &file, 0)?;
        Ok(Self {
            module,
            mirror,
            vm,
            file,
            shared,
            shared_file,
            mmu_alloc,
            table_alloc,
            pamt_alloc,
            account,
        })
    }

    /// The MMU.
    pub fn mmu(&self) -> &TdpMmu {
        self.vm.mmu()
    }

    /// The GPA of `gfn` as the guest uses it for a shared access (a TD sets
    /// its shared bit; other VMs use the frame's address).
    pub fn shared_gpa(&self, gfn: Gfn) -> Gpa {
        match self.mmu().config().vm_type {
            VmType::Td { shared_bit } => Gpa(gfn.gpa().0 | 1 << shared_bit),
            _ => gfn.gpa(),
        }
    }

    /// A guest write of `value` at `gpa` through the MMU: the software
    /// vCPU's access, faulting on a miss.
    pub fn write_u64(&self, vcpu: &mut VcpuCaches, gpa: Gpa, value: u64) -> Result<(), MmuError> {
        let hpa = self.mmu().write(vcpu, gpa)?;
        // SAFETY: the MMU maps guest frames to pages of the two files'
        // mappings, which live as long as `self`; guest memory is reached
        // through raw pointers only, and `gpa` is 8-byte aligned.
        unsafe { std::ptr::write_volatile(hpa.0 as *mut u64, value) };
        Ok(())
    }

    /// A guest read at `gpa` through the MMU.
    pub fn read_u64(&self, vcpu: &mut VcpuCaches, gpa: Gpa) -> Result<u64, MmuError> {
        let hpa = self.mmu().read(vcpu, gpa)?;
        // SAFETY: as in `write_u64`.
        Ok(unsafe { std::ptr::read_volatile(hpa.0 as *const u64) })
    }

    /// Pages the TD's allocators have handed out and not had back: MMU
    /// tables, S-EPT pages, PAMT pages.
    pub fn pages_outstanding(&self) -> usize {
        self.mmu_alloc.pages_outstanding()
            + self.table_alloc.pages_outstanding()
            + self.pamt_alloc.pages_outstanding()
    }
}
