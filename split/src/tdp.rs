//! The TDP MMU: one EPT tree per VM, faulted in by vCPUs under a shared
//! lock with compare-and-exchange, with dirty logging and eager splitting.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use mmu_cache::alloc::NoAllocSection;
use mmu_cache::{CacheError, ObjectCache, Page, PageCache, PageKind, PagePool, Slab, SlabError};

use crate::ept::{self, ACCESSED, DIRTY, Entry, Level, MemType, WRITE};
use crate::hooks::{ExternalPageTable, ExternalTablePage, HookError, NoExternal, TableRef, Topup};
use crate::lock::{MmuLock, ReadGuard, WriteGuard};
use crate::memslot::{ClearedWord, LogMode, Memslot, MemslotError};

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
        gpa: u64,
    },
    /// The address is beyond what the paging depth translates.
    #[error("gpa {gpa:#x} is beyond the {levels}-level address space")]
    AddressTooWide {
        /// The guest physical address.
        gpa: u64,
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
    /// The configuration is invalid.
    #[error("invalid MMU configuration: {0}")]
    Config(&'static str),
}

/// The bookkeeping of one table: where it sits and the page that holds it
/// (the kernel's `struct kvm_mmu_page`).
#[derive(Debug, Default)]
pub struct TableHeader {
    gfn: u64,
    level: u8,
    page: Option<Page<TablePage>>,
    external: Option<Page<ExternalTablePage>>,
}

impl TableHeader {
    /// First guest frame the table covers.
    pub fn gfn(&self) -> u64 {
        self.gfn
    }

    /// The level of the table's entries.
    pub fn level(&self) -> Level {
        Level::new(self.level).expect("headers of linked tables have a level")
    }

    /// The address of the table page, once linked.
    pub fn table_hpa(&self) -> Option<u64> {
        self.page.as_ref().map(|page| page.addr() as u64)
    }

    /// The address of the external page that mirrors the table, if any.
    pub fn external_hpa(&self) -> Option<u64> {
        self.external.as_ref().map(|page| page.addr() as u64)
    }

    fn table_ref(&self) -> TableRef {
        TableRef {
            hpa: self.table_hpa().unwrap_or(0),
            external: self.external_hpa(),
        }
    }
}

mmu_cache::cache_set! {
    /// What one fault needs: enough for every level of a 5-level walk.
    #[derive(Debug)]
    pub struct VcpuCaches {
        /// Table pages, filled with the non-present value.
        pub tables: PageCache<TablePage> => [min 5],
        /// Table headers.
        pub headers: ObjectCache<TableHeader> => [min 5],
        /// External table pages, topped up only when the hooks ask for them.
        pub external: PageCache<ExternalTablePage> => [min 0],
    }
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
}

impl Default for MmuConfig {
    fn default() -> Self {
        Self {
            levels: 4,
            eager_split: true,
            split_cache_capacity: 256,
            memtype: MemType::Wb,
            vcpu_cache_capacity: mmu_cache::DEFAULT_CAPACITY,
        }
    }
}

/// Leaf counts, as `KVM_GET_STATS` reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageStats {
    /// 4K leaves.
    pub pages_4k: u64,
    /// 2M leaves.
    pub pages_2m: u64,
    /// 1G leaves.
    pub pages_1g: u64,
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
}

#[derive(Default)]
struct Counters {
    faults: AtomicU64,
    retries: AtomicU64,
    splits: AtomicU64,
    lazy_splits: AtomicU64,
    split_fallbacks: AtomicU64,
    lock_drops: AtomicU64,
    tables_linked: AtomicU64,
    tables_freed: AtomicU64,
    external_leaked: AtomicU64,
}

/// What a translation found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// The host physical address of the guest address.
    pub hpa: u64,
    /// The leaf's R/W/X bits.
    pub perms: u64,
    /// The leaf's memory type field.
    pub memtype: u8,
    /// The leaf's level.
    pub level: Level,
    /// The leaf itself.
    pub entry: Entry,
}

/// What a software vCPU access found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Served by the tree; the host physical address.
    Hit(u64),
    /// Needs a fault: not mapped, or a write to a write-protected leaf.
    Miss,
}

/// The TDP MMU of one VM.
///
/// ```
/// use split::{Memslot, MmuConfig, TdpMmu};
/// use mmu_cache::{PagePool, alloc::ChunkAllocator};
///
/// let mmu = TdpMmu::new(PagePool::new(ChunkAllocator::anonymous()), MmuConfig::default())?;
/// mmu.add_memslot(Memslot::new(0, 0, 1 << 18, 1 << 18)?)?; // 1 GiB at gpa 0
/// let mut caches = mmu.new_vcpu_caches();
/// mmu.fault(&mut caches, 0x1234_5000, true)?;
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
    tables: Mutex<HashMap<u64, mmu_cache::SlabBox<TableHeader>>>,
    slots: RwLock<Vec<Arc<Memslot>>>,
    split_caches: Mutex<VcpuCaches>,
    hooks: Box<dyn ExternalPageTable>,
    external_tables: bool,
    external_pool: Arc<PagePool<ExternalTablePage>>,
    /// The largest leaf the hooks take.
    max_leaf: Level,
    torn_down: std::sync::atomic::AtomicBool,
    stats: [AtomicU64; 3],
    counters: Counters,
    /// Tells this MMU's entries in the per-thread walk caches from another's.
    id: u64,
    /// Bumped whenever a table is unlinked (under the write lock): a walk
    /// cache entry taken at an older generation may name a freed table.
    table_generation: AtomicU64,
}

/// The leaf table a thread's last access walked to: the software vCPU's
/// paging-structure cache. Valid for the MMU `mmu` while its table
/// generation is still `generation`, since a linked table stays linked
/// at its place until one is unlinked.
#[derive(Clone, Copy)]
struct WalkCache {
    mmu: u64,
    generation: u64,
    /// `gfn >> 9` of the 2 MiB region the table maps.
    region: u64,
    table_hpa: u64,
}

