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

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use mmu_cache::alloc::NoAllocSection;
use mmu_cache::{
    CacheError, ObjectCache, Page, PageCache, PageKind, PagePool, Slab, SlabBox, SlabError,
};

use crate::ept::{
    self, ACCESSED, AccessKind, DIRTY, Entry, EptCaps, EptError, Level, MemType, RWX, WRITE,
};
use crate::guest::GuestTables;
use crate::memslot::{LogMode, Memslot, MemslotError};
use crate::tdp::{Access, PageStats, Translation};

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
/// Buckets of the shadow-page hash.
const HASH_BUCKETS: usize = 1 << 12;
/// Splits between two voluntary releases of the lock.
const SPLITS_PER_YIELD: u64 = 64;
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
        ngpa: u64,
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
        ngpa: u64,
        /// What is wrong with the entry.
        source: EptError,
    },
    /// The nested address does not fit the guest's paging depth.
    #[error("nested gpa {ngpa:#x} is beyond the guest's {levels}-level EPT")]
    AddressTooWide {
        /// The nested guest physical address.
        ngpa: u64,
        /// The guest's paging depth.
        levels: u8,
    },
    /// The guest maps the nested address to an L1 frame no memslot holds.
    #[error("no memslot holds L1 gfn {gfn:#x}")]
    NoSlot {
        /// The L1 guest frame.
        gfn: u64,
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
        hpa: u64,
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

/// A descriptor of an rmap or parent list: up to [`PTE_LIST_EXT`] entry
/// addresses and the next descriptor.
pub struct PteListDesc {
    sptes: [u64; PTE_LIST_EXT],
    count: u8,
    more: Option<SlabBox<PteListDesc>>,
}

impl Default for PteListDesc {
    fn default() -> Self {
        Self {
            sptes: [0; PTE_LIST_EXT],
            count: 0,
            more: None,
        }
    }
}

impl fmt::Debug for PteListDesc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PteListDesc")
            .field("count", &self.count)
            .field("more", &self.more.is_some())
            .finish()
    }
}

/// A list of entry addresses: empty, one address, or a descriptor chain
/// whose first descriptor is the only one that may be partly full.
#[derive(Debug, Default)]
enum PteList {
    #[default]
    Empty,
    One(u64),
    Many(SlabBox<PteListDesc>),
}

impl PteList {
    /// Adds `spte`. The empty case, which every split child and most faults
    /// meet, is inlined; the rest takes descriptors from `descs`.
    #[inline]
    fn add(&mut self, spte: u64, descs: &mut ObjectCache<PteListDesc>) -> Result<(), CacheError> {
        if let Self::Empty = self {
            *self = Self::One(spte);
            return Ok(());
        }
        self.add_to_list(spte, descs)
    }

    #[inline(never)]
    fn add_to_list(
        &mut self,
        spte: u64,
        descs: &mut ObjectCache<PteListDesc>,
    ) -> Result<(), CacheError> {
        match self {
            Self::Empty => *self = Self::One(spte),
            Self::One(first) => {
                let first = *first;
                let mut desc = descs.alloc()?;
                *desc = PteListDesc::default();
                desc.sptes[0] = first;
                desc.sptes[1] = spte;
                desc.count = 2;
                *self = Self::Many(desc);
            }
            Self::Many(head) if usize::from(head.count) < PTE_LIST_EXT => {
                let at = usize::from(head.count);
                head.sptes[at] = spte;
                head.count += 1;
            }
            Self::Many(_) => {
                let mut desc = descs.alloc()?;
                *desc = PteListDesc::default();
                desc.sptes[0] = spte;
                desc.count = 1;
                let Self::Many(old) = std::mem::take(self) else {
                    unreachable!("matched above")
                };
                desc.more = Some(old);
                *self = Self::Many(desc);
            }
        }
        Ok(())
    }

    /// Removes `spte`; the hole is filled with the last entry of the first
    /// descriptor, which is dropped when it empties.
    fn remove(&mut self, spte: u64) -> bool {
        match self {
            Self::Empty => false,
            Self::One(only) => {
                let found = *only == spte;
                if found {
                    *self = Self::Empty;
                }
                found
            }
            Self::Many(head) => {
                let last_index = usize::from(head.count) - 1;
                let last = head.sptes[last_index];
                let mut found = false;
                let mut desc: &mut PteListDesc = head;
                loop {
                    let count = usize::from(desc.count);
                    if let Some(i) = desc.sptes[..count].iter().position(|&s| s == spte) {
                        desc.sptes[i] = last;
                        found = true;
                        break;
                    }
                    match desc.more.as_deref_mut() {
                        Some(next) => desc = next,
                        None => break,
                    }
                }
                if !found {
                    return false;
                }
                head.count -= 1;
                if head.count == 0 {
                    *self = match head.more.take() {
                        Some(next) => Self::Many(next),
                        None => Self::Empty,
                    };
                }
                true
            }
        }
    }

    fn first(&self) -> Option<u64> {
        match self {
            Self::Empty => None,
            Self::One(only) => Some(*only),
            Self::Many(head) => Some(head.sptes[0]),
        }
    }

    fn for_each(&self, mut visit: impl FnMut(u64)) {
        match self {
            Self::Empty => {}
            Self::One(only) => visit(*only),
            Self::Many(head) => {
                let mut desc: Option<&PteListDesc> = Some(head);
                while let Some(d) = desc {
                    d.sptes[..usize::from(d.count)]
                        .iter()
                        .for_each(|&s| visit(s));
                    desc = d.more.as_deref();
                }
            }
        }
    }

