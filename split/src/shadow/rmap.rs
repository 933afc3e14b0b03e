//! Reverse maps and parent lists: lists of entry addresses, one address
//! inline or chains of 14-entry descriptors from an object cache.

use std::fmt;
use std::sync::Arc;

use mmu_cache::{CacheError, ObjectCache, SlabBox};

use crate::ept::Level;
use crate::memslot::Memslot;

use super::PTE_LIST_EXT;

/// A descriptor of an rmap or parent list: up to [`PTE_LIST_EXT`] entry
/// addresses and the next descriptor.
pub struct PteListDesc {
    pub(super) sptes: [u64; PTE_LIST_EXT],
    pub(super) count: u8,
    pub(super) more: Option<SlabBox<PteListDesc>>,
    /// The box of this descriptor while it heads a list: the list itself is
    /// one word that holds only the descriptor's address.
    home: Option<SlabBox<PteListDesc>>,
}

impl Default for PteListDesc {
    fn default() -> Self {
        Self {
            sptes: [0; PTE_LIST_EXT],
            count: 0,
            more: None,
            home: None,
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

/// The tag of a list word that holds a descriptor's address: entry
/// addresses are 8-byte aligned, so their low bit is free.
const DESC_TAG: u64 = 1;

/// A list of entry addresses in one word, as the kernel's `kvm_rmap_head`:
/// 0 when empty, the (8-byte aligned, non-zero) address when there is one,
/// or the address of a descriptor chain, tagged with [`DESC_TAG`], whose
/// first descriptor is the only one that may be partly full. A split
/// writes 512 of these per table, so their size is most of its cost.
#[derive(Default)]
pub(super) struct PteList(u64);

const _: () = assert!(std::mem::size_of::<PteList>() == 8);

impl fmt::Debug for PteList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.head() {
            Some(desc) => f.debug_tuple("Many").field(desc).finish(),
            None if self.0 == 0 => f.write_str("Empty"),
            None => write!(f, "One({:#x})", self.0),
        }
    }
}

impl Drop for PteList {
    fn drop(&mut self) {
        drop(self.take_head());
    }
}

impl PteList {
    /// Makes an empty list hold `spte` alone; false (and no change) when
    /// the list is not empty.
    #[inline]
    pub(super) fn set_if_empty(&mut self, spte: u64) -> bool {
        debug_assert!(spte != 0 && spte & 7 == 0, "entry address {spte:#x}");
        let empty = self.0 == 0;
        if empty {
            self.0 = spte;
        }
        empty
    }

    /// Whether every list of `lists` is empty (one pass with no branch per
    /// list).
    pub(super) fn all_empty(lists: &[PteList]) -> bool {
        lists.iter().fold(0, |any, list| any | list.0) == 0
    }

    /// Makes the empty lists `lists` hold one entry address each, list `i`
    /// the address `first + 8 * i`: the rmaps of a new table's entries.
    pub(super) fn fill_empty_with_consecutive(lists: &mut [PteList], first: u64) {
        debug_assert!(Self::all_empty(lists));
        debug_assert!(first != 0 && first & 7 == 0, "entry address {first:#x}");
        for (index, list) in lists.iter_mut().enumerate() {
            list.0 = first + index as u64 * 8;
        }
    }

    /// The head descriptor, when the list is a chain.
    fn head(&self) -> Option<&PteListDesc> {
        (self.0 & DESC_TAG != 0).then(|| {
            // SAFETY: a tagged word holds the address of a live descriptor
            // whose `home` box is owned by this list (see `set_head`).
            unsafe { &*((self.0 & !DESC_TAG) as *const PteListDesc) }
        })
    }

    /// The head descriptor, for changes.
    fn head_mut(&mut self) -> Option<&mut PteListDesc> {
        (self.0 & DESC_TAG != 0).then(|| {
            // SAFETY: as in `head`, and `&mut self` makes the access
            // exclusive: only this list knows the descriptor's address.
            unsafe { &mut *((self.0 & !DESC_TAG) as *mut PteListDesc) }
        })
    }

