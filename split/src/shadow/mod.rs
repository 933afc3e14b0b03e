//! The shadow MMU for nested TDP: the guest hypervisor's EPT (L2 -> L1) is
//! combined with the memslots (L1 -> host) into shadow tables (L2 -> host).
//!
//! - Shadow pages are keyed by `(gfn, role)`. A *non-direct* page shadows
//!   the guest table at `gfn`; a *direct* page covers the L1 frames from
//!   `gfn` where the guest maps a huge page that the host maps smaller.
//! - Every leaf is in a reverse map (rmap) per memslot, level and L1 frame.
//!   An rmap with more than one entry is a chain of descriptors of
//!   [`PTE_LIST_EXT`] entries each, taken from an object cache; parent
//!   pointers of shadow pages use the same lists.
//! - A guest write to a shadowed 4K-level table makes its shadow page
//!   *unsync* (it is re-read at the next sync); a write to a higher-level
//!   table zaps the shadow pages of that table.
//! - Dirty logging write-protects leaves through the rmaps; eager splitting
//!   walks the rmaps of huge leaves and replaces each with a direct shadow
//!   page, using per-VM split caches (descriptor cache minimum
//!   [`SPLIT_DESC_MIN`], capacity [`SPLIT_DESC_CAPACITY`]) and dropping the
//!   lock to top them up.
//!
//! [`ShadowMmu::get_shadow_page`] takes one [`ShadowCaches`] for both the
//! fault path (with a vCPU) and the split path (without one). Without a
//! vCPU an unsync page cannot be synced, so the split path only asks for
//! direct pages, which are never unsync.
//!
//! The page allocator is never called while the lock is held: every cache
//! is topped up before it is taken.

mod dirty;
mod fault;
mod page;
mod rmap;
mod split;
mod sync;
pub use rmap::PteListDesc;

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use mmu_cache::{
    CacheError, ObjectCache, Page, PageCache, PageKind, PagePool, Slab, SlabBox, SlabError,
};
use rmap::{PteList, SlotRmaps};

use crate::addr::{Gfn, Gpa, Hpa};
use crate::ept::{self, AccessKind, Entry, EptCaps, EptError, Level, MemType, RWX};
use crate::guest::GuestTables;
use crate::memslot::{Memslot, MemslotError};
use crate::page_map::PageMap;
use crate::translation::PageStats;

/// Pages that hold shadow tables.
#[derive(Debug)]
pub enum ShadowTablePage {}
impl PageKind for ShadowTablePage {}

/// Entries per rmap descriptor.
pub const PTE_LIST_EXT: usize = 14;
/// Descriptors the split caches must hold before one huge leaf is split:
/// one rmap entry per new child, plus the parent pointer.
pub const SPLIT_DESC_MIN: usize = 512 + 1;
/// Capacity of the split descriptor cache: the minimum plus the default
/// capacity, so that a few aliased frames do not force a lock drop.
pub const SPLIT_DESC_CAPACITY: usize = SPLIT_DESC_MIN + mmu_cache::DEFAULT_CAPACITY;
/// Buckets of the shadow-page hash at first, as the kernel's
/// `KVM_NUM_MMU_PAGES`; it grows to two per 2 MiB of memslot when slots
/// are added, and doubles whenever it holds more than two pages a bucket.
const HASH_BUCKETS: usize = 1 << 12;
/// Where a leaf keeps the guest's permissions (in bits EPT ignores), so
/// that write protection for dirty logging can be undone and split
/// children know the guest's access.
const GUEST_ACCESS_SHIFT: u32 = 52;

