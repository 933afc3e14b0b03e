//! The TDP MMU: one EPT tree per VM, faulted in by vCPUs under a shared
//! lock with compare-and-exchange, with dirty logging and eager splitting.

pub use crate::translation::{Access, PageStats, Translation};

mod access;
mod attributes;
mod dirty;
mod fault;
mod split;
mod zap;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use mmu_cache::alloc::NoAllocSection;
use mmu_cache::{CacheError, ObjectCache, Page, PageCache, PageKind, PagePool, Slab, SlabError};

use crate::addr::{Gfn, Gpa, Hpa, Pfn};
use crate::attributes::{MemoryAttribute, MemoryAttributes};
use crate::ept::{self, ACCESSED, DIRTY, Entry, Level, MemType, WRITE};
use crate::hooks::{
    ExternalPageTable, ExternalTablePage, HookError, HookVcpuState, NoExternal, TableRef, Topup,
};
use crate::lock::{MmuLock, ReadGuard, WriteGuard};
use crate::memslot::{ClearedWord, LogMode, Memslot, MemslotError};
use crate::page_map::PageMap;
use crate::shard::ShardedCounters;

/// Pages that hold EPT tables.
#[derive(Debug)]
pub enum TablePage {}
impl PageKind for TablePage {}

/// The value an entry holds while an external hook runs on it.
const FROZEN: u64 = ept::NON_PRESENT | 0x5a0;
/// Splits between two voluntary releases of the lock.
const SPLITS_PER_YIELD: u64 = 64;