thread_local! {
    static LAST_LEAF_TABLE: std::cell::Cell<WalkCache> = const {
        std::cell::Cell::new(WalkCache {
            mmu: 0,
            generation: 0,
            region: 0,
            table_hpa: 0,
        })
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

fn stat_index(level: Level) -> usize {
    usize::from(level.get() - 1)
}

impl TdpMmu {
    /// An MMU whose tables come from `pool`, without external hooks.
    pub fn new(pool: Arc<PagePool<TablePage>>, config: MmuConfig) -> Result<Self, MmuError> {
        Self::with_hooks(pool, config, Box::new(NoExternal))
    }

    /// An MMU that mirrors its tree into an external page table.
    pub fn with_hooks(
        pool: Arc<PagePool<TablePage>>,
        config: MmuConfig,
        hooks: Box<dyn ExternalPageTable>,
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
        let mut root: Page<TablePage> =
            pool.get().map_err(|err| CacheError::EmptyFallbackFailed {
                cache: "root",
                source: Box::new(err),
            })?;
        root.fill(ept::NON_PRESENT);
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
        };
        Ok(Self {
            config,
            lock: MmuLock::default(),
            pool,
            header_slab,
            root,
            tables: Mutex::new(HashMap::new()),
            slots: RwLock::new(Vec::new()),
            split_caches: Mutex::new(split_caches),
            hooks,
            external_tables,
            external_pool,
            max_leaf,
            torn_down: std::sync::atomic::AtomicBool::new(false),
            stats: Default::default(),
            counters: Counters::default(),
            id: NEXT_MMU_ID.fetch_add(1, Ordering::Relaxed),
            table_generation: AtomicU64::new(0),
        })
    }

    /// A fresh cache set for one vCPU.
    pub fn new_vcpu_caches(&self) -> VcpuCaches {
        VcpuCaches {
            tables: PageCache::new(self.pool.clone())
                .with_init_value(ept::NON_PRESENT)
                .named("vcpu-tables"),
            headers: ObjectCache::new(self.header_slab.clone()).named("vcpu-headers"),
            external: PageCache::new(self.external_pool.clone()).named("vcpu-external"),
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
    pub fn root_hpa(&self) -> u64 {
        self.root.addr() as u64
    }

    fn top_level(&self) -> Level {
        Level::new(self.config.levels).expect("validated at construction")
    }

    fn read_lock(&self) -> ReadGuard<'_> {
        self.lock.read()
    }

    fn write_lock(&self) -> WriteGuard<'_> {
        self.lock.write()
    }

    fn table_map(&self) -> MutexGuard<'_, HashMap<u64, mmu_cache::SlabBox<TableHeader>>> {
        self.tables
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    // ----- memslots -------------------------------------------------------

    /// Adds a slot; it must not overlap another or reuse its id.
    pub fn add_memslot(&self, slot: Memslot) -> Result<Arc<Memslot>, MmuError> {
        if slot.end_gfn() > 1 << (self.top_level().shift() + 9 - 12) {
            return Err(MmuError::AddressTooWide {
                gpa: slot.end_gfn() << 12,
                levels: self.config.levels,
            });
        }
        let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
        if let Some(other) = slots.iter().find(|other| {
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
        slots.push(slot.clone());
        Ok(slot)
    }

    /// Removes a slot and zaps its mappings.
    pub fn remove_memslot(&self, id: u32) -> Result<(), MmuError> {
        let slot = self.slot(id)?;
        self.zap_range(slot.base_gfn(), slot.end_gfn())?;
        self.slots
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|s| s.id() != id);
        Ok(())
    }

    /// The slot with this id.
    pub fn slot(&self, id: u32) -> Result<Arc<Memslot>, MmuError> {
        self.slots
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|slot| slot.id() == id)
            .cloned()
            .ok_or(MmuError::Memslot(MemslotError::NoSuchSlot { id }))
    }

    fn slot_for_gfn(&self, gfn: u64) -> Option<Arc<Memslot>> {
        self.slots
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|slot| slot.contains(gfn))
            .cloned()
    }

    // ----- faults ---------------------------------------------------------

    /// Handles a fault at `gpa`: tops up `caches` (outside the lock), then
    /// maps the frame under the shared lock, with the largest leaf the slot
    /// allows unless dirty logging forbids huge ones.
    pub fn fault(
        &self,
        caches: &mut VcpuCaches,
        gpa: u64,
        write: bool,
    ) -> Result<Translation, MmuError> {
        let gfn = gpa >> 12;
        if gpa >> (self.top_level().shift() + 9) != 0 {
            return Err(MmuError::AddressTooWide {
                gpa,
                levels: self.config.levels,
            });
        }
        let slot = self.slot_for_gfn(gfn).ok_or(MmuError::NoSlot { gpa })?;
        self.counters.faults.fetch_add(1, Ordering::Relaxed);
        let capacity = self.config.vcpu_cache_capacity;
        loop {
            caches
                .tables
                .topup_with_capacity(capacity, 5)
                .map_err(|err| CacheError::in_set("tables", err))?;
            caches
                .headers
                .topup_with_capacity(capacity, 5)
                .map_err(|err| CacheError::in_set("headers", err))?;
            if self.external_tables {
                caches
                    .external
                    .topup_with_capacity(capacity, usize::from(self.config.levels))
                    .map_err(|err| CacheError::in_set("external", err))?;
            }
            self.hooks.topup(Topup::Fault {
                levels: self.config.levels,
            })?;
            self.table_map().reserve(self.config.levels as usize);
            let _guard = self.read_lock();
            let _no_alloc = NoAllocSection::enter();
            match self.map(caches, &slot, gfn, write)? {
                Some(translation) => {
                    return Ok(Translation {
                        hpa: translation.hpa | (gpa & 0xfff),
                        ..translation
                    });
                }
                None => {
                    self.counters.retries.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// One attempt at mapping `gfn`; `None` means a race was lost: retry.
    fn map(
        &self,
        caches: &mut VcpuCaches,
        slot: &Memslot,
        gfn: u64,
        write: bool,
    ) -> Result<Option<Translation>, MmuError> {
        let goal = if slot.logging() {
            Level::L4K
        } else {
            slot.max_level(gfn).min(self.max_leaf)
        };
        let mut table_hpa = self.root_hpa();
        let mut level = self.top_level();
        loop {
            // SAFETY: `table_hpa` is the root or a table linked below it, and
            // the read lock keeps linked tables alive.
            let table = unsafe { entries(table_hpa) };
            let index = level.index(gfn);
            let entry = load(table, index);
            if entry.bits() == FROZEN {
                return Ok(None);
            }
            let at_goal = level <= goal;
            // A leaf that already allows the access makes the fault spurious:
            // keep it. Only a write to a write-protected huge leaf above the
            // goal replaces it (the lazy split).
            let usable = !write || entry.has(WRITE);
            if entry.is_leaf(level) && (at_goal || !entry.is_huge_leaf(level) || usable) {
                return Ok(self.touch_leaf(table, index, level, entry, gfn, write));
            }
            if entry.is_present() && !entry.is_leaf(level) {
                // A table, above the goal or where a huge leaf could go (left
                // by dirty logging): map inside it.
                table_hpa = entry.addr(level);
                level = level.below().expect("tables are above 4K");
                continue;
            }
            if at_goal {
                return self.install_leaf(table, index, level, slot, gfn, write);
            }
            // Above the goal: descend, installing a table where needed. A
            // write-protected huge leaf in the way is split into a full table
            // of its 512 children (the kernel's `tdp_mmu_split_huge_page` in
            // `kvm_tdp_mmu_map`), so its other mappings stay.
            let linked = if entry.is_huge_leaf(level) {
                let base_gfn = gfn & !(level.entry_pages() - 1);
                let split = self.split_leaf(caches, table, index, level, entry, base_gfn, false)?;
                if split.is_some() {
                    self.counters.lazy_splits.fetch_add(1, Ordering::Relaxed);
                }
                split
            } else {
                self.link_new_table(caches, table, index, level, gfn)?
            };
            let Some(new_hpa) = linked else {
                return Ok(None);
            };
            table_hpa = new_hpa;
            level = level.below().expect("the goal is at or above 4K");
        }
    }

    /// A present leaf was found: mark it accessed (and dirty on write), or
    /// make a write-protected one writable. Returns the translation.
    fn touch_leaf(
        &self,
        table: &[AtomicU64; 512],
        index: usize,
        level: Level,
        entry: Entry,
        gfn: u64,
        write: bool,
    ) -> Option<Translation> {
        let wanted = if write {
            entry.with(WRITE | ACCESSED | DIRTY)
        } else {
            entry.with(ACCESSED)
        };
        if wanted != entry && !cas(table, index, entry, wanted) {
            return None;
        }
        Some(self.translation(wanted, level, gfn))
    }

    fn translation(&self, leaf: Entry, level: Level, gfn: u64) -> Translation {
        let offset_pages = gfn & (level.entry_pages() - 1);
        Translation {
            hpa: leaf.addr(level) + (offset_pages << 12),
            perms: leaf.perms(),
            memtype: leaf.memtype_bits(),
            level,
            entry: leaf,
        }
    }

    /// Installs a leaf in the non-present `table[index]`; `None` on a lost race.
    fn install_leaf(
        &self,
        table: &[AtomicU64; 512],
        index: usize,
        level: Level,
        slot: &Memslot,
        gfn: u64,
        write: bool,
    ) -> Result<Option<Translation>, MmuError> {
        let base_gfn = gfn & !(level.entry_pages() - 1);
        let mut leaf = Entry::leaf(
            level,
            slot.host_pfn(base_gfn) << 12,
            ept::RWX,
            self.config.memtype,
        )?
        .with(ACCESSED);
        if write {
            leaf = leaf.with(DIRTY);
        }
        let old = Entry::NON_PRESENT;
        if !cas(table, index, old, Entry::from_bits(FROZEN)) {
            return Ok(None);
        }
        if let Err(err) = self.hooks.set_leaf(base_gfn, level, leaf) {
            table[index].store(old.bits(), Ordering::Release);
            return match err {
                HookError::Busy { .. } => Ok(None),
                refused => Err(refused.into()),
            };
        }
        table[index].store(leaf.bits(), Ordering::Release);
        self.stats[stat_index(level)].fetch_add(1, Ordering::Relaxed);
        Ok(Some(self.translation(leaf, level, gfn)))
    }

    /// Links a new empty table at the non-present `table[index]` (level
    /// `level`). Returns the new table's address, or `None` on a lost race.
    fn link_new_table(
        &self,
        caches: &mut VcpuCaches,
        table: &[AtomicU64; 512],
        index: usize,
        level: Level,
        gfn: u64,
    ) -> Result<Option<u64>, MmuError> {
        let old = Entry::NON_PRESENT;
        let base_gfn = gfn & !(level.entry_pages() - 1);
        let below = level.below().expect("tables live above 4K");
        let page = caches.tables.alloc()?;
        let external = if self.external_tables {
            Some(caches.external.alloc()?)
        } else {
            None
        };
        let hpa = page.addr() as u64;
        let table_ref = TableRef {
            hpa,
            external: external.as_ref().map(|p| p.addr() as u64),
        };
        let give_back =
            |caches: &mut VcpuCaches, page, external: Option<Page<ExternalTablePage>>| {
                caches.tables.free(page);
                if let Some(external) = external {
                    caches.external.free(external);
                }
            };
        if !cas(table, index, old, Entry::from_bits(FROZEN)) {
            give_back(caches, page, external);
            return Ok(None);
        }
        if let Err(err) = self.hooks.link_table(base_gfn, below, table_ref) {
            table[index].store(old.bits(), Ordering::Release);
            give_back(caches, page, external);
            return match err {
                HookError::Busy { .. } => Ok(None),
                refused => Err(refused.into()),
            };
        }
        let mut header = caches.headers.alloc()?;
        *header = TableHeader {
            gfn: base_gfn,
            level: below.get(),
            page: Some(page),
            external,
        };
        self.table_map().insert(hpa, header);
        table[index].store(Entry::table(hpa).bits(), Ordering::Release);
        self.counters.tables_linked.fetch_add(1, Ordering::Relaxed);
        Ok(Some(hpa))
    }

    // ----- software vCPU accesses ----------------------------------------

    /// What the hardware walker does for a guest access: under the shared
    /// lock, find the leaf and set its accessed (and on write dirty) bit;
    /// a missing leaf or a write-protected one is a miss, to be handled by
    /// [`fault`](Self::fault).
    pub fn access(&self, gpa: u64, write: bool) -> Access {
        let _guard = self.read_lock();
        let Some((table, index, level, entry)) = self.find_leaf_cached(gpa >> 12) else {
            return Access::Miss;
        };
        if write && !entry.has(WRITE) {
            return Access::Miss;
        }
        let bits = if write { ACCESSED | DIRTY } else { ACCESSED };
        if !entry.has(bits) {
            table[index].fetch_or(bits, Ordering::AcqRel);
        }
        Access::Hit(self.translation(entry, level, gpa >> 12).hpa | (gpa & 0xfff))
    }

    /// [`find_leaf`](Self::find_leaf) through this thread's walk cache: an
    /// access in the same 2 MiB region as the thread's last one reads the
    /// leaf table directly instead of walking from the root. Callers hold
    /// the lock.
    fn find_leaf_cached(&self, gfn: u64) -> Option<(&[AtomicU64; 512], usize, Level, Entry)> {
        // Stable while the caller holds the lock: it moves only under the
        // write lock.
        let generation = self.table_generation.load(Ordering::Relaxed);
        let cached = LAST_LEAF_TABLE.get();
        if cached.mmu == self.id && cached.generation == generation && cached.region == gfn >> 9 {
            // SAFETY: the table was linked for this region of this MMU when
            // it was cached, and no table has been unlinked since (the
            // generation is unchanged), so it is still linked there; the
            // caller's lock keeps it so.
            let table = unsafe { entries(cached.table_hpa) };
            let index = Level::L4K.index(gfn);
            let entry = load(table, index);
            return entry
                .is_present()
                .then_some((table, index, Level::L4K, entry));
        }
        let found = self.find_leaf(gfn)?;
        if found.2 == Level::L4K {
            LAST_LEAF_TABLE.set(WalkCache {
                mmu: self.id,
                generation,
                region: gfn >> 9,
                table_hpa: found.0.as_ptr() as u64,
            });
        }
        Some(found)
    }

    /// Walks to the present leaf that maps `gfn`; callers hold the lock.
    fn find_leaf(&self, gfn: u64) -> Option<(&[AtomicU64; 512], usize, Level, Entry)> {
        let mut table_hpa = self.root_hpa();
        let mut level = self.top_level();
        loop {
            // SAFETY: the root or a linked table; the caller's lock keeps it alive.
            let table = unsafe { entries(table_hpa) };
            let index = level.index(gfn);
            let entry = load(table, index);
            if !entry.is_present() {
                return None;
            }
            if entry.is_leaf(level) {
                return Some((table, index, level, entry));
            }
            table_hpa = entry.addr(level);
            level = level.below()?;
        }
    }

    /// A guest write: [`access`](Self::access), faulting on a miss.
    pub fn write(&self, caches: &mut VcpuCaches, gpa: u64) -> Result<u64, MmuError> {
        match self.access(gpa, true) {
            Access::Hit(hpa) => Ok(hpa),
            Access::Miss => self.fault(caches, gpa, true).map(|t| t.hpa),
        }
    }

    /// A guest read: [`access`](Self::access), faulting on a miss.
    pub fn read(&self, caches: &mut VcpuCaches, gpa: u64) -> Result<u64, MmuError> {
        match self.access(gpa, false) {
            Access::Hit(hpa) => Ok(hpa),
            Access::Miss => self.fault(caches, gpa, false).map(|t| t.hpa),
        }
    }

    // ----- translation and stats -----------------------------------------

    /// Translates `gpa` through the tree, without side effects.
    pub fn translate(&self, gpa: u64) -> Option<Translation> {
        let gfn = gpa >> 12;
        let _guard = self.read_lock();
        let (_, _, level, entry) = self.find_leaf(gfn)?;
        let t = self.translation(entry, level, gfn);
        Some(Translation {
            hpa: t.hpa | (gpa & 0xfff),
            ..t
        })
    }

    /// Leaf counts kept incrementally.
    pub fn page_stats(&self) -> PageStats {
        let [pages_4k, pages_2m, pages_1g] =
            self.stats.each_ref().map(|c| c.load(Ordering::Relaxed));
        PageStats {
            pages_4k,
            pages_2m,
            pages_1g,
        }
    }

    /// Leaf and table counts from a walk of the whole tree; the leaf counts
    /// must equal [`page_stats`](Self::page_stats).
    pub fn recount(&self) -> (PageStats, usize) {
        let _guard = self.write_lock();
        let mut stats = PageStats::default();
        let mut tables = 0;
        self.walk_all(self.root_hpa(), self.top_level(), &mut |entry, level| {
            if entry.is_leaf(level) {
                match level.get() {
                    1 => stats.pages_4k += 1,
                    2 => stats.pages_2m += 1,
                    _ => stats.pages_1g += 1,
                }
            } else {
                tables += 1;
            }
        });
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
        1 + self.live_tables() + split.tables.nr_free() + self.header_slab.pages()
    }

    /// Tables linked below the root.
    pub fn live_tables(&self) -> usize {
        self.table_map().len()
    }

    /// Work counters.
    pub fn counters(&self) -> MmuCounters {
        let c = &self.counters;
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        MmuCounters {
            faults: get(&c.faults),
            retries: get(&c.retries),
            splits: get(&c.splits),
            lazy_splits: get(&c.lazy_splits),
            split_fallbacks: get(&c.split_fallbacks),
            lock_drops: get(&c.lock_drops),
            tables_linked: get(&c.tables_linked),
            tables_freed: get(&c.tables_freed),
            external_leaked: get(&c.external_leaked),
        }
    }

    // ----- zap ------------------------------------------------------------

    /// Unmaps every leaf that overlaps `[start_gfn, end_gfn)` (a huge leaf
    /// that overlaps only partly goes whole) and frees tables left empty
    /// inside the range.
    pub fn zap_range(&self, start_gfn: u64, end_gfn: u64) -> Result<(), MmuError> {
        let _guard = self.write_lock();
        let _no_alloc = NoAllocSection::enter();
        self.zap_table(self.root_hpa(), self.top_level(), 0, start_gfn, end_gfn)
    }

    fn zap_table(
        &self,
        table_hpa: u64,
        level: Level,
        table_gfn: u64,
        start: u64,
        end: u64,
    ) -> Result<(), MmuError> {
        // SAFETY: the write lock is held and the table is linked.
        let table = unsafe { entries(table_hpa) };
        let pages = level.entry_pages();
        for index in 0..512 {
            let gfn = table_gfn + index as u64 * pages;
            if gfn + pages <= start || gfn >= end {
                continue;
            }
            let entry = load(table, index);
            if !entry.is_present() {
                continue;
            }
            if entry.is_leaf(level) {
                self.hooks.remove_leaf(gfn, level, entry)?;
                let old = Entry::from_bits(table[index].swap(ept::NON_PRESENT, Ordering::AcqRel));
                self.stats[stat_index(level)].fetch_sub(1, Ordering::Relaxed);
                // A write the log has not seen yet must not vanish with the leaf.
                if old.has(DIRTY) {
                    self.log_zapped_dirty(gfn, level);
                }
                continue;
            }
            let below = level.below().expect("tables above 4K");
            let child = entry.addr(level);
            self.zap_table(child, below, gfn, start, end)?;
            if gfn >= start && gfn + pages <= end {
                let table_ref = self.table_map().get(&child).map_or(
                    TableRef {
                        hpa: child,
                        external: None,
                    },
                    |h| h.table_ref(),
                );
                self.hooks.free_table(gfn, below, table_ref)?;
                table[index].store(ept::NON_PRESENT, Ordering::Release);
                self.table_generation.fetch_add(1, Ordering::Relaxed);
                self.free_table(child);
            }
        }
        Ok(())
    }

    /// Tears the MMU down for a VM that is going away: the hooks are told
    /// first ([`ExternalPageTable::teardown`]), then every leaf and table is
    /// taken back through them. A table whose external page the hooks
    /// cannot take back keeps that page out of the allocator (leaked and
    /// counted) rather than let the host reuse memory the external side
    /// may still own. Afterwards only the root is left. A second call does
    /// nothing.
    pub fn teardown(&self) -> Result<TeardownReport, MmuError> {
        let _guard = self.write_lock();
        let _no_alloc = NoAllocSection::enter();
        if self.torn_down.load(Ordering::Acquire) {
            return Ok(TeardownReport::default());
        }
        self.hooks.teardown()?;
        self.torn_down.store(true, Ordering::Release);
        let mut report = TeardownReport::default();
        self.teardown_table(self.root_hpa(), self.top_level(), 0, &mut report);
        Ok(report)
    }

    fn teardown_table(
        &self,
        table_hpa: u64,
        level: Level,
        table_gfn: u64,
        report: &mut TeardownReport,
    ) {
        // SAFETY: the write lock is held and the table is linked.
        let table = unsafe { entries(table_hpa) };
        let pages = level.entry_pages();
        for index in 0..512 {
            let entry = load(table, index);
            if !entry.is_present() {
                continue;
            }
            let gfn = table_gfn + index as u64 * pages;
            if entry.is_leaf(level) {
                match self.hooks.remove_leaf(gfn, level, entry) {
                    Ok(()) => report.leaves += 1,
                    Err(_) => report.leaf_errors += 1,
                }
                table[index].store(ept::NON_PRESENT, Ordering::Release);
                self.stats[stat_index(level)].fetch_sub(1, Ordering::Relaxed);
                continue;
            }
            let below = level.below().expect("tables above 4K");
            let child = entry.addr(level);
            self.teardown_table(child, below, gfn, report);
            table[index].store(ept::NON_PRESENT, Ordering::Release);
            self.table_generation.fetch_add(1, Ordering::Relaxed);
            let Some(mut header) = self.table_map().remove(&child) else {
                continue;
            };
            if self
                .hooks
                .free_table(gfn, below, header.table_ref())
                .is_err()
                && let Some(external) = header.external.take()
            {
                // The external side may still own it: never back to the host.
                let _ = external.into_raw();
                report.external_leaked += 1;
                self.counters
                    .external_leaked
                    .fetch_add(1, Ordering::Relaxed);
            }
            drop(header);
            report.tables += 1;
            self.counters.tables_freed.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn log_zapped_dirty(&self, gfn: u64, level: Level) {
        let Some(slot) = self.slot_for_gfn(gfn) else {
            return;
        };
        if !slot.logging() {
            return;
        }
        let first = gfn.max(slot.base_gfn());
        let last = (gfn + level.entry_pages()).min(slot.end_gfn());
        for page in first..last {
            slot.mark_dirty(page);
        }
    }

    fn free_table(&self, hpa: u64) {
        let header = self.table_map().remove(&hpa);
        debug_assert!(header.is_some(), "table {hpa:#x} has no header");
        drop(header);
        self.counters.tables_freed.fetch_add(1, Ordering::Relaxed);
    }

    // ----- splitting -----------------------------------------------------

    /// Splits every huge leaf overlapping `[start_gfn, end_gfn)` down to
    /// `target` (pre-order: 1G to 2M to 4K). Never allocates under the lock:
    /// when the split caches run dry the lock is dropped, the caches are
    /// topped up, and the walk resumes where it stopped.
    pub fn split_huge_pages(
        &self,
        start_gfn: u64,
        end_gfn: u64,
        target: Level,
    ) -> Result<u64, MmuError> {
        self.split_where(start_gfn, end_gfn, target, |_, _| true)
    }

    /// Splits only the huge leaves that straddle `start_gfn` or `end_gfn`, as
    /// far as needed for the boundary to fall between leaves (needed before
    /// converting part of a huge page). Returns the number of splits.
    pub fn split_cross_boundary(&self, start_gfn: u64, end_gfn: u64) -> Result<u64, MmuError> {
        let mut splits =
            self.split_where(start_gfn, start_gfn + 1, Level::L4K, |leaf_gfn, _| {
                leaf_gfn < start_gfn
            })?;
        if end_gfn > start_gfn {
            splits += self.split_where(end_gfn - 1, end_gfn, Level::L4K, |leaf_gfn, pages| {
                leaf_gfn + pages > end_gfn
            })?;
        }
        Ok(splits)
    }

    /// The split walk behind every split: finds each huge leaf above
    /// `target` in `[start, end)` that `should_split(leaf_gfn, pages)` picks
    /// and splits it, pre-order. Tables come from the split caches, topped
    /// up with no lock held; when they run dry (or every
    /// [`SPLITS_PER_YIELD`] splits) the lock is dropped and the walk resumes
    /// at the same cursor. Without external tables the walk holds the lock
    /// for read and links with compare-and-exchange, as the kernel's eager
    /// split does, so vCPU faults go on meanwhile; external tables (a TDX
    /// demote) need it for write.
    fn split_where(
        &self,
        start: u64,
        end: u64,
        target: Level,
        should_split: impl Fn(u64, u64) -> bool,
    ) -> Result<u64, MmuError> {
        let mut caches = self.split_caches.lock().unwrap_or_else(|p| p.into_inner());
        let capacity = self.config.split_cache_capacity;
        let exclusive = self.external_tables;
        let mut cursor = start;
        let mut splits = 0;
        while cursor < end {
            caches.tables.topup_with_capacity(capacity, 1)?;
            caches.headers.topup_with_capacity(capacity, 1)?;
            if self.external_tables {
                caches.external.topup_with_capacity(capacity, 1)?;
            }
            self.hooks.topup(Topup::Split { splits: capacity })?;
            let budget = self.hooks.split_budget();
            self.table_map().reserve(caches.tables.nr_free());
            let guard = if exclusive {
                SplitGuard::Exclusive(self.write_lock())
            } else {
                SplitGuard::Shared(self.read_lock())
            };
            let no_alloc = NoAllocSection::enter();
            let mut since_yield = 0;
            while cursor < end {
                if caches.tables.nr_free() == 0
                    || caches.headers.nr_free() == 0
                    || (self.external_tables && caches.external.nr_free() == 0)
                    || since_yield == SPLITS_PER_YIELD
                    || since_yield as usize >= budget
                {
                    break;
                }
                match self.split_step(&mut caches, cursor, target, &should_split, exclusive)? {
                    Step::Split => {
                        splits += 1;
                        since_yield += 1;
                        self.counters.splits.fetch_add(1, Ordering::Relaxed);
                    }
                    Step::Skip(next) => cursor = next,
                    Step::Raced => {
                        self.counters.retries.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            }
            drop(no_alloc);
            drop(guard);
            if cursor < end {
                self.counters.lock_drops.fetch_add(1, Ordering::Relaxed);
                std::thread::yield_now();
            }
        }
        Ok(splits)
    }

    /// One step of a split walk at `cursor`: split the first huge leaf met
    /// above `target`, or say where the walk continues, or that an entry on
    /// the way is changing under another thread.
    fn split_step(
        &self,
        caches: &mut VcpuCaches,
        cursor: u64,
        target: Level,
        should_split: &impl Fn(u64, u64) -> bool,
        exclusive: bool,
    ) -> Result<Step, MmuError> {
        let mut table_hpa = self.root_hpa();
        let mut level = self.top_level();
        loop {
            // SAFETY: the lock is held (read or write); root or linked table.
            let table = unsafe { entries(table_hpa) };
            let index = level.index(cursor);
            let entry = load(table, index);
            let pages = level.entry_pages();
            let leaf_gfn = cursor & !(pages - 1);
            let next = leaf_gfn + pages;
            if entry.bits() == FROZEN {
                return Ok(Step::Raced);
            }
            if !entry.is_present()
                || (entry.is_leaf(level) && (level <= target || !should_split(leaf_gfn, pages)))
            {
                return Ok(Step::Skip(next));
            }
            if entry.is_leaf(level) {
                return Ok(
                    match self
                        .split_leaf(caches, table, index, level, entry, leaf_gfn, exclusive)?
                    {
                        Some(_) => Step::Split,
                        None => Step::Raced,
                    },
                );
            }
            let below = level.below().expect("tables above 4K");
            if below <= target {
                return Ok(Step::Skip(next));
            }
            table_hpa = entry.addr(level);
            level = below;
        }
    }

    /// Replaces the huge leaf `leaf` at `table[index]` (level `level`,
    /// mapping from `gfn`) with a table filled with its 512 children, which
    /// map the same memory with the same bits (the kernel's
    /// `tdp_mmu_split_huge_page`). The children are written before the link
    /// is published, and the link is a compare-and-exchange from `leaf`, so
    /// this runs under the read lock as well as the write lock. `exclusive`
    /// says which one the caller holds; the hooks may refuse a split without
    /// it (a TDX demote needs the write lock).
    ///
    /// Returns the new table, or `None` when the entry changed under us or
    /// the hooks were busy: nothing changed, and the caller retries. A
    /// refusal of the hooks leaves both trees as they were and is an error.
    #[allow(clippy::too_many_arguments)]
    fn split_leaf(
        &self,
        caches: &mut VcpuCaches,
        table: &[AtomicU64; 512],
        index: usize,
        level: Level,
        leaf: Entry,
        gfn: u64,
        exclusive: bool,
    ) -> Result<Option<u64>, MmuError> {
        let below = level.below().expect("huge leaves are above 4K");
        let mut page = caches.tables.alloc()?;
        let hpa = page.addr() as u64;
        // The page is ours and not yet linked: plain stores, which the
        // compiler vectorizes. Child i is child 0 with the frame advanced by
        // i child pages (`Entry::split_child`); the frame bits never carry
        // into the others.
        let first = leaf.split_child(level, 0).bits();
        let step = below.entry_bytes();
        for (i, word) in page.words_mut().iter_mut().enumerate() {
            *word = first + i as u64 * step;
        }
        debug_assert_eq!(page.words()[511], leaf.split_child(level, 511).bits());
        let external = if self.external_tables {
            Some(caches.external.alloc()?)
        } else {
            None
        };
        let header = caches.headers.alloc()?;
        let table_ref = TableRef {
            hpa,
            external: external.as_ref().map(|p| p.addr() as u64),
        };
        // Given back, the page's fill is restored by the cache.
        let give_back = |caches: &mut VcpuCaches, page, external: Option<_>, header| {
            caches.tables.free(page);
            if let Some(external) = external {
                caches.external.free(external);
            }
            caches.headers.free(header);
        };
        if !cas(table, index, leaf, Entry::from_bits(FROZEN)) {
            give_back(caches, page, external, header);
            return Ok(None);
        }
        if let Err(err) = self
            .hooks
            .split_leaf(gfn, level, leaf, table_ref, exclusive)
        {
            table[index].store(leaf.bits(), Ordering::Release);
            give_back(caches, page, external, header);
            return match err {
                HookError::Busy { .. } => Ok(None),
                refused => Err(refused.into()),
            };
        }
        let mut header = header;
        *header = TableHeader {
            gfn,
            level: below.get(),
            page: Some(page),
            external,
        };
        self.table_map().insert(hpa, header);
        // Release: the filled children are visible before the link.
        table[index].store(Entry::table(hpa).bits(), Ordering::Release);
        self.stats[stat_index(level)].fetch_sub(1, Ordering::Relaxed);
        self.stats[stat_index(below)].fetch_add(512, Ordering::Relaxed);
        self.counters.tables_linked.fetch_add(1, Ordering::Relaxed);
        Ok(Some(hpa))
    }

    // ----- dirty logging ---------------------------------------------------

    /// Starts dirty logging on slot `id`.
    ///
    /// Classic mode: huge leaves are split now (eager) and every leaf's dirty
    /// bit is cleared; with eager splitting off, huge leaves are
    /// write-protected instead and split by later write faults. Manual mode
    /// with "initially set": every bit of the log starts set, and nothing is
    /// split or protected until [`clear_dirty_log`](Self::clear_dirty_log).
    ///
    /// Eager splitting is best effort, as the kernel's
    /// `kvm_mmu_slot_try_split_huge_pages` is: when the split caches cannot
    /// be filled (or the hooks refuse), the huge leaves left are
    /// write-protected whole, the first write to each splits it
    /// ([`fault`](Self::fault)), and [`MmuCounters::split_fallbacks`]
    /// counts them. So this never fails for lack of memory, and the log
    /// keeps 4 KiB precision.
    pub fn enable_dirty_logging(&self, id: u32, mode: LogMode) -> Result<(), MmuError> {
        let slot = self.slot(id)?;
        slot.start_logging(mode);
        if mode == LogMode::Classic {
            self.try_split_huge_pages(slot.base_gfn(), slot.end_gfn());
            self.protect_range(slot.base_gfn(), slot.end_gfn(), None);
        }
        Ok(())
    }

    /// Stops dirty logging on slot `id`, then zaps only what can be mapped
    /// huge again (the kernel's `kvm_mmu_zap_collapsible_sptes`): each table
    /// at the 2M or 1G level whose range the slot allows as one leaf goes,
    /// so that later faults map it huge; tables over ranges that can only
    /// be mapped 4K (the slot's unaligned edges, host frames not aligned
    /// like the guest's) stay mapped.
    pub fn disable_dirty_logging(&self, id: u32) -> Result<(), MmuError> {
        let slot = self.slot(id)?;
        slot.stop_logging();
        let mut collapsible = Vec::new();
        {
            let _guard = self.read_lock();
            self.find_collapsible(
                self.root_hpa(),
                self.top_level(),
                0,
                &slot,
                &mut collapsible,
            );
        }
        for range in collapsible {
            self.zap_range(range.start, range.end)?;
        }
        Ok(())
    }

    /// Collects the ranges of tables under `table_hpa` (level `level`,
    /// mapping from `table_gfn`) that `slot` would map with one huge leaf.
    fn find_collapsible(
        &self,
        table_hpa: u64,
        level: Level,
        table_gfn: u64,
        slot: &Memslot,
        out: &mut Vec<std::ops::Range<u64>>,
    ) {
        // SAFETY: the caller holds the lock; the table is linked.
        let table = unsafe { entries(table_hpa) };
        let pages = level.entry_pages();
        let first = (slot.base_gfn().saturating_sub(table_gfn) / pages).min(512) as usize;
        for index in first..512 {
            let gfn = table_gfn + index as u64 * pages;
            if gfn >= slot.end_gfn() {
                break;
            }
            let entry = load(table, index);
            if !entry.is_present() || entry.is_leaf(level) {
                continue;
            }
            if level.can_be_leaf() && slot.contains(gfn) && slot.max_level(gfn) >= level {
                out.push(gfn..gfn + pages);
                continue;
            }
            if let Some(below) = level.below()
                && below > Level::L4K
            {
                self.find_collapsible(entry.addr(level), below, gfn, slot, out);
            }
        }
    }

    /// [`split_huge_pages`](Self::split_huge_pages) to 4K over a range for
    /// dirty logging, when eager splitting is on: best effort, so a failure
    /// only leaves huge leaves for the protect pass to write-protect whole.
    fn try_split_huge_pages(&self, start: u64, end: u64) {
        if !self.config.eager_split {
            return;
        }
        if let Err(err) = self.split_huge_pages(start, end, Level::L4K) {
            tracing::debug!(
                start,
                end,
                %err,
                "eager split fell back to write-protecting huge leaves"
            );
        }
    }

    /// Makes the next write to each page of `[start, end)` visible to dirty
    /// logging: clears the dirty bit of the 4K leaves (those of `cleared`
    /// only, when given) and write-protects every huge leaf over the range
    /// (whose dirty bit could not say which page was written). Runs under
    /// the read lock with compare-and-exchange, as the kernel's
    /// `clear_dirty_gfn_range` does. Huge leaves left after an eager split
    /// count as [`MmuCounters::split_fallbacks`].
    fn protect_range(&self, start: u64, end: u64, cleared: Option<(&Memslot, ClearedWord)>) {
        let _guard = self.read_lock();
        let _no_alloc = NoAllocSection::enter();
        let mut fallbacks = 0;
        self.for_each_leaf_gfn(start, end, |table, index, level, entry, gfn| {
            if level == Level::L4K
                && let Some((slot, word)) = cleared
                && !word.has(slot.base_gfn(), gfn)
            {
                return;
            }
            if level > Level::L4K && self.config.eager_split {
                fallbacks += 1;
            }
            protect_leaf(table, index, level, entry);
        });
        if fallbacks > 0 {
            self.counters
                .split_fallbacks
                .fetch_add(fallbacks, Ordering::Relaxed);
        }
    }

    /// Returns the dirty log of slot `id`, one bit per page from the slot's
    /// first page. Classic mode: the log is cleared and the pages are
    /// protected again. Manual mode: the log is returned as is; use
    /// [`clear_dirty_log`](Self::clear_dirty_log).
    pub fn get_dirty_log(&self, id: u32) -> Result<Vec<u64>, MmuError> {
        let slot = self.slot(id)?;
        let mode = slot.log_mode().ok_or(MemslotError::NotLogging { id })?;
        self.harvest_into(&slot);
        Ok(match mode {
            LogMode::Classic => slot.take(),
            LogMode::ManualInitiallySet => slot.snapshot(),
        })
    }

    /// Manual mode: `KVM_CLEAR_DIRTY_LOG` for the bits of `mask` (bit i
    /// stands for page `first_page + i` of the slot; `first_page` a multiple
    /// of 64).
    ///
    /// As the kernel's `kvm_clear_dirty_log_protect` and
    /// `kvm_arch_mmu_enable_log_dirty_pt_masked` do, one 64-page word at a
    /// time: only the bits set both in the log and in the mask are cleared;
    /// then the pages from the first to the last bit actually cleared in
    /// that word are split (when eager, best effort), the huge leaves over
    /// them write-protected, and the cleared 4K pages protected. So a mask
    /// of pages {0, 2047} splits two 2 MiB pages, not the four between, and
    /// a word with nothing to clear touches nothing.
    pub fn clear_dirty_log(&self, id: u32, first_page: u64, mask: &[u64]) -> Result<(), MmuError> {
        let slot = self.slot(id)?;
        slot.check_clear(first_page, mask)?;
        for word in slot.clear_words(first_page, mask) {
            let range = word.gfn_range(slot.base_gfn());
            self.try_split_huge_pages(range.start, range.end);
            self.protect_range(range.start, range.end, Some((&slot, word)));
        }
        Ok(())
    }

    /// Moves the dirty bits of the slot's leaves into its bitmap, clearing
    /// them in the leaves (what a PML buffer flush does).
    fn harvest_into(&self, slot: &Memslot) {
        let _guard = self.read_lock();
        self.for_each_leaf_gfn(
            slot.base_gfn(),
            slot.end_gfn(),
            |table, index, level, entry, gfn| {
                if !entry.has(DIRTY) {
                    return;
                }
                let old = Entry::from_bits(table[index].fetch_and(!DIRTY, Ordering::AcqRel));
                if old.has(DIRTY) {
                    let first = gfn.max(slot.base_gfn());
                    let last = (gfn + level.entry_pages()).min(slot.end_gfn());
                    for page in first..last {
                        slot.mark_dirty(page);
                    }
                }
            },
        );
    }

    /// Visits every present leaf overlapping `[start, end)`; callers hold the lock.
    fn for_each_leaf_gfn(
        &self,
        start: u64,
        end: u64,
        mut visit: impl FnMut(&[AtomicU64; 512], usize, Level, Entry, u64),
    ) {
        fn walk(
            table_hpa: u64,
            level: Level,
            table_gfn: u64,
            start: u64,
            end: u64,
            visit: &mut LeafVisitor<'_>,
        ) {
            // SAFETY: the caller holds the MMU lock; the table is linked.
            let table = unsafe { entries(table_hpa) };
            let pages = level.entry_pages();
            let first = (start.saturating_sub(table_gfn) / pages).min(512) as usize;
            for index in first..512 {
                let gfn = table_gfn + index as u64 * pages;
                if gfn >= end {
                    break;
                }
                let entry = load(table, index);
                if !entry.is_present() {
                    continue;
                }
                if entry.is_leaf(level) {
                    visit(table, index, level, entry, gfn);
                } else {
                    walk(
                        entry.addr(level),
                        level.below().expect("tables above 4K"),
                        gfn,
                        start,
                        end,
                        visit,
                    );
                }
            }
        }
        walk(self.root_hpa(), self.top_level(), 0, start, end, &mut visit);
    }
}

/// A callback over leaves: table, index, level, entry, first gfn.
type LeafVisitor<'a> = dyn FnMut(&[AtomicU64; 512], usize, Level, Entry, u64) + 'a;

enum Step {
    /// A huge leaf was split; the walk goes on at the same cursor.
    Split,
    /// Nothing (more) to split before this gfn.
    Skip(u64),
    /// An entry changed under the walk (another thread's fault, a harvest,
    /// a busy hook): retry at the same cursor after dropping the lock.
    Raced,
}

/// The lock a splitter holds: shared without external tables, exclusive
/// with them.
enum SplitGuard<'a> {
    Shared(#[allow(dead_code)] ReadGuard<'a>),
    Exclusive(#[allow(dead_code)] WriteGuard<'a>),
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
                    self.counters
                        .external_leaked
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        // Tables go back to their pool through their headers.
        let tables = std::mem::take(self.tables.get_mut().unwrap_or_else(|p| p.into_inner()));
        drop(tables);
    }
}