    /// Makes `desc` the head of this list, which must hold no descriptor:
    /// the box moves into the descriptor it owns and the word keeps its
    /// address.
    fn set_head(&mut self, mut desc: SlabBox<PteListDesc>) {
        debug_assert!(self.0 & DESC_TAG == 0);
        let address: *mut PteListDesc = &mut *desc;
        debug_assert!(address as u64 & DESC_TAG == 0);
        // SAFETY: `address` is the box's object in its slab slot, which does
        // not move when the box does; it stays live until the box, kept in
        // the object's own `home`, is taken back out by `take_head`.
        unsafe { (*address).home = Some(desc) };
        self.0 = address as u64 | DESC_TAG;
    }

    /// Takes the head descriptor's box out of the list, which is left empty.
    fn take_head(&mut self) -> Option<SlabBox<PteListDesc>> {
        let head = self.head_mut()?.home.take();
        debug_assert!(head.is_some(), "a list's head descriptor owns itself");
        self.0 = 0;
        head
    }

    /// Adds `spte`. The empty case, which every split child and most faults
    /// meet, is inlined; the rest takes descriptors from `descs`.
    #[inline]
    pub(super) fn add(
        &mut self,
        spte: u64,
        descs: &mut ObjectCache<PteListDesc>,
    ) -> Result<(), CacheError> {
        if self.set_if_empty(spte) {
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
        if let Some(head) = self.head_mut()
            && usize::from(head.count) < PTE_LIST_EXT
        {
            head.sptes[usize::from(head.count)] = spte;
            head.count += 1;
            return Ok(());
        }
        let mut desc = descs.alloc()?;
        *desc = PteListDesc::default();
        match self.take_head() {
            // The full head goes down the chain.
            Some(old) => {
                desc.sptes[0] = spte;
                desc.count = 1;
                desc.more = Some(old);
            }
            None => {
                desc.sptes[0] = std::mem::take(&mut self.0);
                desc.sptes[1] = spte;
                desc.count = 2;
            }
        }
        self.set_head(desc);
        Ok(())
    }

    /// Removes `spte`; the hole is filled with the last entry of the first
    /// descriptor, which is freed when it empties.
    pub(super) fn remove(&mut self, spte: u64) -> bool {
        let Some(head) = self.head_mut() else {
            let found = self.0 != 0 && self.0 == spte;
            if found {
                self.0 = 0;
            }
            return found;
        };
        let last = head.sptes[usize::from(head.count) - 1];
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
        let head = self.head_mut().expect("the list is a chain");
        head.count -= 1;
        if head.count == 0 {
            let next = head.more.take();
            drop(self.take_head());
            if let Some(next) = next {
                self.set_head(next);
            }
        }
        true
    }

    pub(super) fn first(&self) -> Option<u64> {
        match self.head() {
            Some(head) => Some(head.sptes[0]),
            None => (self.0 != 0).then_some(self.0),
        }
    }

    pub(super) fn for_each(&self, mut visit: impl FnMut(u64)) {
        let Some(head) = self.head() else {
            if self.0 != 0 {
                visit(self.0);
            }
            return;
        };
        let mut desc: Option<&PteListDesc> = Some(head);
        while let Some(d) = desc {
            d.sptes[..usize::from(d.count)]
                .iter()
                .for_each(|&s| visit(s));
            desc = d.more.as_deref();
        }
    }

    pub(super) fn len(&self) -> usize {
        let mut n = 0;
        self.for_each(|_| n += 1);
        n
    }

    pub(super) fn descriptors(&self) -> usize {
        let mut n = 0;
        let mut desc = self.head();
        while let Some(d) = desc {
            n += 1;
            desc = d.more.as_deref();
        }
        n
    }
}

/// A run of 512 lists (the 4K lists of one 2 MiB region, or the 2M lists
/// of one 1 GiB region) no list of which was ever handed out: all empty.
const RUN_UNTOUCHED: u64 = 0;
/// A run whose lists hold exactly what they say.
const RUN_EXPLICIT: u64 = 1;
// Any other run word is the (page-aligned) address of a direct shadow page
// whose 512 present leaves map the run's frames in order: list `i` holds
// only entry `i` of that page, though the lists themselves are empty.

/// Rmaps of one memslot: per leaf level, one list per frame at that level.
///
/// A split fills a new direct page with 512 leaves over consecutive
/// frames, whose lists were empty: writing those 512 lists doubled what a
/// split writes (the kernel writes them, one `kvm_rmap_head` each). Here
/// the run records the page instead ([`imply_run`](Self::imply_run)),
/// and the lists are written only when one of them is first handed out
/// for a change ([`head`](Self::head)). Entries are visited without that
/// ([`for_each_entry`](Self::for_each_entry)), and a page zapped while it
/// implies its run clears the run word ([`forget_implied`](Self::forget_implied)).
pub(super) struct SlotRmaps {
    pub(super) slot: Arc<Memslot>,
    levels: [Vec<PteList>; 3],
    /// Per 4K and 2M level, one word per aligned run of 512 lists:
    /// [`RUN_UNTOUCHED`], [`RUN_EXPLICIT`] or the page the run implies.
    runs: [Vec<u64>; 2],
}

/// Where `level`'s lists (and runs) sit in [`SlotRmaps`]' arrays.
fn at(level: Level) -> usize {
    usize::from(level.get() - 1)
}

/// Frames per list at `level`, as a shift: a list covers one leaf.
fn list_shift(level: Level) -> u32 {
    level.entry_pages().trailing_zeros()
}

/// Frames per run of 512 lists at `level`, as a shift.
fn run_shift(level: Level) -> u32 {
    list_shift(level) + 9
}

impl SlotRmaps {
    pub(super) fn new(slot: Arc<Memslot>) -> Self {
        let count = |shift: u32| {
            (((slot.end_gfn().0 - 1) >> shift) - (slot.base_gfn().0 >> shift) + 1) as usize
        };
        let levels = [Level::L4K, Level::L2M, Level::L1G].map(|level| {
            (0..count(list_shift(level)))
                .map(|_| PteList::default())
                .collect()
        });
        let runs =
            [Level::L4K, Level::L2M].map(|level| vec![RUN_UNTOUCHED; count(run_shift(level))]);
        Self { slot, levels, runs }
    }