    fn len(&self) -> usize {
        let mut n = 0;
        self.for_each(|_| n += 1);
        n
    }

    fn descriptors(&self) -> usize {
        let mut n = 0;
        if let Self::Many(head) = self {
            let mut desc: Option<&PteListDesc> = Some(head);
            while let Some(d) = desc {
                n += 1;
                desc = d.more.as_deref();
            }
        }
        n
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
            hpa: self.hpa(),
            gfn: self.gfn,
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
    pub hpa: u64,
    /// The frame the page is keyed by.
    pub gfn: u64,
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
    pub fn root_hpa(&self) -> Option<u64> {
        self.root
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
}

/// Rmaps of one memslot: per leaf level, one list per frame at that level.
struct SlotRmaps {
    slot: Arc<Memslot>,
    levels: [Vec<PteList>; 3],
}

impl SlotRmaps {
    fn new(slot: Arc<Memslot>) -> Self {
        let levels = [0u32, 9, 18].map(|shift| {
            let count = ((slot.end_gfn() - 1) >> shift) - (slot.base_gfn() >> shift) + 1;
            (0..count).map(|_| PteList::Empty).collect()
        });
        Self { slot, levels }
    }

    fn index(&self, level: Level, gfn: u64) -> usize {
        let shift = 9 * u32::from(level.get() - 1);
        ((gfn >> shift) - (self.slot.base_gfn() >> shift)) as usize
    }

    fn head(&mut self, level: Level, gfn: u64) -> &mut PteList {
        let index = self.index(level, gfn);
        &mut self.levels[usize::from(level.get() - 1)][index]
    }
}

struct State {
    pages: HashMap<u64, SlabBox<ShadowPage>>,
    buckets: Vec<u64>,
    slots: Vec<SlotRmaps>,
    stats: [u64; 3],
    counters: ShadowCounters,
}

fn bucket(gfn: u64) -> usize {
    (gfn.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - HASH_BUCKETS.trailing_zeros())) as usize
}

fn guest_access(leaf: Entry) -> u64 {
    (leaf.bits() >> GUEST_ACCESS_SHIFT) & RWX
}

fn stat_index(level: Level) -> usize {
    usize::from(level.get() - 1)
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
        self.slots.iter().position(|r| r.slot.contains(gfn))
    }

    /// The L1 frame a leaf maps (its first frame for a huge leaf).
    fn leaf_gfn(&self, leaf: Entry, level: Level) -> u64 {
        let pfn = leaf.addr(level) >> 12;
        self.slots
            .iter()
            .find_map(|r| r.slot.gfn_of_host_pfn(pfn))
            .expect("every leaf maps a memslot frame")
    }

    fn rmap(&mut self, level: Level, gfn: u64) -> &mut PteList {
        let index = self
            .slot_index(gfn)
            .expect("rmapped frames are in a memslot");
        self.slots[index].head(level, gfn)
    }

    fn find(&self, gfn: u64, role: Role) -> Option<u64> {
        let mut cursor = self.buckets[bucket(gfn)];
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
        let mut cursor = self.buckets[bucket(gfn)];
        while cursor != 0 {
            let sp = self.sp(cursor);
            if sp.gfn == gfn && sp.role != role && sp.unsync {
                return Some(cursor);
            }
            cursor = sp.hash_next;
        }
        None
    }

    fn hash_insert(&mut self, hpa: u64) {
        let b = bucket(self.sp(hpa).gfn);
        let head = self.buckets[b];
        self.sp_mut(hpa).hash_next = head;
        self.buckets[b] = hpa;
    }