/// Errors of the TDP MMU.
#[derive(Debug, thiserror::Error)]
pub enum MmuError {
    /// No memslot holds the guest frame (an MMIO access in KVM terms).
    #[error("no memslot holds gpa {gpa:#x}")]
    NoSlot {
        /// The guest physical address.
        gpa: Gpa,
    },
    /// The address is beyond what the paging depth translates.
    #[error("gpa {gpa:#x} is beyond the {levels}-level address space")]
    AddressTooWide {
        /// The guest physical address.
        gpa: Gpa,
        /// The paging depth.
        levels: u8,
    },
    /// A topup of the MMU's caches failed.
    #[error("topping up the MMU caches: {0}")]
    Cache(#[from] CacheError),
    /// A memslot operation failed.
    #[error(transparent)]
    Memslot(#[from] MemslotError),
    /// An external page-table hook failed; the tree is unchanged there.
    #[error(transparent)]
    Hook(#[from] HookError),
    /// A leaf could not be encoded (a frame not aligned to its level).
    #[error("building a leaf: {0}")]
    Entry(#[from] ept::EptError),
    /// The header slab could not be created.
    #[error(transparent)]
    Slab(#[from] SlabError),
    /// The configuration is invalid, or the VM's type does not allow the
    /// operation.
    #[error("invalid MMU configuration: {0}")]
    Config(&'static str),
    /// The access's kind (private or shared) differs from the frame's
    /// memory attribute, or a private access found no private memory: the
    /// vCPU exits to the VMM (`KVM_EXIT_MEMORY_FAULT`, with
    /// `KVM_MEMORY_EXIT_FLAG_PRIVATE` when `private`), which converts the
    /// range and runs the vCPU again.
    #[error("memory fault at {gpa}: a {} access to {} memory", if *.private { "private" } else { "shared" }, if *.private { "shared (or no private)" } else { "private" })]
    MemoryFault {
        /// The faulting address (with a TD's shared bit, as the guest used it).
        gpa: Gpa,
        /// The size of the range to convert.
        size: u64,
        /// Whether the access was private.
        private: bool,
    },
    /// The slot's private memory could not give a frame.
    #[error("private memory of {gpa}: {source}")]
    PrivateMemory {
        /// The faulting address.
        gpa: Gpa,
        /// The provider's error.
        source: crate::memslot::PrivateMemoryError,
    },
}

/// The bookkeeping of one table: where it sits and the page that holds it
/// (the kernel's `struct kvm_mmu_page`).
#[derive(Debug, Default)]
pub struct TableHeader {
    gfn: Gfn,
    level: u8,
    page: Option<Page<TablePage>>,
    external: Option<Page<ExternalTablePage>>,
}

impl TableHeader {
    /// First guest frame the table covers.
    pub fn gfn(&self) -> Gfn {
        self.gfn
    }

    /// The level of the table's entries.
    pub fn level(&self) -> Level {
        Level::new(self.level).expect("headers of linked tables have a level")
    }

    /// The address of the table page, once linked.
    pub fn table_hpa(&self) -> Option<Hpa> {
        self.page.as_ref().map(|page| Hpa(page.addr() as u64))
    }

    /// The address of the external page that mirrors the table, if any.
    pub fn external_hpa(&self) -> Option<Hpa> {
        self.external.as_ref().map(|page| Hpa(page.addr() as u64))
    }

    fn table_ref(&self) -> TableRef {
        TableRef {
            hpa: self.table_hpa().unwrap_or_default(),
            external: self.external_hpa(),
        }
    }
}

/// Tables (and headers) one fault may link: one per level of a 5-level walk.
pub const TABLES_PER_FAULT: usize = 5;

/// vCPU threads whose faults the table map has room for at once.
const RESERVE_THREADS: usize = 64;

/// What one vCPU brings to its faults and accesses, as KVM's vcpu does:
/// caches for every level of a 5-level walk, topped up before the lock;
/// the hooks' own state of the vCPU (a TDX mirror's PAMT cache); and the
/// vCPU's walk cache (the leaf table of its last access).
#[derive(Debug)]
pub struct VcpuCaches {
    /// Table pages, filled with the non-present value.
    pub tables: PageCache<TablePage>,
    /// Table headers.
    pub headers: ObjectCache<TableHeader>,
    /// External table pages, topped up only when the hooks ask for them.
    pub external: PageCache<ExternalTablePage>,
    /// The hooks' state of this vCPU, if they keep one.
    pub hooks: Option<Box<dyn HookVcpuState>>,
    /// The leaf table of this vCPU's last access.
    walk: WalkCache,
}

impl VcpuCaches {
    /// The hooks' state of this vCPU, as the hooks take it (downcast it
    /// with [`HookVcpuState::as_any_mut`] to the hooks' own type).
    pub fn hook_state(&mut self) -> Option<&mut dyn HookVcpuState> {
        match &mut self.hooks {
            Some(state) => Some(&mut **state),
            None => None,
        }
    }

    /// Returns every cached object (the hooks' too) to its allocator;
    /// returns how many.
    pub fn free_all(&mut self) -> usize {
        self.tables.free_all()
            + self.headers.free_all()
            + self.external.free_all()
            + self.hooks.as_mut().map_or(0, |hooks| hooks.free_all())
    }

    /// The topup before a fault takes the lock: tables and headers for a
    /// 5-level walk at the MMU's vCPU cache `capacity` (the configuration,
    /// not the set's default), and an external page per level when
    /// `external_levels` is given (the hooks ask for external tables).
    pub fn topup_for_fault(
        &mut self,
        capacity: usize,
        external_levels: Option<u8>,
    ) -> Result<(), CacheError> {
        self.tables
            .topup_with_capacity(capacity, TABLES_PER_FAULT)
            .map_err(|err| CacheError::in_set("tables", err))?;
        self.headers
            .topup_with_capacity(capacity, TABLES_PER_FAULT)
            .map_err(|err| CacheError::in_set("headers", err))?;
        if let Some(levels) = external_levels {
            self.external
                .topup_with_capacity(capacity, usize::from(levels))
                .map_err(|err| CacheError::in_set("external", err))?;
        }
        Ok(())
    }
}

/// What kind of VM the MMU serves (KVM's `vm_type`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum VmType {
    /// Every frame shared (`KVM_X86_DEFAULT_VM`): no memory attributes;
    /// every fault maps the memslot's host frames in the one tree.
    #[default]
    Default,
    /// `KVM_X86_SW_PROTECTED_VM`: per-frame memory attributes; a fault is
    /// private when its frame is (the attributes are the source of truth,
    /// as the kernel sets `PFERR_PRIVATE_ACCESS` from them), and private
    /// faults take their frames from the slot's private memory. One tree.
    SoftwareProtected,
    /// A TD: an access is shared when the GPA has bit `shared_bit` set
    /// (47 with 4-level paging, 51 with 5). Private frames are mapped in the
    /// main tree, which the hooks mirror (the S-EPT), shared ones in a
    /// second, direct tree the hooks never see. The frame number is the GPA
    /// without the shared bit.
    Td {
        /// The GPA bit that marks a shared access.
        shared_bit: u8,
    },
}

impl VmType {
    /// A TD with the shared bit of `levels`-level paging: the top bit of
    /// its GPA width (GPAW 48 or 52).
    pub fn td(levels: u8) -> Self {
        Self::Td {
            shared_bit: Self::td_shared_bit(levels),
        }
    }

    fn td_shared_bit(levels: u8) -> u8 {
        if levels >= 5 { 51 } else { 47 }
    }

    /// Whether the VM has memory attributes and private memory.
    pub fn has_private_memory(self) -> bool {
        self != Self::Default
    }
}

/// What a [`TdpMmu::set_memory_attributes`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AttributeChange {
    /// Frames whose attribute changed.
    pub frames: u64,
    /// Huge leaves split so that the range's edges fall between leaves
    /// (a TD's private 2M leaves: BLOCK, TRACK and DEMOTE on the S-EPT).
    pub splits: u64,
    /// Leaves zapped over the range.
    pub zapped: u64,
}

/// Configuration of a [`TdpMmu`].
#[derive(Clone, Copy, Debug)]
pub struct MmuConfig {
    /// Paging depth: 4 or 5.
    pub levels: u8,
    /// Split huge pages when dirty logging starts (or at the first clear in
    /// manual mode). Off: writes split lazily, one fault at a time.
    pub eager_split: bool,
    /// Capacity of the split caches (tables topped up per lock hold while
    /// splitting).
    pub split_cache_capacity: usize,
    /// Memory type of leaves.
    pub memtype: MemType,
    /// Capacity of each vCPU cache (objects per topup, at least 5).
    pub vcpu_cache_capacity: usize,
    /// The kind of VM: whether it has private memory, and how a fault
    /// says it is private.
    pub vm_type: VmType,
}

impl Default for MmuConfig {
    fn default() -> Self {
        Self {
            levels: 4,
            eager_split: true,
            split_cache_capacity: 256,
            memtype: MemType::Wb,
            vcpu_cache_capacity: mmu_cache::DEFAULT_CAPACITY,
            vm_type: VmType::Default,
        }
    }
}

/// Counters of MMU work.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmuCounters {
    /// Faults handled.
    pub faults: u64,
    /// Walks retried after losing a race.
    pub retries: u64,
    /// Huge leaves split (eagerly or for a boundary).
    pub splits: u64,
    /// Huge leaves split by a write fault (lazy mode, or a huge leaf an
    /// eager split could not split).
    pub lazy_splits: u64,
    /// Huge leaves that an eager split under dirty logging could not split
    /// (split caches not filled, hooks refusing) and that were
    /// write-protected whole instead, counted at each protect pass.
    pub split_fallbacks: u64,
    /// Times a splitter dropped the lock to top up or to yield.
    pub lock_drops: u64,
    /// Tables linked.
    pub tables_linked: u64,
    /// Tables freed.
    pub tables_freed: u64,
    /// External pages kept out of the allocator because the hooks could
    /// not take them back (they may still belong to the external side).
    pub external_leaked: u64,
    /// Faults that exited to the VMM with a memory fault (a private access
    /// to shared memory or the other way round).
    pub memory_faults: u64,
    /// Calls of [`TdpMmu::set_memory_attributes`] that changed frames.
    pub conversions: u64,
}

/// The MMU's counters, each a slot of [`Counters`].
#[derive(Clone, Copy, Debug)]
pub(super) enum Count {
    Faults,
    Retries,
    Splits,
    LazySplits,
    SplitFallbacks,
    LockDrops,
    TablesLinked,
    TablesFreed,
    ExternalLeaked,
    MemoryFaults,
    Conversions,
}

/// Leaf counts come after the work counters.
const LEAVES: usize = Count::Conversions as usize + 1;

/// Work counters and leaf counts, sharded per thread: a fault bumps its own
/// thread's cache line, never one that every vCPU writes.
#[derive(Default)]
pub(super) struct Counters(ShardedCounters<{ LEAVES + 3 }>);

impl Counters {
    pub(super) fn add(&self, count: Count, value: u64) {
        self.0.add(count as usize, value);
    }

    fn get(&self, count: Count) -> u64 {
        self.0.get(count as usize)
    }

    /// `value` more leaves of `level`.
    pub(super) fn add_leaves(&self, level: Level, value: u64) {
        self.0.add(LEAVES + stat_index(level), value);
    }

    /// `value` fewer leaves of `level`.
    pub(super) fn sub_leaves(&self, level: Level, value: u64) {
        self.0.sub(LEAVES + stat_index(level), value);
    }

    fn leaves(&self, level: Level) -> u64 {
        self.0.get(LEAVES + stat_index(level))
    }
}

/// The TDP MMU of one VM.
///
/// ```
/// use split::{Gfn, Gpa, Memslot, MmuConfig, Pfn, TdpMmu};
/// use mmu_cache::{PagePool, alloc::ChunkAllocator};
///
/// let mmu = TdpMmu::new(PagePool::new(ChunkAllocator::anonymous()), MmuConfig::default())?;
/// mmu.add_memslot(Memslot::new(0, Gfn(0), 1 << 18, Pfn(1 << 18))?)?; // 1 GiB at gpa 0
/// let mut caches = mmu.new_vcpu_caches();
/// mmu.fault(&mut caches, Gpa(0x1234_5000), true)?;
/// assert_eq!(mmu.page_stats().pages_1g, 1);
/// mmu.enable_dirty_logging(0, split::LogMode::Classic)?;
/// assert_eq!(mmu.page_stats().pages_4k, 1 << 18); // split eagerly
/// # Ok::<(), split::MmuError>(())
/// ```
pub struct TdpMmu {
    config: MmuConfig,
    lock: MmuLock,
    pool: Arc<PagePool<TablePage>>,
    header_slab: Arc<Slab<TableHeader>>,
    root: Page<TablePage>,
    /// A TD's direct tree, for its shared memory.
    shared_root: Option<Page<TablePage>>,
    /// Memory attributes; read by faults and written under the write lock.
    attributes: RwLock<MemoryAttributes>,
    /// Attribute changes in progress: faults that find one retry.
    invalidations: AtomicU64,
    /// Bumped at the end of each attribute change: a fault that read the
    /// attributes at an older value retries.
    invalidate_seq: AtomicU64,
    tables: Mutex<PageMap<mmu_cache::SlabBox<TableHeader>>>,
    /// Free entries of `tables` (capacity - len), read by faults without
    /// locking the map.
    table_headroom: std::sync::atomic::AtomicUsize,
    /// The slots, replaced whole by the rare writer; faults load the list
    /// without a lock or a shared write.
    slots: arc_swap::ArcSwap<Vec<Arc<Memslot>>>,
    slots_writer: Mutex<()>,
    split_caches: Mutex<VcpuCaches>,
    hooks: Arc<dyn ExternalPageTable>,
    external_tables: bool,
    external_pool: Arc<PagePool<ExternalTablePage>>,
    /// The largest leaf the hooks take.
    max_leaf: Level,
    torn_down: std::sync::atomic::AtomicBool,
    counters: Counters,
    /// Tells this MMU's entries in the per-vCPU walk caches from another's.
    id: u64,
    /// Bumped whenever a table is unlinked (under the write lock): a walk
    /// cache entry taken at an older generation may name a freed table.
    table_generation: AtomicU64,
}

/// The leaf table a vCPU's last access walked to: the software vCPU's
/// paging-structure cache. Valid for the MMU `mmu` while its table
/// generation is still `generation`, since a linked table stays linked
/// at its place until one is unlinked.
#[derive(Clone, Copy, Debug)]
struct WalkCache {
    mmu: u64,
    generation: u64,
    /// `gfn >> 9` of the 2 MiB region the table maps.
    region: u64,
    /// Whether the table is in a TD's shared tree.
    shared: bool,
    table_hpa: u64,
}

impl WalkCache {
    /// Matches no MMU.
    const EMPTY: Self = Self {
        mmu: 0,
        generation: 0,
        region: 0,
        shared: false,
        table_hpa: 0,
    };
}

/// Identifiers of MMUs; 0 is never given, so an empty walk cache matches
/// none.
static NEXT_MMU_ID: AtomicU64 = AtomicU64::new(1);

impl std::fmt::Debug for TdpMmu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TdpMmu")
            .field("config", &self.config)
            .field("stats", &self.page_stats())
            .field("tables", &self.live_tables())
            .finish()
    }
}

/// Borrows the 512 entries of the table at `hpa`.
///
/// # Safety
///
/// `hpa` must be the address of a table page of this MMU that stays linked
/// (or owned by the caller) for `'a`; callers hold the MMU lock, and tables
/// are freed only under the write lock.
unsafe fn entries<'a>(hpa: u64) -> &'a [AtomicU64; 512] {
    // SAFETY: guaranteed by the caller; a table page is 4 KiB, page aligned,
    // and only ever accessed atomically while linked.
    unsafe { &*(hpa as *const [AtomicU64; 512]) }
}

fn load(table: &[AtomicU64; 512], index: usize) -> Entry {
    Entry::from_bits(table[index].load(Ordering::Acquire))
}

fn cas(table: &[AtomicU64; 512], index: usize, old: Entry, new: Entry) -> bool {
    table[index]
        .compare_exchange(old.bits(), new.bits(), Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
}

/// Makes the next write to a leaf's memory visible to dirty logging: clears
/// the dirty bit, and write-protects a huge leaf (whose dirty bit could not
/// say which 4K page was written). A compare-and-exchange loop, so that it
/// runs beside faults and accesses under the read lock; an entry that
/// stops being this leaf (zapped, frozen, split) is left to its new owner.
fn protect_leaf(table: &[AtomicU64; 512], index: usize, level: Level, mut entry: Entry) {
    let clear = if level > Level::L4K {
        DIRTY | WRITE
    } else {
        DIRTY
    };
    loop {
        let protected = entry.without(clear);
        if protected == entry {
            return;
        }
        match table[index].compare_exchange(
            entry.bits(),
            protected.bits(),
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => return,
            Err(now) => {
                entry = Entry::from_bits(now);
                if !entry.is_leaf(level) {
                    return;
                }
            }
        }
    }
}

/// Which tree of the MMU: the main one (mirrored by the hooks, if any; the
/// only one of a VM that is not a TD) or a TD's direct tree of shared
/// memory, which the hooks never see.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Tree {
    /// The main tree.
    Main,
    /// A TD's shared tree.
    Shared,
}

/// The hooks of a tree no external side mirrors.
static NO_EXTERNAL: NoExternal = NoExternal;

/// Where a fault's frame comes from.
#[derive(Clone, Copy, Debug)]
pub(super) enum FrameSource {
    /// The memslot's host frames.
    Slot,
    /// The slot's private memory: the frame of the faulting gfn and the
    /// largest leaf its page allows there.
    Private {
        /// The frame of the faulting gfn.
        pfn: Pfn,
        /// The largest leaf the page's order and alignment allow.
        max_level: Level,
    },
}

/// One step of a [`TdpMmu::walk`]: the entry for the walked frame in a table
/// at `level` (entries of `level` map `level.entry_pages()` frames).
pub(super) struct WalkStep<'a> {
    /// The table.
    pub(super) table: &'a [AtomicU64; 512],
    /// The entry's index in it.
    pub(super) index: usize,
    /// The table's level.
    pub(super) level: Level,
    /// The entry, as loaded.
    pub(super) entry: Entry,
}