/// Errors of the shadow MMU.
#[derive(Debug, thiserror::Error)]
pub enum ShadowError {
    /// The guest's EPT does not allow the access: an EPT violation to be
    /// reflected to the guest hypervisor.
    #[error("guest EPT violation at nested gpa {ngpa:#x} (level {level:?}, {access})")]
    GuestViolation {
        /// The nested (L2) guest physical address.
        ngpa: Gpa,
        /// The guest level where the walk stopped.
        level: Level,
        /// The access that was denied.
        access: AccessKind,
    },
    /// Building a shadow leaf failed (a frame not aligned to its level).
    #[error("building a shadow leaf: {0}")]
    Entry(#[from] EptError),
    /// The guest's EPT holds an invalid entry: an EPT misconfiguration to
    /// be reflected to the guest hypervisor.
    #[error("guest EPT misconfiguration at nested gpa {ngpa:#x}: {source}")]
    GuestMisconfig {
        /// The nested guest physical address.
        ngpa: Gpa,
        /// What is wrong with the entry.
        source: EptError,
    },
    /// The nested address does not fit the guest's paging depth.
    #[error("nested gpa {ngpa:#x} is beyond the guest's {levels}-level EPT")]
    AddressTooWide {
        /// The nested guest physical address.
        ngpa: Gpa,
        /// The guest's paging depth.
        levels: u8,
    },
    /// The guest maps the nested address to an L1 frame no memslot holds.
    #[error("no memslot holds L1 gfn {gfn:#x}")]
    NoSlot {
        /// The L1 guest frame.
        gfn: Gfn,
    },
    /// A memslot operation failed.
    #[error(transparent)]
    Memslot(#[from] MemslotError),
    /// Topping up a cache failed.
    #[error("topping up the shadow MMU caches: {0}")]
    Cache(#[from] CacheError),
    /// A slab could not be created.
    #[error(transparent)]
    Slab(#[from] SlabError),
    /// No shadow page has this address.
    #[error("no shadow page at {hpa:#x}")]
    NoSuchPage {
        /// The address asked for.
        hpa: Hpa,
    },
}

/// What a shadow page is, besides the frame it is keyed by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Role {
    /// The level of the page's entries (1 = 4K).
    pub level: u8,
    /// Direct: covers L1 frames directly instead of shadowing a guest table.
    pub direct: bool,
    /// For direct pages, the guest's R/W/X permissions of the huge mapping.
    pub access: u8,
}

impl Role {
    /// The role of a page shadowing a guest table at `level`, reached with
    /// permissions `access` (the AND of the guest entries above it).
    pub fn shadowing(level: Level, access: u64) -> Self {
        Self {
            level: level.get(),
            direct: false,
            access: (access & RWX) as u8,
        }
    }

    /// The role of a direct page at `level` with guest permissions `access`.
    pub fn direct(level: Level, access: u64) -> Self {
        Self {
            level: level.get(),
            direct: true,
            access: (access & RWX) as u8,
        }
    }

    fn entry_level(self) -> Level {
        Level::new(self.level).expect("roles hold valid levels")
    }
}

/// The header of one shadow page (the kernel's `struct kvm_mmu_page`).
#[derive(Debug, Default)]
pub struct ShadowPage {
    gfn: u64,
    role: Role,
    page: Option<Page<ShadowTablePage>>,
    parents: PteList,
    unsync: bool,
    root_count: u32,
    invalid: bool,
    hash_next: u64,
}

impl ShadowPage {
    fn hpa(&self) -> u64 {
        self.page.as_ref().map_or(0, |p| p.addr() as u64)
    }

    fn info(&self) -> ShadowPageInfo {
        ShadowPageInfo {
            hpa: Hpa(self.hpa()),
            gfn: Gfn(self.gfn),
            role: self.role,
            unsync: self.unsync,
            parents: self.parents.len(),
            root_count: self.root_count,
            invalid: self.invalid,
        }
    }
}

/// A snapshot of one shadow page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShadowPageInfo {
    /// Address of the table page.
    pub hpa: Hpa,
    /// The frame the page is keyed by.
    pub gfn: Gfn,
    /// Its role.
    pub role: Role,
    /// Whether the guest table changed since the page was last synced.
    pub unsync: bool,
    /// How many entries point at it.
    pub parents: usize,
    /// How many vCPUs use it as their root.
    pub root_count: u32,
    /// Zapped while still a root: no longer found by lookups.
    pub invalid: bool,
}

mmu_cache::cache_set! {
    /// The caches that building shadow tables needs. The fault path and the
    /// split path use this same type with different minimums: a fault needs
    /// room for a full walk; a split for 512 rmap entries and a parent.
    #[derive(Debug)]
    pub struct ShadowCaches {
        /// Rmap and parent-list descriptors.
        pub descriptors: ObjectCache<PteListDesc> => [min 6],
        /// Shadow page headers.
        pub headers: ObjectCache<ShadowPage> => [min 5],
        /// Shadow table pages, filled with the non-present value.
        pub tables: PageCache<ShadowTablePage> => [min 5],
    }
}

impl ShadowCaches {
    fn split_needs_topup(&self) -> bool {
        self.descriptors.nr_free() < SPLIT_DESC_MIN
            || self.headers.nr_free() < 1
            || self.tables.nr_free() < 1
    }

    fn topup_for_split(&mut self) -> Result<(), CacheError> {
        self.descriptors
            .topup_with_capacity(SPLIT_DESC_CAPACITY, SPLIT_DESC_MIN)
            .map_err(|e| CacheError::in_set("descriptors", e))?;
        self.headers
            .topup_with_capacity(mmu_cache::DEFAULT_CAPACITY, 1)
            .map_err(|e| CacheError::in_set("headers", e))?;
        self.tables
            .topup_with_capacity(mmu_cache::DEFAULT_CAPACITY, 1)
            .map_err(|e| CacheError::in_set("tables", e))
    }
}

/// A vCPU of the nested guest: the guest EPT it runs on and its root.
pub struct Vcpu {
    id: u32,
    guest: Arc<dyn GuestTables>,
    root: Option<u64>,
}

impl fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vcpu")
            .field("id", &self.id)
            .field("guest_root_gfn", &self.guest.root_gfn())
            .field("root", &self.root)
            .finish()
    }
}

