//! Shadow pages: found or made by `(gfn, role)`, linked, and zapped.

use mmu_cache::ObjectCache;
use mmu_cache::alloc::NoAllocSection;

use crate::addr::{Gfn, Hpa};
use crate::ept::{self, Entry, Level};
use crate::translation::stat_index;

use super::{
    PteListDesc, Role, ShadowCaches, ShadowError, ShadowMmu, ShadowPage, ShadowPageInfo, State,
    Vcpu,
};

impl ShadowMmu {
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
        state.reserve_pages(1);
        let _no_alloc = NoAllocSection::enter();
        let (hpa, created) = self.get_sp(&mut state, caches, vcpu, gfn, role)?;
        Ok((state.sp(hpa).info(), created))
    }

    pub(super) fn get_sp(
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
        state.hash_insert_new(hpa, &mut header);
        state.pages.insert(hpa, header);
        state.counters.pages_created += 1;
        Ok((hpa, true))
    }

    /// The shadow page `(gfn, role)`, if one is valid.
    pub fn find_shadow_page(&self, gfn: Gfn, role: Role) -> Option<ShadowPageInfo> {
        let state = self.lock();
        state.find(gfn.0, role).map(|hpa| state.sp(hpa).info())
    }

    /// The shadow page at `hpa`.
    pub fn shadow_page(&self, hpa: Hpa) -> Option<ShadowPageInfo> {
        self.lock().pages.get(&hpa.0).map(|sp| sp.info())
    }

    /// Shadow pages alive (roots zapped while in use included).
    pub fn shadow_pages(&self) -> usize {
        self.lock().pages.len()
    }

    /// Points `parent_addr` at the shadow page `child`.
    pub(super) fn link(
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
    pub fn zap_shadow_page(&self, hpa: Hpa) -> Result<(), ShadowError> {
        let hpa = hpa.0;
        let mut state = self.lock();
        if state.pages.get(&hpa).is_none_or(|sp| sp.invalid) {
            return Err(ShadowError::NoSuchPage { hpa: Hpa(hpa) });
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
    pub fn zap_gfn_range(&self, start_gfn: Gfn, end_gfn: Gfn) {
        let mut state = self.lock();
        let _no_alloc = NoAllocSection::enter();
        self.zap_leaves(&mut state, start_gfn.0, end_gfn.0);
    }

    pub(super) fn zap_leaves(&self, state: &mut State, start: u64, end: u64) {
        for level in [Level::L4K, Level::L2M, Level::L1G] {
            let pages = level.entry_pages();
            for si in 0..state.slots.len() {
                let slot = state.slots[si].slot.clone();
                let first = start.max(slot.base_gfn().0) & !(pages - 1);
                let last = end.min(slot.end_gfn().0);
                let mut gfn = first;
                while gfn < last {
                    let at = gfn.max(slot.base_gfn().0);
                    while let Some(addr) = state.slots[si].head(level, at).first() {
                        self.drop_leaf(state, addr, level);
                    }
                    gfn += pages;
                }
            }
        }
    }

    pub(super) fn drop_leaf(&self, state: &mut State, addr: u64, level: Level) {
        let leaf = state.spte(addr);
        let gfn = state.leaf_gfn(leaf, level);
        let removed = state.rmap(level, gfn).remove(addr);
        debug_assert!(removed, "leaf {addr:#x} was not in its rmap");
        state.set_spte(addr, Entry::NON_PRESENT);
        state.stats[stat_index(level)] -= 1;
    }

    pub(super) fn unlink_child(&self, state: &mut State, addr: u64) {
        let child = state.spte(addr).bits() & ept::ADDR_MASK;
        state.set_spte(addr, Entry::NON_PRESENT);
        let sp = state.sp_mut(child);
        let removed = sp.parents.remove(addr);
        debug_assert!(removed, "parent {addr:#x} missing from {child:#x}");
        if sp.parents.first().is_none() && sp.root_count == 0 {
            self.zap_sp(state, child);
        }
    }

    pub(super) fn zap_sp(&self, state: &mut State, hpa: u64) {
        let (level, direct, gfn) = {
            let sp = state.sp(hpa);
            (sp.role.entry_level(), sp.role.direct, sp.gfn)
        };
        let implied = direct
            && state
                .slot_index(gfn)
                .is_some_and(|si| state.slots[si].forget_implied(level, gfn, hpa));
        if implied {
            // The page still has the 512 leaves a split gave it, and their
            // rmaps are its run's word, now cleared.
            let words = state
                .sp_mut(hpa)
                .page
                .as_mut()
                .expect("live pages have a table")
                .words_mut();
            debug_assert!(words.iter().all(|&w| Entry::from_bits(w).is_leaf(level)));
            words.fill(ept::NON_PRESENT);
            state.stats[stat_index(level)] -= 512;
        } else {
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
}
