//! Faults: a walk from the root under the shared lock, tables and leaves
//! installed with compare-and-exchange, lazy splits of write-protected huge
//! leaves.

use super::*;

impl TdpMmu {
    /// Handles a fault at `gpa`: tops up `caches` (outside the lock), then
    /// maps the frame under the shared lock, with the largest leaf the slot
    /// allows unless dirty logging forbids huge ones.
    pub fn fault(
        &self,
        caches: &mut VcpuCaches,
        gpa: Gpa,
        write: bool,
    ) -> Result<Translation, MmuError> {
        let gfn = gpa.gfn().0;
        if gpa.0 >> (self.top_level().shift() + 9) != 0 {
            return Err(MmuError::AddressTooWide {
                gpa,
                levels: self.config.levels,
            });
        }
        let slot = self
            .slot_for_gfn(Gfn(gfn))
            .ok_or(MmuError::NoSlot { gpa })?;
        self.counters.faults.fetch_add(1, Ordering::Relaxed);
        let capacity = self.config.vcpu_cache_capacity;
        loop {
            caches.topup_for_fault(capacity, self.external_tables.then_some(self.config.levels))?;
            self.hooks.topup(
                Topup::Fault {
                    levels: self.config.levels,
                },
                caches.hook_state(),
            )?;
            self.table_map().reserve(self.config.levels as usize);
            let _guard = self.read_lock();
            let _no_alloc = NoAllocSection::enter();
            match self.map(caches, &slot, gfn, write)? {
                Some(translation) => {
                    return Ok(Translation {
                        hpa: Hpa(translation.hpa.0 | gpa.page_offset()),
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
    pub(super) fn map(
        &self,
        caches: &mut VcpuCaches,
        slot: &Memslot,
        gfn: u64,
        write: bool,
    ) -> Result<Option<Translation>, MmuError> {
        let goal = if slot.logging() {
            Level::L4K
        } else {
            slot.max_level(Gfn(gfn)).min(self.max_leaf)
        };
        self.walk(gfn, |step| {
            let WalkStep {
                table,
                index,
                level,
                entry,
            } = step;
            if entry.bits() == FROZEN {
                return Next::Stop(Ok(None));
            }
            let at_goal = level <= goal;
            // A leaf that already allows the access makes the fault spurious:
            // keep it. Only a write to a write-protected huge leaf above the
            // goal replaces it (the lazy split).
            let usable = !write || entry.has(WRITE);
            if entry.is_leaf(level) && (at_goal || !entry.is_huge_leaf(level) || usable) {
                return Next::Stop(Ok(self.touch_leaf(table, index, level, entry, gfn, write)));
            }
            if entry.is_present() && !entry.is_leaf(level) {
                // A table, above the goal or where a huge leaf could go (left
                // by dirty logging): map inside it.
                return Next::Descend(entry.addr(level));
            }
            if at_goal {
                return Next::Stop(self.install_leaf(
                    table,
                    index,
                    level,
                    slot,
                    gfn,
                    write,
                    caches.hook_state(),
                ));
            }
            // Above the goal: descend, installing a table where needed. A
            // write-protected huge leaf in the way is split into a full table
            // of its 512 children (the kernel's `tdp_mmu_split_huge_page` in
            // `kvm_tdp_mmu_map`), so its other mappings stay.
            let linked = if entry.is_huge_leaf(level) {
                let base_gfn = gfn & !(level.entry_pages() - 1);
                let split = self.split_leaf(caches, table, index, level, entry, base_gfn, false);
                if matches!(split, Ok(Some(_))) {
                    self.counters.lazy_splits.fetch_add(1, Ordering::Relaxed);
                }
                split
            } else {
                self.link_new_table(caches, table, index, level, gfn)
            };
            match linked {
                Ok(Some(new_hpa)) => Next::Descend(new_hpa),
                Ok(None) => Next::Stop(Ok(None)),
                Err(err) => Next::Stop(Err(err)),
            }
        })
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

    pub(super) fn translation(&self, leaf: Entry, level: Level, gfn: u64) -> Translation {
        let offset_pages = gfn & (level.entry_pages() - 1);
        Translation {
            hpa: Hpa(leaf.addr(level) + (offset_pages << 12)),
            perms: leaf.perms(),
            memtype: leaf.memtype_bits(),
            level,
            entry: leaf,
        }
    }

    /// Installs a leaf in the non-present `table[index]`; `None` on a lost race.
    #[expect(
        clippy::too_many_arguments,
        reason = "the entry, its place, the fault and the vCPU, as the kernel passes them"
    )]
    fn install_leaf(
        &self,
        table: &[AtomicU64; 512],
        index: usize,
        level: Level,
        slot: &Memslot,
        gfn: u64,
        write: bool,
        vcpu: Option<&mut dyn HookVcpuState>,
    ) -> Result<Option<Translation>, MmuError> {
        let base_gfn = gfn & !(level.entry_pages() - 1);
        let mut leaf = Entry::leaf(
            level,
            slot.host_pfn(Gfn(base_gfn)).hpa().0,
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
        if let Err(err) = self.hooks.set_leaf(Gfn(base_gfn), level, leaf, vcpu) {
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
            hpa: Hpa(hpa),
            external: external.as_ref().map(|p| Hpa(p.addr() as u64)),
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
        if let Err(err) =
            self.hooks
                .link_table(Gfn(base_gfn), below, table_ref, caches.hook_state())
        {
            table[index].store(old.bits(), Ordering::Release);
            give_back(caches, page, external);
            return match err {
                HookError::Busy { .. } => Ok(None),
                refused => Err(refused.into()),
            };
        }
        let mut header = caches.headers.alloc()?;
        *header = TableHeader {
            gfn: Gfn(base_gfn),
            level: below.get(),
            page: Some(page),
            external,
        };
        self.table_map().insert(hpa, header);
        table[index].store(Entry::table(hpa).bits(), Ordering::Release);
        self.counters.tables_linked.fetch_add(1, Ordering::Relaxed);
        Ok(Some(hpa))
    }
}