impl Vcpu {
    /// A vCPU running on the guest EPT `guest`.
    pub fn new(id: u32, guest: Arc<dyn GuestTables>) -> Self {
        Self {
            id,
            guest,
            root: None,
        }
    }

    /// The vCPU id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The address of its shadow root, once loaded.
    pub fn root_hpa(&self) -> Option<Hpa> {
        self.root.map(Hpa)
    }

    fn top_level(&self) -> Level {
        Level::new(self.guest.levels()).unwrap_or(Level::PML4)
    }
}

/// Configuration of a [`ShadowMmu`].
#[derive(Clone, Copy, Debug)]
pub struct ShadowConfig {
    /// Split huge shadow leaves when dirty logging starts (or at the first
    /// clear in manual mode); off: write faults split one page at a time.
    pub eager_split: bool,
    /// Memory type of leaves.
    pub memtype: MemType,
    /// The EPT capabilities exposed to the guest hypervisor: an entry of
    /// its EPT that they make invalid (execute-only without support,
    /// address bits at or above MAXPHYADDR) is a misconfiguration.
    pub ept_caps: EptCaps,
}

impl Default for ShadowConfig {
    fn default() -> Self {
        Self {
            eager_split: true,
            memtype: MemType::Wb,
            ept_caps: EptCaps::default(),
        }
    }
}

/// Counters of shadow MMU work.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShadowCounters {
    /// Faults handled.
    pub faults: u64,
    /// Shadow pages created.
    pub pages_created: u64,
    /// Shadow pages zapped.
    pub pages_zapped: u64,
    /// Huge leaves split eagerly.
    pub splits: u64,
    /// Huge leaves dropped by a write fault under dirty logging.
    pub lazy_splits: u64,
    /// Shadow pages marked unsync by a guest table write.
    pub unsyncs: u64,
    /// Unsync shadow pages synced.
    pub syncs: u64,
    /// Times the splitter dropped the lock to top up or to yield.
    pub lock_drops: u64,
    /// Huge leaves an eager split under dirty logging could not split,
    /// write-protected whole instead (counted at each protect pass).
    pub split_fallbacks: u64,
}

/// What a walk of the whole shadow forest found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShadowRecount {
    /// Leaves per size, counted in the tables.
    pub stats: PageStats,
    /// Entries in all rmaps.
    pub rmap_entries: usize,
    /// Descriptors in rmaps and parent lists.
    pub descriptors: usize,
    /// Shadow pages, valid or not.
    pub pages: usize,
    /// Parent pointers that do not match a present table entry.
    pub broken_parents: usize,
    /// Rmap entries that do not name a present leaf of their level over
    /// their frame.
    pub broken_rmaps: usize,
}