/// What a walk does after a step.
pub(super) enum Next<T> {
    /// Go on into the table at this address, one level down.
    Descend(u64),
    /// Stop with this result.
    Stop(T),
}

fn stat_index(level: Level) -> usize {
    usize::from(level.get() - 1)
}

impl TdpMmu {
    /// An MMU whose tables come from `pool`, without external hooks.
    pub fn new(pool: Arc<PagePool<TablePage>>, config: MmuConfig) -> Result<Self, MmuError> {
        Self::with_hooks(pool, config, Arc::new(NoExternal))
    }

    /// An MMU that mirrors its tree into an external page table.
    pub fn with_hooks(
        pool: Arc<PagePool<TablePage>>,
        config: MmuConfig,
        hooks: Arc<dyn ExternalPageTable>,
    ) -> Result<Self, MmuError> {
        if !(4..=5).contains(&config.levels) {
            return Err(MmuError::Config("levels must be 4 or 5"));
        }
        if config.split_cache_capacity == 0 {
            return Err(MmuError::Config("split_cache_capacity must be at least 1"));
        }
        if config.vcpu_cache_capacity < 5 {
            return Err(MmuError::Config(
                "vcpu_cache_capacity must be at least 5 (one 5-level walk)",
            ));
        }
        if let VmType::Td { shared_bit } = config.vm_type
            && shared_bit != VmType::td_shared_bit(config.levels)
        {
            return Err(MmuError::Config(
                "a TD's shared bit is the top GPA bit: 47 with 4 levels, 51 with 5",
            ));
        }
        let new_root = || -> Result<Page<TablePage>, MmuError> {
            let mut root: Page<TablePage> =
                pool.get().map_err(|err| CacheError::EmptyFallbackFailed {
                    cache: "root",
                    source: Box::new(err),
                })?;
            root.fill(ept::NON_PRESENT);
            Ok(root)
        };
        let root = new_root()?;
        let shared_root = match config.vm_type {
            VmType::Td { .. } => Some(new_root()?),
            _ => None,
        };
        let header_slab = Slab::new(pool.for_kind(), None)?;
        let external_tables = hooks.external_tables();
        let max_leaf = hooks.max_leaf_level();
        let external_pool = hooks.external_pool().unwrap_or_else(|| pool.for_kind());
        let split_caches = VcpuCaches {
            // Split tables are filled with the children before they are
            // linked, so they skip the non-present fill.
            tables: PageCache::new(pool.clone()).named("split-tables"),
            headers: ObjectCache::new(header_slab.clone()).named("split-headers"),
            external: PageCache::new(external_pool.clone()).named("split-external"),
            // The splitter is no vCPU: the hooks use their own split caches.
            hooks: None,
            walk: WalkCache::EMPTY,
        };
        Ok(Self {
            config,
            lock: MmuLock::default(),
            pool,
            header_slab,
            root,
            shared_root,
            attributes: RwLock::new(MemoryAttributes::new(MemoryAttribute::Shared)),
            invalidations: AtomicU64::new(0),
            invalidate_seq: AtomicU64::new(0),
            tables: Mutex::new(PageMap::default()),
            table_headroom: std::sync::atomic::AtomicUsize::new(0),
            slots: arc_swap::ArcSwap::from_pointee(Vec::new()),
            slots_writer: Mutex::new(()),
            split_caches: Mutex::new(split_caches),
            hooks,
            external_tables,
            external_pool,
            max_leaf,
            torn_down: std::sync::atomic::AtomicBool::new(false),
            counters: Counters::default(),
            id: NEXT_MMU_ID.fetch_add(1, Ordering::Relaxed),
            table_generation: AtomicU64::new(0),
        })
    }