    pub(super) fn index(&self, level: Level, gfn: u64) -> usize {
        let shift = list_shift(level);
        ((gfn >> shift) - (self.slot.base_gfn().0 >> shift)) as usize
    }

    /// The run of `level` lists that holds `gfn`'s list, for the levels
    /// that have runs (4K and 2M).
    fn run_index(&self, level: Level, gfn: u64) -> Option<usize> {
        (level < Level::L1G).then(|| {
            let shift = run_shift(level);
            ((gfn >> shift) - (self.slot.base_gfn().0 >> shift)) as usize
        })
    }

    /// The lists of the whole run at `run_gfn` (aligned to the run, so the
    /// run lies inside the slot: runs that a page implies always do).
    fn run_lists_at(&self, level: Level, run_gfn: u64) -> &[PteList] {
        let first = self.index(level, run_gfn);
        &self.levels[at(level)][first..first + 512]
    }

    /// [`run_lists_at`](Self::run_lists_at), for changes.
    fn run_lists_at_mut(&mut self, level: Level, run_gfn: u64) -> &mut [PteList] {
        let first = self.index(level, run_gfn);
        &mut self.levels[at(level)][first..first + 512]
    }

    /// Writes out the lists of the run holding `gfn` if a page implies
    /// them, and marks the run explicit.
    fn make_explicit(&mut self, level: Level, gfn: u64) {
        let Some(run) = self.run_index(level, gfn) else {
            return;
        };
        let owner = std::mem::replace(&mut self.runs[at(level)][run], RUN_EXPLICIT);
        if owner > RUN_EXPLICIT {
            let run_gfn = gfn >> run_shift(level) << run_shift(level);
            PteList::fill_empty_with_consecutive(self.run_lists_at_mut(level, run_gfn), owner);
        }
    }