struct State {
    pages: PageMap<SlabBox<ShadowPage>>,
    buckets: Vec<u64>,
    slots: Vec<SlotRmaps>,
    stats: [u64; 3],
    counters: ShadowCounters,
}

/// Puts the page `sp` at `hpa` at the head of its chain in `buckets`.
fn hash_push(buckets: &mut [u64], hpa: u64, sp: &mut ShadowPage) {
    let b = bucket_of(sp.gfn, buckets.len());
    sp.hash_next = buckets[b];
    buckets[b] = hpa;
}

/// [`State::bucket`] in a hash of `buckets` (a power of two) buckets.
fn bucket_of(gfn: u64, buckets: usize) -> usize {
    let within = (gfn & 511).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32;
    ((gfn >> 9).wrapping_add(within) as usize) & (buckets - 1)
}

fn guest_access(leaf: Entry) -> u64 {
    (leaf.bits() >> GUEST_ACCESS_SHIFT) & RWX
}

impl State {
    fn sp(&self, hpa: u64) -> &ShadowPage {
        &self.pages[&hpa]
    }

    fn sp_mut(&mut self, hpa: u64) -> &mut ShadowPage {
        self.pages.get_mut(&hpa).expect("a live shadow page")
    }

    fn spte(&self, addr: u64) -> Entry {
        let sp = self.sp(addr & !0xfff);
        let page = sp.page.as_ref().expect("live pages have a table");
        Entry::from_bits(page.words()[((addr & 0xfff) / 8) as usize])
    }

    fn set_spte(&mut self, addr: u64, entry: Entry) {
        let sp = self.sp_mut(addr & !0xfff);
        let page = sp.page.as_mut().expect("live pages have a table");
        page.words_mut()[((addr & 0xfff) / 8) as usize] = entry.bits();
    }

    fn slot_index(&self, gfn: u64) -> Option<usize> {
        self.slots.iter().position(|r| r.slot.contains(Gfn(gfn)))
    }

    /// The L1 frame a leaf maps (its first frame for a huge leaf).
    fn leaf_gfn(&self, leaf: Entry, level: Level) -> u64 {
        let pfn = Hpa(leaf.addr(level)).pfn();
        self.slots
            .iter()
            .find_map(|r| r.slot.gfn_of_host_pfn(pfn).map(|gfn| gfn.0))
            .expect("every leaf maps a memslot frame")
    }

    fn rmap(&mut self, level: Level, gfn: u64) -> &mut PteList {
        let index = self
            .slot_index(gfn)
            .expect("rmapped frames are in a memslot");
        self.slots[index].head(level, gfn)
    }

    fn find(&self, gfn: u64, role: Role) -> Option<u64> {
        let mut cursor = self.buckets[self.bucket(gfn)];
        while cursor != 0 {
            let sp = self.sp(cursor);
            if sp.gfn == gfn && sp.role == role {
                return Some(cursor);
            }
            cursor = sp.hash_next;
        }
        None
    }

    /// The first page keyed by `gfn` with another role that is unsync.
    fn find_unsync_other(&self, gfn: u64, role: Role) -> Option<u64> {
        let mut cursor = self.buckets[self.bucket(gfn)];
        while cursor != 0 {
            let sp = self.sp(cursor);
            if sp.gfn == gfn && sp.role != role && sp.unsync {
                return Some(cursor);
            }
            cursor = sp.hash_next;
        }
        None
    }

    /// The bucket of `gfn`: the 2 MiB region number plus a Fibonacci hash
    /// of the frame within the region. Frames inside one region (a guest's
    /// tables, allocated near each other) spread over the buckets, and the
    /// 2M-aligned frames of consecutive regions (the direct pages an eager
    /// split creates, in order) fall in consecutive buckets, which a split
    /// reads as one stream instead of one cache miss per new page.
    fn bucket(&self, gfn: u64) -> usize {
        bucket_of(gfn, self.buckets.len())
    }

