//! Faults: the guest EPT walk (the CPU's rules) and the shadow path.

use mmu_cache::alloc::NoAllocSection;

use crate::addr::{Gfn, Gpa, Hpa};
use crate::ept::{ACCESSED, AccessKind, DIRTY, Entry, EptCaps, Level, RWX, WRITE};
use crate::guest::GuestTables;
use crate::memslot::Memslot;
use crate::translation::{Access, Translation, stat_index};

use super::{
    GUEST_ACCESS_SHIFT, Role, ShadowCaches, ShadowError, ShadowMmu, State, Vcpu, guest_access,
};

/// What a shadow leaf maps: the L1 memslot of the frame, the guest's walk
/// to it, and whether the fault writes.
#[derive(Clone, Copy)]
struct LeafTarget<'a> {
    slot: &'a Memslot,
    walk: &'a GuestWalk,
    write: bool,
}

/// The walk of the guest's EPT for one nested frame.
pub(super) struct GuestWalk {
    /// The guest table frame per level (index = level number).
    pub(super) tables: [u64; 6],
    pub(super) leaf_level: Level,
    /// The L1 frame of the 4K page.
    pub(super) gfn: u64,
    /// Effective permissions: the AND of every level's.
    pub(super) access: u64,
    /// Permissions accumulated above each level (index = level number).
    pub(super) access_above: [u64; 6],
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
            .map_err(|source| ShadowError::GuestMisconfig {
                ngpa: Gpa(ngpa),
                source,
            })?;
        walk.access &= entry.perms();
        if !entry.is_present() || !kind.allowed_by(walk.access) {
            return Err(ShadowError::GuestViolation {
                ngpa: Gpa(ngpa),
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

impl ShadowMmu {
    fn check_width(vcpu: &Vcpu, ngpa: u64) -> Result<(), ShadowError> {
        if ngpa >> (vcpu.top_level().shift() + 9) != 0 {
            return Err(ShadowError::AddressTooWide {
                ngpa: Gpa(ngpa),
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
        ngpa: Gpa,
        kind: AccessKind,
    ) -> Result<Translation, ShadowError> {
        let ngpa = ngpa.0;
        let write = kind == AccessKind::Write;
        Self::check_width(vcpu, ngpa)?;
        caches.topup()?;
        let levels = usize::from(vcpu.guest.levels());
        let mut state = self.lock();
        state.reserve_pages(levels + 1);
        let _no_alloc = NoAllocSection::enter();
        state.counters.faults += 1;
        let walk = walk_guest(&*vcpu.guest, self.config.ept_caps, ngpa, kind)?;
        let slot = state
            .slot_index(walk.gfn)
            .map(|si| state.slots[si].slot.clone())
            .ok_or(ShadowError::NoSlot { gfn: Gfn(walk.gfn) })?;
        let root = self.load_root(&mut state, caches, vcpu)?;
        let vcpu: &Vcpu = vcpu;
        let ngfn = ngpa >> 12;
        let goal = if slot.logging() {
            Level::L4K
        } else {
            walk.leaf_level.min(slot.max_level(Gfn(walk.gfn)))
        };
        let mut sp = root;
        let mut level = vcpu.top_level();
        loop {
            let addr = sp + 8 * level.index(ngfn) as u64;
            let spte = state.spte(addr);
            if level == goal {
                let base_gfn = walk.gfn & !(level.entry_pages() - 1);
                let current = spte.is_leaf(level)
                    && spte.addr(level) == slot.host_pfn(Gfn(base_gfn)).hpa().0
                    && guest_access(spte) == walk.access;
                let target = LeafTarget {
                    slot: &slot,
                    walk: &walk,
                    write,
                };
                if current {
                    let leaf = self.touch_leaf(&mut state, target, addr, spte);
                    return Ok(self.translation(leaf, level, ngpa));
                }
                if spte.is_leaf(level) {
                    // Stale: the guest changed its mapping (an unsync page).
                    self.drop_leaf(&mut state, addr, level);
                } else if spte.is_present() {
                    // A table where a huge leaf fits again (after dirty logging).
                    self.unlink_child(&mut state, addr);
                }
                let leaf = self.install_leaf(&mut state, caches, target, addr, level)?;
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

    pub(super) fn translation(&self, leaf: Entry, level: Level, ngpa: u64) -> Translation {
        let offset = ngpa & (level.entry_bytes() - 1);
        Translation {
            hpa: Hpa(leaf.addr(level) + offset),
            perms: leaf.perms(),
            memtype: leaf.memtype_bits(),
            level,
            entry: leaf,
        }
    }

    /// Marks the current leaf at `addr` accessed (and dirty, logged, on a
    /// write) for `target`.
    fn touch_leaf(
        &self,
        state: &mut State,
        target: LeafTarget<'_>,
        addr: u64,
        leaf: Entry,
    ) -> Entry {
        let LeafTarget { slot, walk, write } = target;
        let touched = if write {
            if slot.logging() {
                slot.mark_dirty(Gfn(walk.gfn));
            }
            leaf.with(WRITE | ACCESSED | DIRTY)
        } else {
            leaf.with(ACCESSED)
        };
        state.set_spte(addr, touched);
        touched
    }

    /// Installs the shadow leaf for `target` at `addr` (an entry of
    /// `level`), with its rmap entry.
    fn install_leaf(
        &self,
        state: &mut State,
        caches: &mut ShadowCaches,
        target: LeafTarget<'_>,
        addr: u64,
        level: Level,
    ) -> Result<Entry, ShadowError> {
        let LeafTarget { slot, walk, write } = target;
        let base_gfn = walk.gfn & !(level.entry_pages() - 1);
        let mut perms = walk.access;
        if slot.logging() && !write {
            perms &= !WRITE;
        }
        let mut leaf = Entry::leaf(
            level,
            slot.host_pfn(Gfn(base_gfn)).hpa().0,
            perms,
            self.config.memtype,
        )?
        .with(ACCESSED | (walk.access << GUEST_ACCESS_SHIFT));
        if write {
            leaf = leaf.with(DIRTY);
            if slot.logging() {
                slot.mark_dirty(Gfn(walk.gfn));
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
    pub fn access(&self, vcpu: &Vcpu, ngpa: Gpa, kind: AccessKind) -> Access {
        let ngpa = ngpa.0;
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
        ngpa: Gpa,
    ) -> Result<Hpa, ShadowError> {
        match self.access(vcpu, ngpa, AccessKind::Write) {
            Access::Hit(hpa) => Ok(hpa),
            Access::Miss => self
                .fault(caches, vcpu, ngpa, AccessKind::Write)
                .map(|t| t.hpa),
        }
    }

    /// Translates `ngpa` through `vcpu`'s shadow tables, without side effects.
    pub fn translate(&self, vcpu: &Vcpu, ngpa: Gpa) -> Option<Translation> {
        let ngpa = ngpa.0;
        let root = vcpu.root?;
        let state = self.lock();
        if state.pages.get(&root).is_none_or(|sp| sp.invalid) {
            return None;
        }
        let (_, level, leaf) = Self::find_leaf(&state, root, vcpu.top_level(), ngpa)?;
        Some(self.translation(leaf, level, ngpa))
    }
}
