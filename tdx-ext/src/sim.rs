//! A software TDX module: it keeps one TD's S-EPT, the state of every page
//! it was handed, and the 4K PAMT regions, and refuses every call that
//! breaks a rule with the status the real module gives.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};

use split::{Gpa, Hpa, Level};

use crate::module::{SeamcallResult, TdxModule};
use crate::status::{Seamcall, TdxStatus};

use crate::pamt::REGION;
use mmukit_sys::size::PAGE_4K as PAGE;

/// What the module holds a host page as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageState {
    /// A Secure-EPT page.
    Sept,
    /// Guest memory, mapped by a leaf of this level (1 = 4K).
    Guest {
        /// The leaf level.
        level: u8,
    },
    /// Removed from the TD; needs WBINVD before the host may reuse it.
    Removed,
    /// Holds 4K PAMT entries of some region.
    Pamt,
}

#[derive(Clone, Copy, Debug)]
struct Leaf {
    page: u64,
    blocked: Option<u64>,
}

#[derive(Clone, Copy, Debug)]
struct Table {
    page: Option<u64>,
    blocked: Option<u64>,
    children: u32,
}

#[derive(Clone, Copy, Debug)]
struct Injection {
    leaf: Seamcall,
    at_call: u64,
    status: TdxStatus,
    remaining: u32,
}

#[derive(Debug, Default)]
struct State {
    tables: HashMap<(u8, u64), Table>,
    leaves: HashMap<(u8, u64), Leaf>,
    /// Where each S-EPT page is linked: its (level, gpa) in `tables`.
    table_of_page: HashMap<u64, (u8, u64)>,
    /// Where each leaf's first page is mapped: its (level, gpa) in `leaves`.
    leaf_of_page: HashMap<u64, (u8, u64)>,
    pages: HashMap<u64, PageState>,
    pamt: HashMap<u64, [u64; 2]>,
    epoch: u64,
    kicked: u64,
    finalized: bool,
    key_released: bool,
    calls: HashMap<Seamcall, u64>,
    failures: HashMap<Seamcall, u64>,
    injections: Vec<Injection>,
}

impl State {
    fn insert_leaf(&mut self, level: u8, gpa: u64, page: u64) {
        self.leaves.insert(
            (level, gpa),
            Leaf {
                page,
                blocked: None,
            },
        );
        self.leaf_of_page.insert(page, (level, gpa));
    }

    fn remove_leaf(&mut self, level: u8, gpa: u64) -> Option<Leaf> {
        let leaf = self.leaves.remove(&(level, gpa))?;
        self.leaf_of_page.remove(&leaf.page);
        Some(leaf)
    }

    fn insert_table(&mut self, level: u8, gpa: u64, table: Table) {
        if let Some(page) = table.page {
            self.table_of_page.insert(page, (level, gpa));
        }
        self.tables.insert((level, gpa), table);
    }

    fn remove_table(&mut self, level: u8, gpa: u64) -> Option<Table> {
        let table = self.tables.remove(&(level, gpa))?;
        if let Some(page) = table.page {
            self.table_of_page.remove(&page);
        }
        Some(table)
    }

    /// The blocked-epoch slot of the entry of `level` at `gpa`: a leaf, or
    /// the entry that links the table below.
    fn entry_block(&mut self, level: u8, gpa: u64) -> Option<&mut Option<u64>> {
        if self.leaves.contains_key(&(level, gpa)) {
            return self
                .leaves
                .get_mut(&(level, gpa))
                .map(|leaf| &mut leaf.blocked);
        }
        if level > 1 {
            return self
                .tables
                .get_mut(&(level - 1, gpa))
                .map(|table| &mut table.blocked);
        }
        None
    }
}

/// The software TDX module of one TD.
///
/// ```
/// use split::{Gpa, Hpa, Level};
/// use tdx_ext::{SimTdxModule, TdxModule, TdxStatus};
///
/// let module = SimTdxModule::new(4);
/// module.pamt_add(Hpa(0x20_0000), [Hpa(0x40_0000), Hpa(0x40_1000)]).unwrap();
/// // A page table needs its parent: the 1G-level table comes first.
/// assert_eq!(
///     module.sept_add(Gpa(0), Level::L2M, Hpa(0x20_0000)),
///     Err(TdxStatus::EptWalkFailed)
/// );
/// module.sept_add(Gpa(0), Level::L1G, Hpa(0x20_0000)).unwrap();
/// module.sept_add(Gpa(0), Level::L2M, Hpa(0x20_1000)).unwrap();
/// # Ok::<(), TdxStatus>(())
/// ```
#[derive(Debug)]
pub struct SimTdxModule {
    levels: u8,
    state: Mutex<State>,
    pamt_in_flight: Mutex<HashSet<u64>>,
}