    fn hash_remove(&mut self, hpa: u64) {
        let b = bucket(self.sp(hpa).gfn);
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

/// The walk of the guest's EPT for one nested frame.
struct GuestWalk {
    /// The guest table frame per level (index = level number).
    tables: [u64; 6],
    leaf_level: Level,
    /// The L1 frame of the 4K page.
    gfn: u64,
    /// Effective permissions: the AND of every level's.
    access: u64,
    /// Permissions accumulated above each level (index = level number).
    access_above: [u64; 6],
}

/// Walks the guest's EPT for an access of `kind` at `ngpa`, as the CPU
/// walks an EPT (SDM "EPT Translation Mechanism"): every entry on the way
/// is checked for misconfiguration against `caps`, the permissions are the
/// AND of every level's, and the access needs its own bit (R for a read, W
/// for a write, X for a fetch) in that AND. A non-present entry or a
/// missing bit is a violation at the level where the walk stopped.
fn walk_guest(
    guest: &dyn GuestTables,
    caps: EptCaps,
    ngpa: u64,
    kind: AccessKind,
) -> Result<GuestWalk, ShadowError> {
    let ngfn = ngpa >> 12;
    let mut walk = GuestWalk {
        tables: [0; 6],
        leaf_level: Level::L4K,
        gfn: 0,
        access: RWX,
        access_above: [RWX; 6],
    };
    let mut table = guest.root_gfn();
    let mut level = Level::new(guest.levels()).unwrap_or(Level::PML4);
    loop {
        walk.tables[usize::from(level.get())] = table;
        walk.access_above[usize::from(level.get())] = walk.access;
        let entry = guest.read_entry(table, level.index(ngfn));
        entry
            .validate_with(level, caps)
            .map_err(|source| ShadowError::GuestMisconfig { ngpa, source })?;
        walk.access &= entry.perms();
        if !entry.is_present() || !kind.allowed_by(walk.access) {
            return Err(ShadowError::GuestViolation {
                ngpa,
                level,
                access: kind,
            });
        }
        if entry.is_leaf(level) {
            walk.leaf_level = level;
            walk.gfn = (entry.addr(level) >> 12) + (ngfn & (level.entry_pages() - 1));
            return Ok(walk);
        }
        table = entry.addr(level) >> 12;
        level = level.below().expect("4K entries are leaves");
    }
}

/// The shadow MMU of one VM running nested guests.
///
/// ```
/// use std::sync::Arc;
/// use split::guest::GuestEpt;
/// use split::shadow::{ShadowConfig, ShadowMmu, Vcpu};
/// use split::{AccessKind, Level, LogMode, Memslot};
/// use mmu_cache::{PagePool, alloc::ChunkAllocator};
///
/// let mmu = ShadowMmu::new(PagePool::new(ChunkAllocator::anonymous()), ShadowConfig::default())?;
/// mmu.add_memslot(Memslot::new(0, 0, 1024, 0x10_0000)?)?; // 4 MiB of L1 memory
/// // The guest hypervisor maps L2 [0, 4M) to L1 [0, 4M) with 2M pages.
/// let guest = Arc::new(GuestEpt::new(4, 0x8_0000..0x8_0100).unwrap());
/// guest.map(0, 0, Level::L2M, 0b111).unwrap();
/// guest.map(512, 512, Level::L2M, 0b111).unwrap();
/// let mut vcpu = Vcpu::new(0, guest);
/// let mut caches = mmu.new_caches();
/// let t = mmu.fault(&mut caches, &mut vcpu, 0x20_3000, AccessKind::Write)?;
/// assert_eq!((t.level, t.hpa), (Level::L2M, (0x10_0000 << 12) + 0x20_3000));
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
                tables: PageCache::new(pool.clone())
                    .with_init_value(ept::NON_PRESENT)
                    .named("split-shadow-pages"),
            }),
            pool,
            header_slab,
            desc_slab,
            state: Mutex::new(State {
                pages: HashMap::new(),
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
        Ok(slot)
    }

    /// Removes a slot: its leaves and the shadow pages of guest tables in
    /// it are zapped.
    pub fn remove_memslot(&self, id: u32) -> Result<(), ShadowError> {
        let slot = self.slot(id)?;
        let mut state = self.lock();
        self.zap_leaves(&mut state, slot.base_gfn(), slot.end_gfn());
        let doomed: Vec<u64> = state
            .pages
            .values()
            .filter(|sp| !sp.role.direct && slot.contains(sp.gfn))
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

    // ----- shadow pages ---------------------------------------------------

    /// Finds the shadow page `(gfn, role)` or creates it from `caches`.
    ///
    /// With a vCPU, a stale (unsync) page found is synced from that vCPU's
    /// guest tables. Without one (the split path) only direct roles may be
    /// asked for: direct pages are never unsync. Other pages keyed by `gfn`
    /// that are unsync are zapped when `role` is above 4K, since the guest
    /// now uses that frame as a higher-level table.
    ///
    /// The caches are topped up to their fault-path minimums first; the
    /// page is created unlinked.
    ///
    /// # Panics
    ///
    /// When `vcpu` is `None` and `role` is not direct.
    pub fn get_shadow_page(
        &self,
        caches: &mut ShadowCaches,
        vcpu: Option<&Vcpu>,
        gfn: u64,
        role: Role,
    ) -> Result<(ShadowPageInfo, bool), ShadowError> {
        caches.topup()?;
        let mut state = self.lock();
        state.pages.reserve(1);
        let _no_alloc = NoAllocSection::enter();
        let (hpa, created) = self.get_sp(&mut state, caches, vcpu, gfn, role)?;
        Ok((state.sp(hpa).info(), created))
    }

    fn get_sp(
        &self,
        state: &mut State,
        caches: &mut ShadowCaches,
        vcpu: Option<&Vcpu>,
        gfn: u64,
        role: Role,
    ) -> Result<(u64, bool), ShadowError> {
        assert!(
            vcpu.is_some() || role.direct,
            "a shadow page asked for without a vCPU must be direct"
        );
        if role.level > 1 {
            while let Some(stale) = state.find_unsync_other(gfn, role) {
                self.zap_sp(state, stale);
            }
        }
        if let Some(hpa) = state.find(gfn, role) {
            if state.sp(hpa).unsync {
                let vcpu = vcpu.expect("only non-direct pages are unsync");
                self.sync_sp(state, hpa, &*vcpu.guest);
            }
            return Ok((hpa, false));
        }
        let page = caches.tables.alloc()?;
        let mut header = caches.headers.alloc()?;
        *header = ShadowPage {
            gfn,
            role,
            page: Some(page),
            ..ShadowPage::default()
        };
        let hpa = header.hpa();
        state.pages.insert(hpa, header);
        state.hash_insert(hpa);
        state.counters.pages_created += 1;
        Ok((hpa, true))
    }

    /// The shadow page `(gfn, role)`, if one is valid.
    pub fn find_shadow_page(&self, gfn: u64, role: Role) -> Option<ShadowPageInfo> {
        let state = self.lock();
        state.find(gfn, role).map(|hpa| state.sp(hpa).info())
    }

    /// The shadow page at `hpa`.
    pub fn shadow_page(&self, hpa: u64) -> Option<ShadowPageInfo> {
        self.lock().pages.get(&hpa).map(|sp| sp.info())
    }

    /// Shadow pages alive (roots zapped while in use included).
    pub fn shadow_pages(&self) -> usize {
        self.lock().pages.len()
    }

    /// Points `parent_addr` at the shadow page `child`.
    fn link(
        &self,
        state: &mut State,
        descs: &mut ObjectCache<PteListDesc>,
        parent_addr: u64,
        child: u64,
    ) -> Result<(), ShadowError> {
        state.sp_mut(child).parents.add(parent_addr, descs)?;
        state.set_spte(parent_addr, Entry::table(child));
        Ok(())
    }

    // ----- zap --------------------------------------------------------------

    /// Zaps the shadow page at `hpa`: its entries are dropped (children
    /// left without a parent are zapped too), the entries pointing at it are
    /// cleared, and it is freed, or only marked invalid while a vCPU still
    /// uses it as a root.
    pub fn zap_shadow_page(&self, hpa: u64) -> Result<(), ShadowError> {
        let mut state = self.lock();
        if state.pages.get(&hpa).is_none_or(|sp| sp.invalid) {
            return Err(ShadowError::NoSuchPage { hpa });
        }
        let _no_alloc = NoAllocSection::enter();
        self.zap_sp(&mut state, hpa);
        Ok(())
    }

    /// Zaps every shadow page; roots in use become invalid and are replaced
    /// at their vCPU's next fault.
    pub fn zap_all(&self) {
        let mut state = self.lock();
        let _no_alloc = NoAllocSection::enter();
        loop {
            let next = state
                .pages
                .values()
                .find(|sp| !sp.invalid && sp.parents.first().is_none())
                .map(|sp| sp.hpa());
            match next {
                Some(hpa) => self.zap_sp(&mut state, hpa),
                None => break,
            }
        }
    }

    /// Unmaps every leaf that maps an L1 frame in `[start_gfn, end_gfn)`
    /// (a huge leaf that overlaps only partly goes whole).
    pub fn zap_gfn_range(&self, start_gfn: u64, end_gfn: u64) {
        let mut state = self.lock();
        let _no_alloc = NoAllocSection::enter();
        self.zap_leaves(&mut state, start_gfn, end_gfn);
    }

    fn zap_leaves(&self, state: &mut State, start: u64, end: u64) {
        for level in [Level::L4K, Level::L2M, Level::L1G] {
            let pages = level.entry_pages();
            for si in 0..state.slots.len() {
                let slot = state.slots[si].slot.clone();
                let first = start.max(slot.base_gfn()) & !(pages - 1);
                let last = end.min(slot.end_gfn());
                let mut gfn = first;
                while gfn < last {
                    let at = gfn.max(slot.base_gfn());
                    while let Some(addr) = state.slots[si].head(level, at).first() {
                        self.drop_leaf(state, addr, level);
                    }
                    gfn += pages;
                }
            }
        }
    }

    fn drop_leaf(&self, state: &mut State, addr: u64, level: Level) {
        let leaf = state.spte(addr);
        let gfn = state.leaf_gfn(leaf, level);
        let removed = state.rmap(level, gfn).remove(addr);
        debug_assert!(removed, "leaf {addr:#x} was not in its rmap");
        state.set_spte(addr, Entry::NON_PRESENT);
        state.stats[stat_index(level)] -= 1;
    }

    fn unlink_child(&self, state: &mut State, addr: u64) {
        let child = state.spte(addr).bits() & ept::ADDR_MASK;
        state.set_spte(addr, Entry::NON_PRESENT);
        let sp = state.sp_mut(child);
        let removed = sp.parents.remove(addr);
        debug_assert!(removed, "parent {addr:#x} missing from {child:#x}");
        if sp.parents.first().is_none() && sp.root_count == 0 {
            self.zap_sp(state, child);
        }
    }

    fn zap_sp(&self, state: &mut State, hpa: u64) {
        let level = state.sp(hpa).role.entry_level();
        for index in 0..512u64 {
            let addr = hpa + index * 8;
            let entry = state.spte(addr);
            if !entry.is_present() {
                continue;
            }
            if entry.is_leaf(level) {
                self.drop_leaf(state, addr, level);
            } else {
                self.unlink_child(state, addr);
            }
        }
        while let Some(parent) = state.sp(hpa).parents.first() {
            state.set_spte(parent, Entry::NON_PRESENT);
            state.sp_mut(hpa).parents.remove(parent);
        }
        state.hash_remove(hpa);
        state.counters.pages_zapped += 1;
        let sp = state.sp_mut(hpa);
        sp.unsync = false;
        if sp.root_count > 0 {
            sp.invalid = true;
        } else {
            state.pages.remove(&hpa);
        }
    }

    // ----- unsync and sync ------------------------------------------------

    /// The guest wrote its table at L1 frame `table_gfn` (the write that a
    /// write-protected table traps). Shadow pages of a 4K-level table become
    /// unsync and are re-read at the next sync; those of higher levels are
    /// zapped. Returns how many shadow pages were affected.
    pub fn guest_table_written(&self, table_gfn: u64) -> usize {
        let mut state = self.lock();
        let _no_alloc = NoAllocSection::enter();
        let mut affected = 0;
        let mut cursor = state.buckets[bucket(table_gfn)];
        while cursor != 0 {
            let sp = state.sp_mut(cursor);
            let next = sp.hash_next;
            if sp.gfn == table_gfn && !sp.role.direct && sp.role.level == 1 {
                if !sp.unsync {
                    sp.unsync = true;
                    state.counters.unsyncs += 1;
                }
                affected += 1;
            }
            cursor = next;
        }
        loop {
            let mut cursor = state.buckets[bucket(table_gfn)];
            let mut upper = None;
            while cursor != 0 {
                let sp = state.sp(cursor);
                if sp.gfn == table_gfn && !sp.role.direct && sp.role.level > 1 {
                    upper = Some(cursor);
                    break;
                }
                cursor = sp.hash_next;
            }
            let Some(hpa) = upper else { break };
            self.zap_sp(&mut state, hpa);
            affected += 1;
        }
        affected
    }

    /// Re-reads every unsync shadow page from `vcpu`'s guest tables (what a
    /// guest INVEPT leads to). Returns how many were synced.
    pub fn sync(&self, vcpu: &Vcpu) -> usize {
        let mut state = self.lock();
        let _no_alloc = NoAllocSection::enter();
        let mut synced = 0;
        while let Some(hpa) = state.pages.values().find(|sp| sp.unsync).map(|sp| sp.hpa()) {
            self.sync_sp(&mut state, hpa, &*vcpu.guest);
            synced += 1;
        }
        synced
    }

    /// Drops every leaf of the unsync 4K-level page at `hpa` that no longer
    /// matches the guest's entry; later faults map the new ones.
    fn sync_sp(&self, state: &mut State, hpa: u64, guest: &dyn GuestTables) {
        let table_gfn = state.sp(hpa).gfn;
        let access_above = u64::from(state.sp(hpa).role.access);
        for index in 0..512u64 {
            let addr = hpa + index * 8;
            let leaf = state.spte(addr);
            if !leaf.is_present() {
                continue;
            }
            let wanted = guest.read_entry(table_gfn, index as usize);
            let keep = wanted.is_present()
                && wanted
                    .validate_with(Level::L4K, self.config.ept_caps)
                    .is_ok()
                && guest_access(leaf) == wanted.perms() & access_above
                && state
                    .slot_index(wanted.addr(Level::L4K) >> 12)
                    .map(|si| &state.slots[si].slot)
                    .is_some_and(|slot| {
                        slot.host_pfn(wanted.addr(Level::L4K) >> 12) << 12 == leaf.addr(Level::L4K)
                    });
            if !keep {
                self.drop_leaf(state, addr, Level::L4K);
            }
        }
        state.sp_mut(hpa).unsync = false;
        state.counters.syncs += 1;
    }

    // ----- faults ---------------------------------------------------------

    fn check_width(vcpu: &Vcpu, ngpa: u64) -> Result<(), ShadowError> {
        if ngpa >> (vcpu.top_level().shift() + 9) != 0 {
            return Err(ShadowError::AddressTooWide {
                ngpa,
                levels: vcpu.guest.levels(),
            });
        }
        Ok(())
    }

    fn load_root(
        &self,
        state: &mut State,
        caches: &mut ShadowCaches,
        vcpu: &mut Vcpu,
    ) -> Result<u64, ShadowError> {
        if let Some(root) = vcpu.root {
            if !state.sp(root).invalid {
                return Ok(root);
            }
            self.release_root(state, vcpu);
        }
        let role = Role::shadowing(vcpu.top_level(), RWX);
        let (root, _) = self.get_sp(state, caches, Some(vcpu), vcpu.guest.root_gfn(), role)?;
        state.sp_mut(root).root_count += 1;
        vcpu.root = Some(root);
        Ok(root)
    }

    fn release_root(&self, state: &mut State, vcpu: &mut Vcpu) {
        let Some(root) = vcpu.root.take() else { return };
        let sp = state.sp_mut(root);
        sp.root_count -= 1;
        if sp.root_count == 0 && sp.invalid {
            state.pages.remove(&root);
        }
    }

    /// Releases `vcpu`'s root (a root zapped while in use is freed with its
    /// last user).
    pub fn unload_root(&self, vcpu: &mut Vcpu) {
        let mut state = self.lock();
        self.release_root(&mut state, vcpu);
    }

    /// Handles a fault of `vcpu` at nested address `ngpa`: tops up `caches`
    /// (outside the lock), walks the guest's EPT, and builds the shadow path
    /// with the largest leaf that both the guest mapping and the memslot
    /// allow (4K while dirty logging). A guest EPT that denies the access
    /// (see [`AccessKind`]: a read needs R at every level, a write W, a
    /// fetch X) is reported as [`ShadowError::GuestViolation`], and no
    /// shadow leaf is made for it. The shadow leaf carries the guest's
    /// effective permissions, so an execute-only guest mapping gives an
    /// execute-only shadow leaf that a read cannot use.
    pub fn fault(
        &self,
        caches: &mut ShadowCaches,
        vcpu: &mut Vcpu,
        ngpa: u64,
        kind: AccessKind,
    ) -> Result<Translation, ShadowError> {
        let write = kind == AccessKind::Write;
        Self::check_width(vcpu, ngpa)?;
        caches.topup()?;
        let levels = usize::from(vcpu.guest.levels());
        let mut state = self.lock();
        state.pages.reserve(levels + 1);
        let _no_alloc = NoAllocSection::enter();
        state.counters.faults += 1;
        let walk = walk_guest(&*vcpu.guest, self.config.ept_caps, ngpa, kind)?;
        let slot = state
            .slot_index(walk.gfn)
            .map(|si| state.slots[si].slot.clone())
            .ok_or(ShadowError::NoSlot { gfn: walk.gfn })?;
        let root = self.load_root(&mut state, caches, vcpu)?;
        let vcpu: &Vcpu = vcpu;
        let ngfn = ngpa >> 12;
        let goal = if slot.logging() {
            Level::L4K
        } else {
            walk.leaf_level.min(slot.max_level(walk.gfn))
        };
        let mut sp = root;
        let mut level = vcpu.top_level();
        loop {
            let addr = sp + 8 * level.index(ngfn) as u64;
            let spte = state.spte(addr);
            if level == goal {
                let base_gfn = walk.gfn & !(level.entry_pages() - 1);
                let current = spte.is_leaf(level)
                    && spte.addr(level) == slot.host_pfn(base_gfn) << 12
                    && guest_access(spte) == walk.access;
                if current {
                    let leaf = self.touch_leaf(&mut state, &slot, addr, spte, &walk, write);
                    return Ok(self.translation(leaf, level, ngpa));
                }
                if spte.is_leaf(level) {
                    // Stale: the guest changed its mapping (an unsync page).
                    self.drop_leaf(&mut state, addr, level);
                } else if spte.is_present() {
                    // A table where a huge leaf fits again (after dirty logging).
                    self.unlink_child(&mut state, addr);
                }
                let leaf =
                    self.install_leaf(&mut state, caches, &slot, addr, level, &walk, write)?;
                return Ok(self.translation(leaf, level, ngpa));
            }
            let below = level.below().expect("the goal is at or above 4K");
            if spte.is_present() && !spte.is_leaf(level) {
                sp = spte.addr(level);
                level = below;
                continue;
            }
            if spte.is_present() {
                // A huge leaf above the goal: a write under dirty logging.
                self.drop_leaf(&mut state, addr, level);
                state.counters.lazy_splits += 1;
            }
            let (gfn, role) = if below >= walk.leaf_level {
                let at = usize::from(below.get());
                (
                    walk.tables[at],
                    Role::shadowing(below, walk.access_above[at]),
                )
            } else {
                (
                    walk.gfn & !(level.entry_pages() - 1),
                    Role::direct(below, walk.access),
                )
            };
            let (child, _) = self.get_sp(&mut state, caches, Some(vcpu), gfn, role)?;
            self.link(&mut state, &mut caches.descriptors, addr, child)?;
            sp = child;
            level = below;
        }
    }

    fn translation(&self, leaf: Entry, level: Level, ngpa: u64) -> Translation {
        let offset = ngpa & (level.entry_bytes() - 1);
        Translation {
            hpa: leaf.addr(level) + offset,
            perms: leaf.perms(),
            memtype: leaf.memtype_bits(),
            level,
            entry: leaf,
        }
    }

    fn touch_leaf(
        &self,
        state: &mut State,
        slot: &Memslot,
        addr: u64,
        leaf: Entry,
        walk: &GuestWalk,
        write: bool,
    ) -> Entry {
        let touched = if write {
            if slot.logging() {
                slot.mark_dirty(walk.gfn);
            }
            leaf.with(WRITE | ACCESSED | DIRTY)
        } else {
            leaf.with(ACCESSED)
        };
        state.set_spte(addr, touched);
        touched
    }

    #[allow(clippy::too_many_arguments)]
    fn install_leaf(
        &self,
        state: &mut State,
        caches: &mut ShadowCaches,
        slot: &Memslot,
        addr: u64,
        level: Level,
        walk: &GuestWalk,
        write: bool,
    ) -> Result<Entry, ShadowError> {
        let base_gfn = walk.gfn & !(level.entry_pages() - 1);
        let mut perms = walk.access;
        if slot.logging() && !write {
            perms &= !WRITE;
        }
        let mut leaf = Entry::leaf(
            level,
            slot.host_pfn(base_gfn) << 12,
            perms,
            self.config.memtype,
        )?
        .with(ACCESSED | (walk.access << GUEST_ACCESS_SHIFT));
        if write {
            leaf = leaf.with(DIRTY);
            if slot.logging() {
                slot.mark_dirty(walk.gfn);
            }
        }
        state
            .rmap(level, base_gfn)
            .add(addr, &mut caches.descriptors)?;
        state.set_spte(addr, leaf);
        state.stats[stat_index(level)] += 1;
        Ok(leaf)
    }

    /// What the hardware walker does for a nested guest access: follow the
    /// vCPU's shadow tables and set the accessed (and dirty) bits; a missing
    /// leaf, or a leaf without the access's bit (R for a read, W for a
    /// write, X for a fetch), is a miss for [`fault`](Self::fault).
    pub fn access(&self, vcpu: &Vcpu, ngpa: u64, kind: AccessKind) -> Access {
        let write = kind == AccessKind::Write;
        let Some(root) = vcpu.root else {
            return Access::Miss;
        };
        let mut state = self.lock();
        if state.pages.get(&root).is_none_or(|sp| sp.invalid) {
            return Access::Miss;
        }
        let Some((addr, level, leaf)) = Self::find_leaf(&state, root, vcpu.top_level(), ngpa)
        else {
            return Access::Miss;
        };
        if !kind.allowed_by(leaf.perms()) {
            return Access::Miss;
        }
        let bits = if write { ACCESSED | DIRTY } else { ACCESSED };
        state.set_spte(addr, leaf.with(bits));
        Access::Hit(self.translation(leaf, level, ngpa).hpa)
    }

    fn find_leaf(state: &State, root: u64, top: Level, ngpa: u64) -> Option<(u64, Level, Entry)> {
        let ngfn = ngpa >> 12;
        let mut sp = root;
        let mut level = top;
        loop {
            let addr = sp + 8 * level.index(ngfn) as u64;
            let spte = state.spte(addr);
            if !spte.is_present() {
                return None;
            }
            if spte.is_leaf(level) {
                return Some((addr, level, spte));
            }
            sp = spte.addr(level);
            level = level.below()?;
        }
    }

    /// A nested guest write: [`access`](Self::access), faulting on a miss.
    pub fn write(
        &self,
        caches: &mut ShadowCaches,
        vcpu: &mut Vcpu,
        ngpa: u64,
    ) -> Result<u64, ShadowError> {
        match self.access(vcpu, ngpa, AccessKind::Write) {
            Access::Hit(hpa) => Ok(hpa),
            Access::Miss => self
                .fault(caches, vcpu, ngpa, AccessKind::Write)
                .map(|t| t.hpa),
        }
    }

    /// Translates `ngpa` through `vcpu`'s shadow tables, without side effects.
    pub fn translate(&self, vcpu: &Vcpu, ngpa: u64) -> Option<Translation> {
        let root = vcpu.root?;
        let state = self.lock();
        if state.pages.get(&root).is_none_or(|sp| sp.invalid) {
            return None;
        }
        let (_, level, leaf) = Self::find_leaf(&state, root, vcpu.top_level(), ngpa)?;
        Some(self.translation(leaf, level, ngpa))
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
    pub fn rmap_len(&self, gfn: u64, level: Level) -> usize {
        let mut state = self.lock();
        match state.slot_index(gfn) {
            Some(si) => state.slots[si].head(level, gfn).len(),
            None => 0,
        }
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
            for lists in &rmaps.levels {
                for list in lists {
                    recount.rmap_entries += list.len();
                    recount.descriptors += list.descriptors();
                }
            }
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

    // ----- splitting ------------------------------------------------------

    /// Splits every huge leaf that maps L1 frames in `[start_gfn, end_gfn)`
    /// down to `target`, 1G leaves first: each becomes a direct shadow page
    /// of 512 children with the same bits (the page-size bit cleared only at
    /// 4K). No vCPU is involved. Uses the per-VM split caches; when they
    /// fall below what one split needs, the lock is dropped, they are
    /// topped up, and the walk resumes. Returns the number of splits.
    pub fn split_huge_pages(
        &self,
        start_gfn: u64,
        end_gfn: u64,
        target: Level,
    ) -> Result<u64, ShadowError> {
        let mut caches = self.split_cache_lock();
        let mut splits = 0;
        let mut state = self.lock();
        state.pages.reserve(SPLITS_PER_YIELD as usize);
        let mut since_yield = 0;
        for level in [Level::L1G, Level::L2M] {
            if level <= target {
                continue;
            }
            let pages = level.entry_pages();
            let mut gfn = start_gfn & !(pages - 1);
            while gfn < end_gfn {
                let Some(si) = state.slot_index(gfn.max(start_gfn)) else {
                    gfn = self.next_slot_gfn(&state, gfn, end_gfn, pages);
                    continue;
                };
                let at = gfn.max(state.slots[si].slot.base_gfn());
                let Some(addr) = state.slots[si].head(level, at).first() else {
                    gfn += pages;
                    continue;
                };
                if caches.split_needs_topup() || since_yield == SPLITS_PER_YIELD {
                    state.counters.lock_drops += 1;
                    drop(state);
                    std::thread::yield_now();
                    caches.topup_for_split()?;
                    state = self.lock();
                    state.pages.reserve(SPLITS_PER_YIELD as usize);
                    since_yield = 0;
                    continue;
                }
                let _no_alloc = NoAllocSection::enter();
                self.split_one(&mut state, &mut caches, addr, level)?;
                splits += 1;
                since_yield += 1;
            }
        }
        Ok(splits)
    }

    fn next_slot_gfn(&self, state: &State, gfn: u64, end: u64, pages: u64) -> u64 {
        state
            .slots
            .iter()
            .map(|r| r.slot.base_gfn())
            .filter(|&base| base > gfn)
            .min()
            .map_or(end, |base| base & !(pages - 1))
            .max(gfn + pages)
    }

    fn split_one(
        &self,
        state: &mut State,
        caches: &mut ShadowCaches,
        addr: u64,
        level: Level,
    ) -> Result<(), ShadowError> {
        let huge = state.spte(addr);
        let below = level.below().expect("huge leaves are above 4K");
        let gfn = state.leaf_gfn(huge, level);
        let role = Role::direct(below, guest_access(huge));
        let (child, _) = self.get_sp(state, caches, None, gfn, role)?;
        let si = state
            .slot_index(gfn)
            .expect("huge leaves lie inside a memslot");
        let State {
            pages,
            slots,
            stats,
            ..
        } = &mut *state;
        let words = pages
            .get_mut(&child)
            .and_then(|sp| sp.page.as_mut())
            .expect("a live shadow page")
            .words_mut();
        let rmaps = &mut slots[si];
        let first = rmaps.index(below, gfn);
        let lists = &mut rmaps.levels[usize::from(below.get() - 1)][first..first + 512];
        let mut added = 0;
        let mut result = Ok(());
        for (index, (word, list)) in words.iter_mut().zip(lists).enumerate() {
            if Entry::from_bits(*word).is_present() {
                continue;
            }
            let child_addr = child + index as u64 * 8;
            if let Err(err) = list.add(child_addr, &mut caches.descriptors) {
                result = Err(err);
                break;
            }
            *word = huge.split_child(level, index).bits();
            added += 1;
        }
        stats[stat_index(below)] += added;
        result?;
        let removed = state.rmap(level, gfn).remove(addr);
        debug_assert!(removed, "huge leaf {addr:#x} was not in its rmap");
        state.stats[stat_index(level)] -= 1;
        self.link(state, &mut caches.descriptors, addr, child)?;
        state.counters.splits += 1;
        Ok(())
    }

    // ----- dirty logging ---------------------------------------------------

    /// Starts dirty logging on slot `id`. Classic mode splits huge leaves
    /// (when eager, best effort: what cannot be split for lack of memory is
    /// write-protected whole and counted in
    /// [`ShadowCounters::split_fallbacks`]) and write-protects every leaf of
    /// the slot; manual mode with "initially set" waits for
    /// [`clear_dirty_log`](Self::clear_dirty_log).
    pub fn enable_dirty_logging(&self, id: u32, mode: LogMode) -> Result<(), ShadowError> {
        let slot = self.slot(id)?;
        slot.start_logging(mode);
        if mode == LogMode::Classic {
            self.try_split_huge_pages(slot.base_gfn(), slot.end_gfn());
            self.write_protect(&slot, slot.base_gfn(), slot.end_gfn(), None);
        }
        Ok(())
    }

    /// Eager splitting for dirty logging, best effort as the kernel's
    /// `kvm_shadow_mmu_try_split_huge_pages`: a failure (the split caches
    /// could not be filled) leaves huge leaves for the write-protect pass,
    /// and a write fault drops them later.
    fn try_split_huge_pages(&self, start: u64, end: u64) {
        if !self.config.eager_split {
            return;
        }
        if let Err(err) = self.split_huge_pages(start, end, Level::L4K) {
            tracing::debug!(start, end, %err, "shadow eager split fell back to write protection");
        }
    }

    /// Stops dirty logging on slot `id` and zaps its leaves, so that later
    /// faults map huge pages again.
    pub fn disable_dirty_logging(&self, id: u32) -> Result<(), ShadowError> {
        let slot = self.slot(id)?;
        slot.stop_logging();
        self.zap_gfn_range(slot.base_gfn(), slot.end_gfn());
        Ok(())
    }

    /// Returns the dirty log of slot `id`. Classic mode: the log is cleared
    /// and the pages in it are write-protected again. Manual mode: the log
    /// is returned as is.
    pub fn get_dirty_log(&self, id: u32) -> Result<Vec<u64>, ShadowError> {
        let slot = self.slot(id)?;
        let mode = slot.log_mode().ok_or(MemslotError::NotLogging { id })?;
        Ok(match mode {
            LogMode::Classic => {
                let log = slot.take();
                self.write_protect(&slot, slot.base_gfn(), slot.end_gfn(), Some((0, &log)));
                log
            }
            LogMode::ManualInitiallySet => slot.snapshot(),
        })
    }

    /// Manual mode: `KVM_CLEAR_DIRTY_LOG` for the bits of `mask` (bit i is
    /// page `first_page + i` of the slot; `first_page` a multiple of 64).
    ///
    /// As the kernel does, one 64-page word at a time: only bits set both
    /// in the log and in the mask are cleared, and only the pages from the
    /// first to the last bit cleared in that word are split (when eager)
    /// and write-protected; the huge leaves over them are write-protected
    /// whole. A word with nothing cleared (an all-zero mask) touches nothing.
    pub fn clear_dirty_log(
        &self,
        id: u32,
        first_page: u64,
        mask: &[u64],
    ) -> Result<(), ShadowError> {
        let slot = self.slot(id)?;
        slot.check_clear(first_page, mask)?;
        for word in slot.clear_words(first_page, mask) {
            let range = word.gfn_range(slot.base_gfn());
            self.try_split_huge_pages(range.start, range.end);
            self.write_protect(
                &slot,
                range.start,
                range.end,
                Some((word.first_page, &[word.bits])),
            );
        }
        Ok(())
    }

    /// Clears the write bit of the leaves over `[start, end)`: every huge
    /// leaf, and the 4K leaves selected by `mask` (bits from slot page
    /// `first_page`), or all of them.
    fn write_protect(&self, slot: &Memslot, start: u64, end: u64, mask: Option<(u64, &[u64])>) {
        let mut state = self.lock();
        let _no_alloc = NoAllocSection::enter();
        let Some(si) = state.slots.iter().position(|r| r.slot.id() == slot.id()) else {
            return;
        };
        let state = &mut *state;
        let rmaps = &mut state.slots[si];
        let pages_map = &mut state.pages;
        let mut fallbacks = 0;
        for level in [Level::L4K, Level::L2M, Level::L1G] {
            let pages = level.entry_pages();
            let mut gfn = start & !(pages - 1);
            while gfn < end {
                let at = gfn.max(slot.base_gfn());
                let selected = level > Level::L4K
                    || mask.is_none_or(|(first_page, bits)| {
                        let page = at - slot.base_gfn() - first_page;
                        bits.get((page / 64) as usize)
                            .is_some_and(|w| w & (1 << (page % 64)) != 0)
                    });
                if selected {
                    rmaps.head(level, at).for_each(|addr| {
                        let sp = pages_map.get_mut(&(addr & !0xfff)).expect("rmapped");
                        let words = sp.page.as_mut().expect("live").words_mut();
                        words[((addr & 0xfff) / 8) as usize] &= !WRITE;
                        if level > Level::L4K && self.config.eager_split {
                            fallbacks += 1;
                        }
                    });
                }
                gfn += pages;
            }
        }
        state.counters.split_fallbacks += fallbacks;
    }
}
