//! # tdx-ext
//!
//! The TDX side of a TDP MMU, over a software TDX module:
//!
//! - [`TdxModule`]: the SEAMCALLs that S-EPT and PAMT management need, with
//!   the real leaf numbers and status encodings ([`Seamcall`], [`TdxStatus`]).
//! - [`SimTdxModule`]: a strict software module that keeps the S-EPT, the
//!   state of every page and the 4K PAMT, refuses every call that breaks a
//!   rule with the real status, and can inject BUSY or failures.
//! - [`TdxMirror`]: split's external page-table hooks over a module, so that
//!   a mirror [`split::TdpMmu`] keeps the S-EPT identical to its tree.
//! - [`pamt::DynamicPamt`]: a refcount per 2 MiB region; the first user adds
//!   the pair of PAMT pages, the last removes it; the free path cannot fail.
//! - Ownership: S-EPT pages (`Page<ExternalTablePage>`, owned by the MMU) and
//!   PAMT pages (`Page<PamtPage>`, owned by the PAMT) are different types, and
//!   the module refuses a page that is already something else.
//!
//! ```
//! use mmu_cache::{PagePool, alloc::ChunkAllocator};
//! use split::{AccessKind, Gfn, Gpa, Memslot, MmuConfig, Pfn, TdpMmu};
//! use tdx_ext::{TdxMirror, TdxModule, pamt::PamtPolicy};
//!
//! // A finalized TD on the software module; `TdxMirror::new` takes your own
//! // module, PAMT, allocator and account instead.
//! let (module, mirror) = TdxMirror::finalized_on_sim(4, PamtPolicy::OnInstall)?;
//! let mmu = TdpMmu::with_hooks(PagePool::new(ChunkAllocator::anonymous()),
//!                              MmuConfig::default(), mirror.clone())?;
//! // 4 MiB of private memory on host frames at 4 GiB.
//! mmu.add_memslot(Memslot::new(0, Gfn(0), 1024, Pfn(1 << 20))?)?;
//! let mut vcpu = mmu.new_vcpu_caches();
//! mmu.fault(&mut vcpu, Gpa(0x1000), AccessKind::Write)?;
//! // The module's S-EPT has the same 2M leaf as the mirror.
//! assert_eq!(module.leaves().len(), 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod mirror;
pub mod module;
pub mod pamt;
pub mod sim;
pub mod status;

pub use mirror::{MirrorCounters, TdPages, TdxMirror, VcpuPamtCache};
pub use module::{SeamcallResult, TdxModule};
pub use sim::{PageState, SimTdxModule};
pub use status::{Seamcall, SeamcallError, TdxStatus};