    /// A fresh vCPU context: its caches, the hooks' state of it, and an
    /// empty walk cache.
    pub fn new_vcpu_caches(&self) -> VcpuCaches {
        VcpuCaches {
            tables: PageCache::new(self.pool.clone())
                .with_init_value(ept::NON_PRESENT)
                .named("vcpu-tables"),
            headers: ObjectCache::new(self.header_slab.clone()).named("vcpu-headers"),
            external: PageCache::new(self.external_pool.clone()).named("vcpu-external"),
            hooks: self.hooks.new_vcpu_state(),
            walk: WalkCache::EMPTY,
        }
    }

    /// Whether the MMU provides an external page for every table.
    pub fn has_external_tables(&self) -> bool {
        self.external_tables
    }

    /// The configuration.
    pub fn config(&self) -> MmuConfig {
        self.config
    }

    /// The root table's address (the EPT pointer's frame).
    pub fn root_hpa(&self) -> Hpa {
        Hpa(self.root_addr())
    }

    /// The root of a TD's shared tree (its second EPT pointer).
    pub fn shared_root_hpa(&self) -> Option<Hpa> {
        self.shared_root
            .as_ref()
            .map(|root| Hpa(root.addr() as u64))
    }

    /// The root table's address as a number, for walks.
    pub(super) fn root_addr(&self) -> u64 {
        self.root.addr() as u64
    }