    /// Makes room for `additional` more shadow pages in the page map, and
    /// in the hash when it would hold more than two pages per bucket.
    fn reserve_pages(&mut self, additional: usize) {
        self.pages.reserve(additional);
        let pages = self.pages.len() + additional;
        if pages > 2 * self.buckets.len() {
            self.resize_hash(pages.next_power_of_two());
        }
    }

    /// Sizes the page map and the hash for the memslots: room for one
    /// 4K-level table per 2 MiB of guest memory (what maps it all in 4K
    /// leaves, as after an eager split), and two buckets per such table,
    /// never fewer than the kernel's 4096 (`KVM_NUM_MMU_PAGES`). The kernel
    /// keeps 4096 whatever the guest's size, so a split of 16 GiB, which
    /// creates 8192 pages, walks chains of 2 to 3 pages for each; here a
    /// new page's bucket is empty more often than not. Both are sized
    /// when a slot is added, so a split does not grow them.
    fn size_for_slots(&mut self) {
        let tables: u64 = self
            .slots
            .iter()
            .map(|r| r.slot.npages().div_ceil(512))
            .sum();
        let tables = usize::try_from(tables).unwrap_or(usize::MAX);
        self.pages.reserve(tables.saturating_sub(self.pages.len()));
        let wanted = tables
            .saturating_mul(2)
            .checked_next_power_of_two()
            .unwrap_or(usize::MAX / 2 + 1);
        if wanted > self.buckets.len() {
            self.resize_hash(wanted);
        }
    }

    /// Rebuilds the hash with `buckets` buckets (a power of two) from the
    /// valid pages (zapped ones left the hash when they were zapped).
    fn resize_hash(&mut self, buckets: usize) {
        debug_assert!(buckets.is_power_of_two());
        let mut heads = vec![0; buckets];
        for (&hpa, sp) in self.pages.iter_mut().filter(|(_, sp)| !sp.invalid) {
            hash_push(&mut heads, hpa, sp);
        }
        self.buckets = heads;
    }

    /// Hashes the new page `sp` at `hpa` before it goes into the page map.
    fn hash_insert_new(&mut self, hpa: u64, sp: &mut ShadowPage) {
        hash_push(&mut self.buckets, hpa, sp);
    }

    fn hash_remove(&mut self, hpa: u64) {
        let b = self.bucket(self.sp(hpa).gfn);
        let next = self.sp(hpa).hash_next;
        if self.buckets[b] == hpa {
            self.buckets[b] = next;
            return;
        }
        let mut cursor = self.buckets[b];
        while cursor != 0 {
            let following = self.sp(cursor).hash_next;
            if following == hpa {
                self.sp_mut(cursor).hash_next = next;
                return;
            }
            cursor = following;
        }
    }
}

/// The shadow MMU of one VM running nested guests.
///
/// ```
/// use std::sync::Arc;
/// use split::guest::GuestEpt;
/// use split::shadow::{ShadowConfig, ShadowMmu, Vcpu};
/// use split::{AccessKind, Gfn, Gpa, Hpa, Level, LogMode, Memslot, Pfn};
/// use mmu_cache::{PagePool, alloc::ChunkAllocator};
///
/// let mmu = ShadowMmu::new(PagePool::new(ChunkAllocator::anonymous()), ShadowConfig::default())?;
/// mmu.add_memslot(Memslot::new(0, Gfn(0), 1024, Pfn(0x10_0000))?)?; // 4 MiB of L1 memory
/// // The guest hypervisor maps L2 [0, 4M) to L1 [0, 4M) with 2M pages.
/// let guest = Arc::new(GuestEpt::new(4, 0x8_0000..0x8_0100).unwrap());
/// guest.map(0, 0, Level::L2M, 0b111).unwrap();
/// guest.map(512, 512, Level::L2M, 0b111).unwrap();
/// let mut vcpu = Vcpu::new(0, guest);
/// let mut caches = mmu.new_caches();
/// let t = mmu.fault(&mut caches, &mut vcpu, Gpa(0x20_3000), AccessKind::Write)?;
/// assert_eq!((t.level, t.hpa), (Level::L2M, Hpa((0x10_0000 << 12) + 0x20_3000)));
///
/// mmu.enable_dirty_logging(0, LogMode::Classic)?; // splits the 2M leaf
/// assert_eq!(mmu.page_stats().pages_4k, 512);
/// # Ok::<(), split::shadow::ShadowError>(())
/// ```
pub struct ShadowMmu {
    config: ShadowConfig,
    pool: Arc<PagePool<ShadowTablePage>>,
    header_slab: Arc<Slab<ShadowPage>>,
    desc_slab: Arc<Slab<PteListDesc>>,
    state: Mutex<State>,
    split_caches: Mutex<ShadowCaches>,
}

