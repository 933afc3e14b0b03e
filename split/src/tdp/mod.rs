//! The TDP MMU: one EPT tree per VM, faulted in by vCPUs under a shared
//! lock with compare-and-exchange, with dirty logging and eager splitting.

pub use crate::translation::{Access, PageStats, Translation};
mod access;
mod attributes;
mod config;
mod dirty;
mod error;
mod fault;
mod merge;
mod split;
mod stats;
mod vcpu;
mod walk;
mod zap;
pub use attributes::AttributeChange;
pub use config::{MmuConfig, VmType};
pub use error::MmuError;
pub use stats::MmuCounters;
pub use vcpu::{TABLES_PER_FAULT, VcpuCaches};
pub use zap::TeardownReport;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use mmu_cache::{CacheError, ObjectCache, Page, PageCache, PageKind, PagePool, Slab};

use crate::addr::{Gfn, Gpa, Hpa};
use crate::attributes::{MemoryAttribute, MemoryAttributes};
use crate::ept::{self, Level};
use crate::hooks::{ExternalPageTable, ExternalTablePage, NoExternal, TableRef};
use crate::lock::{MmuLock, ReadGuard, WriteGuard};
use crate::memslot::{Memslot, MemslotError};
use crate::page_map::PageMap;

use self::stats::{Count, Counters};
use self::vcpu::{RESERVE_THREADS, WalkCache};

/// Pages that hold EPT tables.
#[derive(Debug)]
pub enum TablePage {}
impl PageKind for TablePage {}

/// The value an entry holds while an external hook runs on it.
const FROZEN: u64 = ept::NON_PRESENT | 0x5a0;

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

/// The TDP MMU of one VM.
///
/// ```
/// use split::{AccessKind, Gfn, Gpa, Memslot, MmuConfig, Pfn, TdpMmu};
/// use mmu_cache::{PagePool, alloc::ChunkAllocator};
///
/// let mmu = TdpMmu::new(PagePool::new(ChunkAllocator::anonymous()), MmuConfig::default())?;
/// mmu.add_memslot(Memslot::new(0, Gfn(0), 1 << 18, Pfn(1 << 18))?)?; // 1 GiB at gpa 0
/// let mut caches = mmu.new_vcpu_caches();
/// mmu.fault(&mut caches, Gpa(0x1234_5000), AccessKind::Write)?;
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
    /// Whether the hooks mirror the main tree (no merges there).
    mirrored: bool,
    external_pool: Arc<PagePool<ExternalTablePage>>,
    /// The largest leaf the hooks take.
    max_leaf: Level,
    torn_down: std::sync::atomic::AtomicBool,
    counters: Counters,
    /// Tells this MMU's entries in the per-vCPU walk caches from another's.
    id: u64,
    /// Bumped whenever a table is unlinked: a walk cache entry taken at an
    /// older generation may name an unlinked table (still allocated while
    /// any shared holder may see it, see `retired`).
    table_generation: AtomicU64,
    /// Tables a fault unlinked under the shared lock (a huge leaf put over
    /// them): a stack threaded through each table's first entry, freed
    /// when the write lock is next taken, when no walker can be inside one
    /// (the grace period the kernel gets from RCU). 0: empty.
    retired: AtomicU64,
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
            return Err(MmuError::Levels {
                levels: config.levels,
            });
        }
        if config.split_cache_capacity == 0 {
            return Err(MmuError::CacheCapacity {
                cache: "split_cache_capacity",
                capacity: 0,
                min: 1,
            });
        }
        if config.vcpu_cache_capacity < TABLES_PER_FAULT {
            // One 5-level walk.
            return Err(MmuError::CacheCapacity {
                cache: "vcpu_cache_capacity",
                capacity: config.vcpu_cache_capacity,
                min: TABLES_PER_FAULT,
            });
        }
        if let VmType::Td { shared_bit } = config.vm_type
            && shared_bit != VmType::td_shared_bit(config.levels)
        {
            return Err(MmuError::SharedBit {
                shared_bit,
                expected: VmType::td_shared_bit(config.levels),
                levels: config.levels,
            });
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
        let mirrored = hooks.mirrors();
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
            mirrored,
            external_pool,
            max_leaf,
            torn_down: std::sync::atomic::AtomicBool::new(false),
            counters: Counters::default(),
            id: NEXT_MMU_ID.fetch_add(1, Ordering::Relaxed),
            table_generation: AtomicU64::new(0),
            retired: AtomicU64::new(0),
        })
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
    fn read_lock(&self) -> ReadGuard<'_> {
        self.lock.read()
    }

    /// The write lock; tables retired under the shared lock are freed
    /// first, now that no walker can be inside one.
    fn write_lock(&self) -> WriteGuard<'_> {
        let guard = self.lock.write();
        self.free_retired_tables();
        guard
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