    /// The root of `tree`, as a number.
    pub(super) fn tree_root(&self, tree: Tree) -> u64 {
        match tree {
            Tree::Main => self.root_addr(),
            Tree::Shared => self
                .shared_root
                .as_ref()
                .expect("only a TD has a shared tree")
                .addr() as u64,
        }
    }

    /// The MMU's trees: the main one, and a TD's shared one.
    pub(super) fn trees(&self) -> impl Iterator<Item = Tree> + use<> {
        std::iter::once(Tree::Main).chain(self.shared_root.is_some().then_some(Tree::Shared))
    }

    /// The hooks that mirror `tree` (none for a TD's shared tree).
    pub(super) fn hooks_of(&self, tree: Tree) -> &dyn ExternalPageTable {
        match tree {
            Tree::Main => &*self.hooks,
            Tree::Shared => &NO_EXTERNAL,
        }
    }

    /// Whether tables of `tree` carry an external page.
    pub(super) fn external_of(&self, tree: Tree) -> bool {
        tree == Tree::Main && self.external_tables
    }

    /// The largest leaf of `tree`.
    pub(super) fn max_leaf_of(&self, tree: Tree) -> Level {
        match tree {
            Tree::Main => self.max_leaf,
            Tree::Shared => Level::L1G,
        }
    }