impl fmt::Debug for ShadowMmu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShadowMmu")
            .field("config", &self.config)
            .field("stats", &self.page_stats())
            .field("pages", &self.shadow_pages())
            .finish()
    }
}

impl ShadowMmu {
    /// A shadow MMU whose tables and objects come from `pool`.
    pub fn new(
        pool: Arc<PagePool<ShadowTablePage>>,
        config: ShadowConfig,
    ) -> Result<Self, ShadowError> {
        let header_slab = Slab::new(pool.for_kind(), None)?;
        let desc_slab = Slab::new(pool.for_kind(), None)?;
        let mmu = Self {
            config,
            split_caches: Mutex::new(ShadowCaches {
                descriptors: ObjectCache::new(desc_slab.clone()).named("split-descriptors"),
                headers: ObjectCache::new(header_slab.clone()).named("split-headers"),
                // Unfilled: a split writes every entry of the page it takes
                // (`split_one`), so a fill would write each page twice.
                tables: PageCache::new(pool.clone()).named("split-shadow-pages"),
            }),
            pool,
            header_slab,
            desc_slab,
            state: Mutex::new(State {
                pages: PageMap::default(),
                buckets: vec![0; HASH_BUCKETS],
                slots: Vec::new(),
                stats: [0; 3],
                counters: ShadowCounters::default(),
            }),
        };
        Ok(mmu)
    }