fn bytes(level: u8) -> u64 {
    PAGE << (9 * u32::from(level - 1))
}

impl SimTdxModule {
    /// A module for a TD with `levels`-level S-EPT (4 or 5).
    pub fn new(levels: u8) -> Self {
        let mut state = State::default();
        state.tables.insert(
            (levels, 0),
            Table {
                page: None,
                blocked: None,
                children: 0,
            },
        );
        Self {
            levels,
            state: Mutex::new(state),
            pamt_in_flight: Mutex::new(HashSet::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes call number `after` from now (1 = the next) of `leaf`, and the
    /// `times - 1` after it, return `status` without doing anything.
    pub fn inject(&self, leaf: Seamcall, after: u64, status: TdxStatus, times: u32) {
        let mut state = self.lock();
        let at_call = state.calls.get(&leaf).copied().unwrap_or(0) + after;
        state.injections.push(Injection {
            leaf,
            at_call,
            status,
            remaining: times,
        });
    }

    /// Calls made of `leaf`.
    pub fn calls(&self, leaf: Seamcall) -> u64 {
        self.lock().calls.get(&leaf).copied().unwrap_or(0)
    }

    /// Calls of `leaf` that failed.
    pub fn failures(&self, leaf: Seamcall) -> u64 {
        self.lock().failures.get(&leaf).copied().unwrap_or(0)
    }

    /// Every leaf of the S-EPT: (level, gpa) -> (page, blocked).
    pub fn leaves(&self) -> BTreeMap<(u8, Gpa), (Hpa, bool)> {
        self.lock()
            .leaves
            .iter()
            .map(|(&(level, gpa), leaf)| {
                ((level, Gpa(gpa)), (Hpa(leaf.page), leaf.blocked.is_some()))
            })
            .collect()
    }

    /// Every S-EPT page: (level of its entries, gpa) -> page (the root has none).
    pub fn tables(&self) -> BTreeMap<(u8, Gpa), Option<Hpa>> {
        self.lock()
            .tables
            .iter()
            .map(|(&(level, gpa), table)| ((level, Gpa(gpa)), table.page.map(Hpa)))
            .collect()
    }

    /// How the module holds `page`, if at all.
    pub fn page_state(&self, page: Hpa) -> Option<PageState> {
        self.lock().pages.get(&page.0).copied()
    }

    /// Pages the module holds, per state.
    pub fn pages_held(&self) -> HashMap<PageState, usize> {
        let mut counts = HashMap::new();
        for state in self.lock().pages.values() {
            *counts.entry(*state).or_insert(0) += 1;
        }
        counts
    }

    /// The PAMT pages of `region`, if it has a 4K PAMT.
    pub fn pamt_pair(&self, region: Hpa) -> Option<[Hpa; 2]> {
        self.lock().pamt.get(&region.0).map(|pair| pair.map(Hpa))
    }

    /// Every page that holds PAMT entries.
    pub fn pamt_pages(&self) -> Vec<Hpa> {
        self.lock()
            .pamt
            .values()
            .flatten()
            .copied()
            .map(Hpa)
            .collect()
    }

    /// Regions with a 4K PAMT.
    pub fn pamt_regions(&self) -> usize {
        self.lock().pamt.len()
    }

    /// The current TLB epoch.
    pub fn epoch(&self) -> u64 {
        self.lock().epoch
    }

    fn begin(&self, state: &mut State, leaf: Seamcall) -> SeamcallResult {
        let call = {
            let count = state.calls.entry(leaf).or_insert(0);
            *count += 1;
            *count
        };
        let injected = state
            .injections
            .iter_mut()
            .find(|i| i.leaf == leaf && i.remaining > 0 && i.at_call <= call)
            .map(|i| {
                i.remaining -= 1;
                i.status
            });
        state.injections.retain(|i| i.remaining > 0);
        match injected {
            Some(status) => Err(status),
            None => Ok(()),
        }
    }

    fn finish<T>(
        state: &mut State,
        leaf: Seamcall,
        result: SeamcallResult<T>,
    ) -> SeamcallResult<T> {
        if result.is_err() {
            *state.failures.entry(leaf).or_insert(0) += 1;
        }
        result
    }

    fn call<T>(
        &self,
        leaf: Seamcall,
        body: impl FnOnce(&mut State) -> SeamcallResult<T>,
    ) -> SeamcallResult<T> {
        let mut state = self.lock();
        let result = self.begin(&mut state, leaf).and_then(|()| body(&mut state));
        Self::finish(&mut state, leaf, result)
    }

    /// A PAMT call on `region`: OPERAND_BUSY while another caller is inside
    /// a PAMT call on the same region.
    fn pamt_call<T>(
        &self,
        leaf: Seamcall,
        region: u64,
        body: impl FnOnce(&mut State) -> SeamcallResult<T>,
    ) -> SeamcallResult<T> {
        let in_flight = || {
            self.pamt_in_flight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
        };
        if !in_flight().insert(region) {
            let mut state = self.lock();
            *state.calls.entry(leaf).or_insert(0) += 1;
            return Self::finish(&mut state, leaf, Err(TdxStatus::OperandBusy));
        }
        let result = self.call(leaf, body);
        in_flight().remove(&region);
        result
    }

    fn table_base(&self, level: u8, gpa: u64) -> u64 {
        if level >= self.levels {
            0
        } else {
            gpa & !(bytes(level + 1) - 1)
        }
    }

    fn check_level(&self, level: Level, max: u8) -> SeamcallResult<u8> {
        let level = level.get();
        if level == 0 || level > max.min(self.levels) {
            return Err(TdxStatus::OperandInvalid);
        }
        Ok(level)
    }

    /// The entry of `level` at `gpa` is free: no leaf there, no table below.
    fn entry_free(state: &State, level: u8, gpa: u64) -> bool {
        !state.leaves.contains_key(&(level, gpa))
            && (level == 1 || !state.tables.contains_key(&(level - 1, gpa)))
    }

    fn pamt_backed(state: &State, page: u64) -> bool {
        state.pamt.contains_key(&(page & !(REGION - 1)))
    }

    fn tracked(state: &State, blocked: Option<u64>) -> SeamcallResult {
        let Some(epoch) = blocked else {
            return Err(TdxStatus::GpaRangeNotBlocked);
        };
        if state.epoch > epoch && state.kicked > epoch {
            Ok(())
        } else {
            Err(TdxStatus::TlbTrackingNotDone)
        }
    }

    fn adjust_parent(&self, state: &mut State, level: u8, gpa: u64, delta: i32) {
        let key = (level, self.table_base(level, gpa));
        if let Some(parent) = state.tables.get_mut(&key) {
            parent.children = parent.children.saturating_add_signed(delta);
        }
    }

    fn map_leaf(&self, state: &mut State, level: u8, gpa: u64, page: u64) -> SeamcallResult {
        if !gpa.is_multiple_of(bytes(level)) || !page.is_multiple_of(bytes(level)) {
            return Err(TdxStatus::OperandInvalid);
        }
        if !state
            .tables
            .contains_key(&(level, self.table_base(level, gpa)))
        {
            return Err(TdxStatus::EptWalkFailed);
        }
        if !Self::entry_free(state, level, gpa) {
            return Err(TdxStatus::EptEntryStateIncorrect);
        }
        let pages = bytes(level) / PAGE;
        let all_free = (0..pages).all(|i| !state.pages.contains_key(&(page + i * PAGE)));
        if !all_free {
            return Err(TdxStatus::PageMetadataIncorrect);
        }
        match level {
            // A 4K page needs the 4K PAMT of its range.
            1 if !Self::pamt_backed(state, page) => return Err(TdxStatus::MissingPamtPagePair),
            // A 2 MiB page is tracked by the range's 2M PAMT entry, which a
            // 4K PAMT of the range has taken.
            2 if Self::pamt_backed(state, page) => return Err(TdxStatus::PageMetadataIncorrect),
            _ => {}
        }
        for i in 0..pages {
            state
                .pages
                .insert(page + i * PAGE, PageState::Guest { level });
        }
        state.insert_leaf(level, gpa, page);
        self.adjust_parent(state, level, gpa, 1);
        Ok(())
    }
}

impl TdxModule for SimTdxModule {
    fn sept_add(&self, gpa: Gpa, level: Level, page: Hpa) -> SeamcallResult {
        let gpa = gpa.0;
        let page = page.0;
        self.call(Seamcall::MemSeptAdd, |state| {
            if state.key_released {
                return Err(TdxStatus::LifecycleStateIncorrect);
            }
            let level = self.check_level(level, self.levels - 1)?;
            let parent = level + 1;
            if !gpa.is_multiple_of(bytes(parent)) || !page.is_multiple_of(PAGE) {
                return Err(TdxStatus::OperandInvalid);
            }
            if !state
                .tables
                .contains_key(&(parent, self.table_base(parent, gpa)))
            {
                return Err(TdxStatus::EptWalkFailed);
            }
            if !Self::entry_free(state, parent, gpa) {
                return Err(TdxStatus::EptEntryStateIncorrect);
            }
            if state.pages.contains_key(&page) {
                return Err(TdxStatus::PageMetadataIncorrect);
            }
            if !Self::pamt_backed(state, page) {
                return Err(TdxStatus::MissingPamtPagePair);
            }
            state.pages.insert(page, PageState::Sept);
            state.insert_table(
                level,
                gpa,
                Table {
                    page: Some(page),
                    blocked: None,
                    children: 0,
                },
            );
            self.adjust_parent(state, parent, gpa, 1);
            Ok(())
        })
    }

    fn page_aug(&self, gpa: Gpa, level: Level, page: Hpa) -> SeamcallResult {
        let gpa = gpa.0;
        let page = page.0;
        self.call(Seamcall::MemPageAug, |state| {
            if state.key_released || !state.finalized {
                return Err(TdxStatus::LifecycleStateIncorrect);
            }
            // TDX maps private memory with 4K and 2M leaves only.
            let level = self.check_level(level, 2)?;
            self.map_leaf(state, level, gpa, page)
        })
    }

    fn page_add(&self, gpa: Gpa, page: Hpa) -> SeamcallResult {
        let gpa = gpa.0;
        let page = page.0;
        self.call(Seamcall::MemPageAdd, |state| {
            if state.key_released || state.finalized {
                return Err(TdxStatus::LifecycleStateIncorrect);
            }
            self.map_leaf(state, 1, gpa, page)
        })
    }

    fn range_block(&self, gpa: Gpa, level: Level) -> SeamcallResult {
        let gpa = gpa.0;
        self.call(Seamcall::MemRangeBlock, |state| {
            let level = self.check_level(level, self.levels)?;
            let epoch = state.epoch;
            let walked = level >= self.levels
                || state
                    .tables
                    .contains_key(&(level, self.table_base(level, gpa)));
            let Some(blocked) = state.entry_block(level, gpa) else {
                // A free entry cannot be blocked; a missing table on the way
                // is a failed walk.
                return Err(if walked {
                    TdxStatus::EptEntryStateIncorrect
                } else {
                    TdxStatus::EptWalkFailed
                });
            };
            if blocked.is_some() {
                return Err(TdxStatus::GpaRangeAlreadyBlocked);
            }
            *blocked = Some(epoch);
            Ok(())
        })
    }

    fn range_unblock(&self, gpa: Gpa, level: Level) -> SeamcallResult {
        let gpa = gpa.0;
        self.call(Seamcall::MemRangeUnblock, |state| {
            let level = self.check_level(level, self.levels)?;
            let epoch = state.epoch;
            let kicked = state.kicked;
            let blocked = state
                .entry_block(level, gpa)
                .ok_or(TdxStatus::EptEntryStateIncorrect)?;
            let Some(since) = *blocked else {
                return Err(TdxStatus::EptEntryStateIncorrect);
            };
            // As for REMOVE: no vCPU may still hold a translation from
            // before the BLOCK when the entry comes back.
            if !(epoch > since && kicked > since) {
                return Err(TdxStatus::TlbTrackingNotDone);
            }
            *blocked = None;
            Ok(())
        })
    }

    fn track(&self) -> SeamcallResult {
        self.call(Seamcall::MemTrack, |state| {
            state.epoch += 1;
            Ok(())
        })
    }

    fn page_remove(&self, gpa: Gpa, level: Level) -> SeamcallResult<Hpa> {
        let gpa = gpa.0;
        self.call(Seamcall::MemPageRemove, |state| {
            let level = self.check_level(level, 3)?;
            let leaf = *state
                .leaves
                .get(&(level, gpa))
                .ok_or(TdxStatus::EptEntryNotPresent)?;
            Self::tracked(state, leaf.blocked)?;
            state.remove_leaf(level, gpa);
            for i in 0..bytes(level) / PAGE {
                state.pages.insert(leaf.page + i * PAGE, PageState::Removed);
            }
            self.adjust_parent(state, level, gpa, -1);
            Ok(Hpa(leaf.page))
        })
    }

    fn sept_remove(&self, gpa: Gpa, level: Level) -> SeamcallResult<Hpa> {
        let gpa = gpa.0;
        self.call(Seamcall::MemSeptRemove, |state| {
            let level = self.check_level(level, self.levels - 1)?;
            let table = *state
                .tables
                .get(&(level, gpa))
                .ok_or(TdxStatus::EptEntryNotPresent)?;
            Self::tracked(state, table.blocked)?;
            if table.children != 0 {
                return Err(TdxStatus::EptPageNotFree);
            }
            let page = table.page.ok_or(TdxStatus::OperandInvalid)?;
            state.remove_table(level, gpa);
            state.pages.insert(page, PageState::Removed);
            self.adjust_parent(state, level + 1, gpa, -1);
            Ok(Hpa(page))
        })
    }

    fn page_demote(
        &self,
        gpa: Gpa,
        level: Level,
        new_sept_page: Hpa,
        pamt_pair: Option<[Hpa; 2]>,
    ) -> SeamcallResult {
        let gpa = gpa.0;
        let new_sept_page = new_sept_page.0;
        let pamt_pair = pamt_pair.map(|pair| pair.map(|page| page.0));
        self.call(Seamcall::MemPageDemote, |state| {
            let level = self.check_level(level, 3)?;
            if level < 2 {
                return Err(TdxStatus::OperandInvalid);
            }
            let leaf = *state
                .leaves
                .get(&(level, gpa))
                .ok_or(TdxStatus::EptEntryStateIncorrect)?;
            Self::tracked(state, leaf.blocked)?;
            if state.pages.contains_key(&new_sept_page) {
                return Err(TdxStatus::PageMetadataIncorrect);
            }
            if !Self::pamt_backed(state, new_sept_page) {
                return Err(TdxStatus::MissingPamtPagePair);
            }
            // Dynamic PAMT: the 4K children of a 2 MiB page need the 4K
            // PAMT of its range, which DEMOTE takes as its own operands (a
            // PAMT.ADD is refused while the range is mapped 2M).
            let region = leaf.page & !(REGION - 1);
            match (level, pamt_pair) {
                (2, None) => return Err(TdxStatus::MissingPamtPagePair),
                (2, Some(pair)) => {
                    // The module's `pamt_demote()` (pamt_manager.c): each
                    // page must be aligned (TDX_OPERAND_INVALID) and free
                    // (TDX_PAGE_NOT_FREE); it never compares the two, so
                    // the same page twice fails the second PAMT_PAGE_BITMAP
                    // test-and-set: TDX_PAGE_NOT_FREE as well.
                    if pair.iter().any(|p| !p.is_multiple_of(PAGE)) {
                        return Err(TdxStatus::OperandInvalid);
                    }
                    if pair[0] == pair[1]
                        || pair
                            .iter()
                            .any(|p| state.pages.contains_key(p) || *p == new_sept_page)
                    {
                        return Err(TdxStatus::PageNotFree);
                    }
                }
                (_, Some(_)) => return Err(TdxStatus::OperandInvalid),
                (_, None) => {}
            }
            let below = level - 1;
            state.remove_leaf(level, gpa);
            state.pages.insert(new_sept_page, PageState::Sept);
            state.insert_table(
                below,
                gpa,
                Table {
                    page: Some(new_sept_page),
                    blocked: None,
                    children: 512,
                },
            );
            let step = bytes(below);
            for i in 0..512 {
                state.insert_leaf(below, gpa + i * step, leaf.page + i * step);
            }
            for i in 0..bytes(level) / PAGE {
                state
                    .pages
                    .insert(leaf.page + i * PAGE, PageState::Guest { level: below });
            }
            if let Some(pair) = pamt_pair {
                for page in pair {
                    state.pages.insert(page, PageState::Pamt);
                }
                state.pamt.insert(region, pair);
            }
            Ok(())
        })
    }

    fn page_reclaim(&self, page: Hpa) -> SeamcallResult {
        let page = page.0;
        self.call(Seamcall::PhymemPageReclaim, |state| {
            if !state.key_released {
                return Err(TdxStatus::LifecycleStateIncorrect);
            }
            match state.pages.get(&page) {
                Some(PageState::Sept) => {
                    if let Some((level, gpa)) = state.table_of_page.get(&page).copied() {
                        state.remove_table(level, gpa);
                    }
                    state.pages.remove(&page);
                }
                Some(PageState::Guest { level }) => {
                    let level = *level;
                    if let Some((at, gpa)) = state.leaf_of_page.get(&page).copied()
                        && at == level
                    {
                        state.remove_leaf(level, gpa);
                    }
                    for i in 0..bytes(level) / PAGE {
                        state.pages.remove(&(page + i * PAGE));
                    }
                }
                _ => return Err(TdxStatus::PageMetadataIncorrect),
            }
            Ok(())
        })
    }

    fn page_wbinvd(&self, page: Hpa) -> SeamcallResult {
        let page = page.0;
        self.call(Seamcall::PhymemPageWbinvd, |state| {
            if state.pages.get(&page) != Some(&PageState::Removed) {
                return Err(TdxStatus::PageMetadataIncorrect);
            }
            state.pages.remove(&page);
            Ok(())
        })
    }

    fn pamt_add(&self, region: Hpa, pages: [Hpa; 2]) -> SeamcallResult {
        let region = region.0;
        let pages = pages.map(|page| page.0);
        self.pamt_call(Seamcall::PhymemPamtAdd, region, |state| {
            if !region.is_multiple_of(REGION) || pages.iter().any(|p| !p.is_multiple_of(PAGE)) {
                return Err(TdxStatus::OperandInvalid);
            }
            // The range has a 4K PAMT already, or is mapped as a 2 MiB
            // private page (its 2M PAMT entry is taken).
            if state.pamt.contains_key(&region)
                || state.pages.get(&region) == Some(&PageState::Guest { level: 2 })
            {
                return Err(TdxStatus::HpaRangeNotFree);
            }
            // `tdh_phymem_pamt_add()` never compares the two pages: given
            // the same page twice, the second PAMT_PAGE_BITMAP test-and-set
            // fails, and the answer is TDX_PAGE_NOT_FREE, as for a page in
            // use.
            if pages[0] == pages[1] || pages.iter().any(|p| state.pages.contains_key(p)) {
                return Err(TdxStatus::PageNotFree);
            }
            for page in pages {
                state.pages.insert(page, PageState::Pamt);
            }
            state.pamt.insert(region, pages);
            Ok(())
        })
    }

    fn pamt_remove(&self, region: Hpa) -> SeamcallResult<[Hpa; 2]> {
        let region = region.0;
        self.pamt_call(Seamcall::PhymemPamtRemove, region, |state| {
            let pages = *state.pamt.get(&region).ok_or(TdxStatus::NoPamtPagePair)?;
            let in_use = (0..REGION / PAGE).any(|i| {
                matches!(
                    state.pages.get(&(region + i * PAGE)),
                    Some(PageState::Sept | PageState::Guest { level: 1 } | PageState::Removed)
                )
            });
            if in_use {
                return Err(TdxStatus::PamtPageNotEmpty);
            }
            state.pamt.remove(&region);
            for page in pages {
                state.pages.remove(&page);
            }
            Ok(pages.map(Hpa))
        })
    }

    fn kick_vcpus(&self) {
        let mut state = self.lock();
        state.kicked = state.epoch;
    }

    fn finalize(&self) -> SeamcallResult {
        let mut state = self.lock();
        if state.finalized {
            return Err(TdxStatus::LifecycleStateIncorrect);
        }
        state.finalized = true;
        Ok(())
    }

    fn is_finalized(&self) -> bool {
        self.lock().finalized
    }

    fn release_key(&self) -> SeamcallResult {
        let mut state = self.lock();
        if state.key_released {
            return Err(TdxStatus::LifecycleStateIncorrect);
        }
        state.key_released = true;
        Ok(())
    }
}