    /// `gfn`'s list at `level`, for a change: the run it is in is written
    /// out first if a page implies it.
    pub(super) fn head(&mut self, level: Level, gfn: u64) -> &mut PteList {
        self.make_explicit(level, gfn);
        let index = self.index(level, gfn);
        &mut self.levels[at(level)][index]
    }

    /// Visits every entry address in `gfn`'s list at `level`, without
    /// writing out an implied run. Only for visits that keep every entry
    /// mapping the frame it maps (clearing the write bit, counting).
    pub(super) fn for_each_entry(&self, level: Level, gfn: u64, mut visit: impl FnMut(u64)) {
        if let Some(run) = self.run_index(level, gfn) {
            let owner = self.runs[at(level)][run];
            if owner > RUN_EXPLICIT {
                let within = (gfn >> list_shift(level)) & 511;
                visit(owner + within * 8);
                return;
            }
        }
        self.levels[at(level)][self.index(level, gfn)].for_each(visit);
    }

    /// Whether the 512 `level` lists under the huge leaf at `huge_gfn` (one
    /// level up, aligned) are empty: known without a read while the run
    /// is untouched, never while a page implies it.
    pub(super) fn run_is_empty(&self, level: Level, huge_gfn: u64) -> bool {
        let run = self.run_index(level, huge_gfn).expect("runs are below 1G");
        match self.runs[at(level)][run] {
            RUN_UNTOUCHED => true,
            RUN_EXPLICIT => PteList::all_empty(self.run_lists_at(level, huge_gfn)),
            _ => false,
        }
    }

    /// Makes the empty run under the huge leaf at `huge_gfn` imply the
    /// leaves of the new direct page `owner`: list `i` holds `owner + 8 * i`.
    pub(super) fn imply_run(&mut self, level: Level, huge_gfn: u64, owner: u64) {
        debug_assert!(self.run_is_empty(level, huge_gfn));
        debug_assert!(
            owner > RUN_EXPLICIT && owner & 0xfff == 0,
            "page {owner:#x}"
        );
        let run = self.run_index(level, huge_gfn).expect("runs are below 1G");
        self.runs[at(level)][run] = owner;
    }

    /// The 512 `level` lists under the huge leaf at `huge_gfn`, for
    /// changes (written out first if a page implies them).
    pub(super) fn run_lists(&mut self, level: Level, huge_gfn: u64) -> &mut [PteList] {
        self.make_explicit(level, huge_gfn);
        self.run_lists_at_mut(level, huge_gfn)
    }

    /// When the run holding `gfn` implies `owner`'s leaves, empties it
    /// (the page is being zapped whole) and returns true: its leaves can
    /// then go without touching a list.
    pub(super) fn forget_implied(&mut self, level: Level, gfn: u64, owner: u64) -> bool {
        let Some(run) = self.run_index(level, gfn) else {
            return false;
        };
        let word = &mut self.runs[at(level)][run];
        let implied = *word == owner;
        if implied {
            *word = RUN_UNTOUCHED;
        }
        implied
    }