    /// A fresh cache set for one vCPU's faults.
    pub fn new_caches(&self) -> ShadowCaches {
        ShadowCaches {
            descriptors: ObjectCache::new(self.desc_slab.clone()).named("vcpu-descriptors"),
            headers: ObjectCache::new(self.header_slab.clone()).named("vcpu-headers"),
            tables: PageCache::new(self.pool.clone())
                .with_init_value(ept::NON_PRESENT)
                .named("vcpu-shadow-pages"),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn split_cache_lock(&self) -> MutexGuard<'_, ShadowCaches> {
        self.split_caches.lock().unwrap_or_else(|p| p.into_inner())
    }

    // ----- memslots -------------------------------------------------------

    /// Adds a slot of L1 memory; neither its frames nor its host frames may
    /// overlap another slot's.
    pub fn add_memslot(&self, slot: Memslot) -> Result<Arc<Memslot>, ShadowError> {
        let slot = Arc::new(slot);
        let rmaps = SlotRmaps::new(slot.clone());
        let mut state = self.lock();
        if let Some(other) = state.slots.iter().map(|r| &r.slot).find(|other| {
            other.id() == slot.id()
                || (slot.base_gfn() < other.end_gfn() && other.base_gfn() < slot.end_gfn())
                || slot.host_overlaps(other)
        }) {
            return Err(MemslotError::Overlap {
                id: slot.id(),
                other: other.id(),
            }
            .into());
        }
        state.slots.push(rmaps);
        state.size_for_slots();
        Ok(slot)
    }

    /// Removes a slot: its leaves and the shadow pages of guest tables in
    /// it are zapped.
    pub fn remove_memslot(&self, id: u32) -> Result<(), ShadowError> {
        let slot = self.slot(id)?;
        let mut state = self.lock();
        self.zap_leaves(&mut state, slot.base_gfn().0, slot.end_gfn().0);
        let doomed: Vec<u64> = state
            .pages
            .values()
            .filter(|sp| !sp.role.direct && slot.contains(Gfn(sp.gfn)))
            .map(|sp| sp.hpa())
            .collect();
        for hpa in doomed {
            if state.pages.get(&hpa).is_some_and(|sp| !sp.invalid) {
                self.zap_sp(&mut state, hpa);
            }
        }
        state.slots.retain(|r| r.slot.id() != id);
        Ok(())
    }

    /// The slot with this id.
    pub fn slot(&self, id: u32) -> Result<Arc<Memslot>, ShadowError> {
        self.lock()
            .slots
            .iter()
            .find(|r| r.slot.id() == id)
            .map(|r| r.slot.clone())
            .ok_or(ShadowError::Memslot(MemslotError::NoSuchSlot { id }))
    }

    // ----- stats ------------------------------------------------------------

    /// Leaf counts kept incrementally.
    pub fn page_stats(&self) -> PageStats {
        let [pages_4k, pages_2m, pages_1g] = self.lock().stats;
        PageStats {
            pages_4k,
            pages_2m,
            pages_1g,
        }
    }

    /// Work counters.
    pub fn counters(&self) -> ShadowCounters {
        self.lock().counters
    }

    /// Entries in the rmap of L1 frame `gfn` at `level`.
    pub fn rmap_len(&self, gfn: Gfn, level: Level) -> usize {
        let gfn = gfn.0;
        let state = self.lock();
        state.slot_index(gfn).map_or(0, |si| {
            let mut entries = 0;
            state.slots[si].for_each_entry(level, gfn, |_| entries += 1);
            entries
        })
    }

    /// Counts everything again from the tables and lists; leaf counts must
    /// equal [`page_stats`](Self::page_stats), rmap entries the leaves, and
    /// `broken_parents` must be zero.
    pub fn recount(&self) -> ShadowRecount {
        let state = self.lock();
        let mut recount = ShadowRecount {
            pages: state.pages.len(),
            ..ShadowRecount::default()
        };
        for sp in state.pages.values() {
            let level = sp.role.entry_level();
            let words = sp.page.as_ref().expect("live pages have a table").words();
            for &bits in words {
                let entry = Entry::from_bits(bits);
                if entry.is_leaf(level) {
                    match level.get() {
                        1 => recount.stats.pages_4k += 1,
                        2 => recount.stats.pages_2m += 1,
                        _ => recount.stats.pages_1g += 1,
                    }
                }
            }
            recount.descriptors += sp.parents.descriptors();
            sp.parents.for_each(|parent| {
                let pointer = state
                    .pages
                    .get(&(parent & !0xfff))
                    .map(|_| state.spte(parent));
                if pointer.is_none_or(|e| !e.is_present() || e.bits() & ept::ADDR_MASK != sp.hpa())
                {
                    recount.broken_parents += 1;
                }
            });
        }
        for rmaps in &state.slots {
            recount.descriptors += rmaps.for_each_rmapped(|level, gfn, addr| {
                recount.rmap_entries += 1;
                let leaf = state
                    .pages
                    .get(&(addr & !0xfff))
                    .map(|_| state.spte(addr))
                    .filter(|leaf| leaf.is_leaf(level));
                let frame = rmaps.slot.host_pfn(Gfn(gfn));
                if leaf.is_none_or(|leaf| Hpa(leaf.addr(level)).pfn() != frame) {
                    recount.broken_rmaps += 1;
                }
            });
        }
        recount
    }

    /// Pages this MMU holds from its pool: shadow tables, the split caches'
    /// pages and the slabs' pages (vCPU caches not included).
    pub fn pages_held(&self) -> usize {
        let split = self.split_cache_lock().tables.nr_free();
        self.lock().pages.len() + split + self.header_slab.pages() + self.desc_slab.pages()
    }

    /// Descriptors and free objects in the split caches: (descriptors,
    /// headers, table pages), and the descriptor cache's capacity.
    pub fn split_cache_levels(&self) -> (usize, usize, usize, usize) {
        let caches = self.split_cache_lock();
        (
            caches.descriptors.nr_free(),
            caches.headers.nr_free(),
            caches.tables.nr_free(),
            caches.descriptors.capacity(),
        )
    }
}