    /// Where an address, as the guest used it, is mapped: a TD's shared
    /// accesses in the shared tree, at the frame without the shared bit;
    /// everything else in the main tree.
    pub(super) fn place(&self, gpa: Gpa) -> (Tree, Gfn) {
        match self.config.vm_type {
            VmType::Td { shared_bit } if gpa.0 & (1 << shared_bit) != 0 => {
                (Tree::Shared, Gpa(gpa.0 & !(1 << shared_bit)).gfn())
            }
            _ => (Tree::Main, gpa.gfn()),
        }
    }

    fn top_level(&self) -> Level {
        Level::new(self.config.levels).expect("validated at construction")
    }

    /// The one walk from the root towards `gfn`, which faults, accesses and
    /// splits share: `visit` sees the entry at each level and says whether
    /// to descend (into the entry's table, or a table it just linked) or to
    /// stop. Callers hold the lock, which keeps every table on the way
    /// linked.
    pub(super) fn walk<'a, T>(
        &'a self,
        tree: Tree,
        gfn: u64,
        mut visit: impl FnMut(WalkStep<'a>) -> Next<T>,
    ) -> T {
        let mut table_hpa = self.tree_root(tree);
        let mut level = self.top_level();
        loop {
            // SAFETY: the root, or a table the previous step found linked (or
            // linked itself) under the caller's lock, which keeps it alive.
            let table = unsafe { entries(table_hpa) };
            let index = level.index(gfn);
            let entry = load(table, index);
            match visit(WalkStep {
                table,
                index,
                level,
                entry,
            }) {
                Next::Stop(result) => return result,
                Next::Descend(hpa) => {
                    table_hpa = hpa;
                    level = level.below().expect("tables are above 4K");
                }
            }
        }
    }