    /// Visits every `(level, frame, entry address)` the rmaps hold, implied
    /// runs included (a list that starts before the slot is keyed by the
    /// slot's first frame); returns the descriptors in all lists.
    pub(super) fn for_each_rmapped(&self, mut visit: impl FnMut(Level, u64, u64)) -> usize {
        let base = self.slot.base_gfn().0;
        let mut descriptors = 0;
        for level in [Level::L4K, Level::L2M, Level::L1G] {
            let shift = list_shift(level);
            for (index, list) in self.levels[at(level)].iter().enumerate() {
                let gfn = ((base >> shift) + index as u64) << shift;
                let gfn = gfn.max(base);
                self.for_each_entry(level, gfn, |addr| visit(level, gfn, addr));
                descriptors += list.descriptors();
            }
        }
        descriptors
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shadow::ShadowTablePage;
    use mmu_cache::alloc::ChunkAllocator;
    use mmu_cache::{PagePool, Slab};

    fn descriptors() -> (Arc<Slab<PteListDesc>>, ObjectCache<PteListDesc>) {
        let pool: Arc<PagePool<ShadowTablePage>> = PagePool::new(ChunkAllocator::anonymous());
        let slab = Slab::new(pool.for_kind(), None).unwrap();
        let mut descs = ObjectCache::new(slab.clone());
        descs.topup_with_capacity(64, 64).unwrap();
        (slab, descs)
    }

    fn entries(list: &PteList) -> Vec<u64> {
        let mut seen = Vec::new();
        list.for_each(|spte| seen.push(spte));
        seen.sort_unstable();
        seen
    }

    /// The kernel's `pte_list_add` / `pte_list_remove` on a `kvm_rmap_head`:
    /// one entry in the word itself, then descriptors whose head is the only
    /// partial one, a removed entry replaced by the head's last.
    #[test]
    fn a_list_is_one_word_through_one_entry_and_chains_of_descriptors() {
        let (slab, mut descs) = descriptors();
        let cached = slab.live();
        let mut list = PteList::default();
        assert_eq!((list.first(), list.len(), list.descriptors()), (None, 0, 0));
        list.add(0x1000, &mut descs).unwrap();
        assert_eq!((list.first(), list.descriptors()), (Some(0x1000), 0));
        // Three descriptors' worth: the head is the only partial one.
        let all: Vec<u64> = (1..=3 * PTE_LIST_EXT as u64).map(|i| i * 8).collect();
        let mut list = PteList::default();
        for &spte in &all {
            list.add(spte, &mut descs).unwrap();
        }
        assert_eq!(list.len(), all.len());
        assert_eq!(list.descriptors(), 3);
        assert_eq!(slab.live(), cached);
        assert_eq!(descs.nr_free(), 64 - 3);
        assert_eq!(entries(&list), all);
        // Removing from the middle, the tail and the head keeps the rest.
        let mut left = all.clone();
        for spte in [all[20], all[0], all[41], all[13], all[14]] {
            assert!(list.remove(spte));
            assert!(!list.remove(spte), "{spte:#x} was removed once");
            left.retain(|&s| s != spte);
            assert_eq!(entries(&list), left);
        }
        while let Some(spte) = list.first() {
            assert!(list.remove(spte));
        }
        assert_eq!((list.len(), list.descriptors()), (0, 0));
        assert!(!list.remove(8));
        assert_eq!(slab.live(), cached - 3, "emptied descriptors go back");
        // A chain dropped whole frees its descriptors.
        for &spte in &all {
            list.add(spte, &mut descs).unwrap();
        }
        assert_eq!(slab.live(), cached - 3);
        drop(list);
        assert_eq!(slab.live(), cached - 6);
    }

    #[test]
    fn consecutive_entries_fill_only_empty_lists() {
        let mut lists: Vec<PteList> = (0..512).map(|_| PteList::default()).collect();
        assert!(PteList::all_empty(&lists));
        PteList::fill_empty_with_consecutive(&mut lists, 0x5000);
        assert!(!PteList::all_empty(&lists));
        assert_eq!(lists[0].first(), Some(0x5000));
        assert_eq!(lists[511].first(), Some(0x5000 + 511 * 8));
        assert!(!PteList::all_empty(&lists[511..]));
    }
}
