//! Unsync pages: the write-protection trap and the sync from the guest.

use mmu_cache::alloc::NoAllocSection;

use crate::addr::Gfn;
use crate::ept::Level;
use crate::guest::GuestTables;

use super::{ShadowMmu, State, Vcpu, guest_access};

impl ShadowMmu {
    /// The guest wrote its table at L1 frame `table_gfn` (the write that a
    /// write-protected table traps). Shadow pages of a 4K-level table become
    /// unsync and are re-read at the next sync; those of higher levels are
    /// zapped. Returns how many shadow pages were affected.
    pub fn guest_table_written(&self, table_gfn: Gfn) -> usize {
        let table_gfn = table_gfn.0;
        let mut state = self.lock();
        let _no_alloc = NoAllocSection::enter();
        let mut affected = 0;
        let mut cursor = state.buckets[state.bucket(table_gfn)];
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
            let mut cursor = state.buckets[state.bucket(table_gfn)];
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
    pub(super) fn sync_sp(&self, state: &mut State, hpa: u64, guest: &dyn GuestTables) {
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
                        slot.host_pfn(Gfn(wanted.addr(Level::L4K) >> 12)).hpa().0
                            == leaf.addr(Level::L4K)
                    });
            if !keep {
                self.drop_leaf(state, addr, Level::L4K);
            }
        }
        state.sp_mut(hpa).unsync = false;
        state.counters.syncs += 1;
    }
}