    fn read_lock(&self) -> ReadGuard<'_> {
        self.lock.read()
    }

    fn write_lock(&self) -> WriteGuard<'_> {
        self.lock.write()
    }

    fn table_map(&self) -> MutexGuard<'_, PageMap<mmu_cache::SlabBox<TableHeader>>> {
        self.tables
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    // ----- memslots -------------------------------------------------------

    /// Adds a slot; it must not overlap another or reuse its id.
    pub fn add_memslot(&self, slot: Memslot) -> Result<Arc<Memslot>, MmuError> {
        let width = match self.config.vm_type {
            VmType::Td { shared_bit } => u32::from(shared_bit),
            _ => self.top_level().shift() + 9,
        };
        if slot.end_gfn().0 > 1 << (width - 12) {
            return Err(MmuError::AddressTooWide {
                gpa: slot.end_gfn().gpa(),
                levels: self.config.levels,
            });
        }
        // Writers of the slot list take this lock; readers (faults) load the
        // list without any lock or shared write.
        let _writer = self.slots_writer.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.slots.load_full();
        if let Some(other) = current.iter().find(|other| {
            other.id() == slot.id()
                || (slot.base_gfn() < other.end_gfn() && other.base_gfn() < slot.end_gfn())
        }) {
            return Err(MemslotError::Overlap {
                id: slot.id(),
                other: other.id(),
            }
            .into());
        }
        let slot = Arc::new(slot);
        let mut slots = current.as_ref().clone();
        slots.push(slot.clone());
        self.slots.store(Arc::new(slots));
        Ok(slot)
    }

    /// Removes a slot and zaps its mappings.
    pub fn remove_memslot(&self, id: u32) -> Result<(), MmuError> {
        let slot = self.slot(id)?;
        self.zap_range(slot.base_gfn(), slot.end_gfn())?;
        let _writer = self.slots_writer.lock().unwrap_or_else(|p| p.into_inner());
        let mut slots = self.slots.load_full().as_ref().clone();
        slots.retain(|s| s.id() != id);
        self.slots.store(Arc::new(slots));
        Ok(())
    }

    /// The slot with this id.
    pub fn slot(&self, id: u32) -> Result<Arc<Memslot>, MmuError> {
        self.slots
            .load()
            .iter()
            .find(|slot| slot.id() == id)
            .cloned()
            .ok_or(MmuError::Memslot(MemslotError::NoSuchSlot { id }))
    }

    fn slot_for_gfn(&self, gfn: Gfn) -> Option<Arc<Memslot>> {
        self.slots
            .load()
            .iter()
            .find(|slot| slot.contains(gfn))
            .cloned()
    }

    /// Makes room for `tables` more table headers in the map before the
    /// MMU lock is taken, so that linking under it never grows the map.
    /// The common case reads one counter: the map is locked only when its
    /// headroom falls below what every thread could need at once.
    pub(super) fn reserve_tables(&self, tables: usize) {
        // This caller's tables, and a full walk for each thread that may be
        // linking at the same time.
        let wanted = tables + TABLES_PER_FAULT * RESERVE_THREADS;
        if self.table_headroom.load(Ordering::Relaxed) >= wanted {
            return;
        }
        let mut map = self.table_map();
        map.reserve(wanted);
        self.table_headroom
            .store(map.capacity() - map.len(), Ordering::Relaxed);
    }

    /// Records the header of the table at `hpa`.
    pub(super) fn insert_table(&self, hpa: u64, header: mmu_cache::SlabBox<TableHeader>) {
        let mut map = self.table_map();
        map.insert(hpa, header);
        self.table_headroom
            .store(map.capacity() - map.len(), Ordering::Relaxed);
    }

    /// Takes the header of the table at `hpa` out of the map.
    pub(super) fn remove_table(&self, hpa: u64) -> Option<mmu_cache::SlabBox<TableHeader>> {
        let mut map = self.table_map();
        let header = map.remove(&hpa);
        self.table_headroom
            .store(map.capacity() - map.len(), Ordering::Relaxed);
        header
    }

    // ----- translation and stats -----------------------------------------

    /// Translates `gpa` through the tree, without side effects.
    pub fn translate(&self, gpa: Gpa) -> Option<Translation> {
        let (tree, gfn) = self.place(gpa);
        let gfn = gfn.0;
        let _guard = self.read_lock();
        let (_, _, level, entry) = self.find_leaf(tree, gfn)?;
        let t = self.translation(entry, level, gfn);
        Some(Translation {
            hpa: Hpa(t.hpa.0 | gpa.page_offset()),
            ..t
        })
    }

    /// Leaf counts kept incrementally.
    pub fn page_stats(&self) -> PageStats {
        PageStats {
            pages_4k: self.counters.leaves(Level::L4K),
            pages_2m: self.counters.leaves(Level::L2M),
            pages_1g: self.counters.leaves(Level::L1G),
        }
    }

    /// Leaf and table counts from a walk of the whole tree; the leaf counts
    /// must equal [`page_stats`](Self::page_stats).
    pub fn recount(&self) -> (PageStats, usize) {
        let _guard = self.write_lock();
        let mut stats = PageStats::default();
        let mut tables = 0;
        for tree in self.trees() {
            self.walk_all(
                self.tree_root(tree),
                self.top_level(),
                &mut |entry, level| {
                    if entry.is_leaf(level) {
                        match level.get() {
                            1 => stats.pages_4k += 1,
                            2 => stats.pages_2m += 1,
                            _ => stats.pages_1g += 1,
                        }
                    } else {
                        tables += 1;
                    }
                },
            );
        }
        (stats, tables)
    }

    fn walk_all(&self, table_hpa: u64, level: Level, visit: &mut impl FnMut(Entry, Level)) {
        // SAFETY: callers hold the lock; the table is linked.
        let table = unsafe { entries(table_hpa) };
        for index in 0..512 {
            let entry = load(table, index);
            if !entry.is_present() {
                continue;
            }
            visit(entry, level);
            if !entry.is_leaf(level) {
                self.walk_all(
                    entry.addr(level),
                    level.below().expect("tables above 4K"),
                    visit,
                );
            }
        }
    }

    /// Pages this MMU holds from its pool: the root, linked tables, the
    /// split caches and the header slab's pages (vCPU caches not included).
    pub fn pages_held(&self) -> usize {
        let split = self.split_caches.lock().unwrap_or_else(|p| p.into_inner());
        let roots = 1 + usize::from(self.shared_root.is_some());
        roots + self.live_tables() + split.tables.nr_free() + self.header_slab.pages()
    }

    /// Tables linked below the root.
    pub fn live_tables(&self) -> usize {
        self.table_map().len()
    }

    /// Work counters.
    pub fn counters(&self) -> MmuCounters {
        let c = &self.counters;
        MmuCounters {
            faults: c.get(Count::Faults),
            retries: c.get(Count::Retries),
            splits: c.get(Count::Splits),
            lazy_splits: c.get(Count::LazySplits),
            split_fallbacks: c.get(Count::SplitFallbacks),
            lock_drops: c.get(Count::LockDrops),
            tables_linked: c.get(Count::TablesLinked),
            tables_freed: c.get(Count::TablesFreed),
            external_leaked: c.get(Count::ExternalLeaked),
            memory_faults: c.get(Count::MemoryFaults),
            conversions: c.get(Count::Conversions),
        }
    }
}

/// What [`TdpMmu::teardown`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TeardownReport {
    /// Leaves taken back.
    pub leaves: u64,
    /// Leaves whose hook failed (cleared from the tree all the same).
    pub leaf_errors: u64,
    /// Tables freed.
    pub tables: u64,
    /// External pages leaked because the hooks could not take them back.
    pub external_leaked: u64,
}

impl Drop for TdpMmu {
    fn drop(&mut self) {
        if self.external_tables
            && !self.torn_down.load(Ordering::Acquire)
            && let Err(err) = self.teardown()
        {
            tracing::warn!(%err, "teardown of a mirrored MMU failed; its external pages are leaked");
            let tables = std::mem::take(self.tables.get_mut().unwrap_or_else(|p| p.into_inner()));
            for (_, mut header) in tables {
                if let Some(external) = header.external.take() {
                    let _ = external.into_raw();
                    self.counters.add(Count::ExternalLeaked, 1);
                }
            }
        }
        // Tables go back to their pool through their headers.
        let tables = std::mem::take(self.tables.get_mut().unwrap_or_else(|p| p.into_inner()));
        drop(tables);
    }
}
