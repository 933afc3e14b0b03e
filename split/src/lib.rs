//! # split
//!
//! EPT page tables, a TDP MMU and a shadow MMU for a software or hardware-assisted
//! hypervisor, with dirty logging and eager huge-page splitting that never
//! allocates while the MMU lock is held.
//!
//! - [`ept`]: EPT entries as typed values, with validation of
//!   misconfigurations.
//! - [`TdpMmu`]: the tree, faults under a shared lock with
//!   compare-and-exchange, zap, translate, page stats, dirty logging (classic
//!   and manual-protect with "initially set"), eager and boundary splits.
//! - [`Memslot`]: guest frame ranges and their dirty bitmaps.
//! - [`addr`]: typed addresses ([`Gfn`], [`Gpa`], [`Hpa`], [`Pfn`]), so a
//!   guest frame cannot be passed where a guest address or a host page is
//!   meant.
//! - [`ExternalPageTable`]: hooks that keep an external copy of the tree
//!   (the TDX S-EPT) identical to the MMU's.
//! - [`shadow::ShadowMmu`]: the shadow MMU for nested TDP, which combines a
//!   guest hypervisor's EPT ([`guest::GuestTables`]) with the memslots, with
//!   rmaps, unsync pages, dirty logging and eager splitting without a vCPU.
//!
//! Tables are pages from an `mmu-cache` page cache filled with the
//! non-present value (suppress-#VE set), except the shadow MMU's split
//! cache, whose pages a split writes whole. Every operation tops up its caches
//! first, then takes the lock; a splitter that runs out drops the lock,
//! tops up and resumes.
//!
//! ```
//! use split::{Gfn, Gpa, LogMode, Memslot, MmuConfig, Pfn, TdpMmu};
//! use mmu_cache::{PagePool, alloc::ChunkAllocator};
//!
//! let mmu = TdpMmu::new(PagePool::new(ChunkAllocator::anonymous()), MmuConfig::default())?;
//! // 8 MiB of guest memory at gpa 0, on host frames from 0x100000.
//! mmu.add_memslot(Memslot::new(0, Gfn(0), 2048, Pfn(0x100000))?)?;
//! let mut vcpu = mmu.new_vcpu_caches();
//! for gpa in (0..8 << 20).step_by(2 << 20) {
//!     mmu.write(&mut vcpu, Gpa(gpa))?;
//! }
//! assert_eq!(mmu.page_stats().pages_2m, 4);
//!
//! mmu.enable_dirty_logging(0, LogMode::Classic)?;
//! assert_eq!(mmu.page_stats().pages_4k, 2048);
//! mmu.write(&mut vcpu, Gpa(0x5000))?;
//! let log = mmu.get_dirty_log(0)?;
//! assert_eq!(log[0], 1 << 5);
//! # Ok::<(), split::MmuError>(())
//! ```

pub mod addr;
pub mod attributes;
pub mod ept;
pub mod guest;
pub mod hooks;
mod lock;
pub mod memslot;
mod page_map;
pub mod shadow;
mod shard;
pub mod tdp;
pub mod translation;

pub use addr::{Gfn, Gpa, Hpa, Pfn};
pub use attributes::{MemoryAttribute, MemoryAttributes};
pub use ept::{AccessKind, Entry, EptCaps, EptError, Level, MemType};
pub use hooks::{
    ExternalPageTable, ExternalTablePage, HookCause, HookError, HookOp, HookVcpuState, NoExternal,
    TableRef, Topup,
};
pub use memslot::{LogMode, Memslot, MemslotError, PrivateMemory, PrivateMemoryError, PrivatePage};
pub use tdp::{
    Access, AttributeChange, MmuConfig, MmuCounters, MmuError, PageStats, TableHeader, TablePage,
    TdpMmu, TeardownReport, Translation, VcpuCaches, VmType,
};
