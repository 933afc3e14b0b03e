//! Dirty logging on the shadow MMU: write protection through the rmaps.

use mmu_cache::alloc::NoAllocSection;

use crate::addr::Gfn;
use crate::ept::{Level, WRITE};
use crate::memslot::{LogMode, Memslot, MemslotError};

use super::{ShadowError, ShadowMmu};

impl ShadowMmu {
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
            self.write_protect(&slot, slot.base_gfn().0, slot.end_gfn().0, None);
        }
        Ok(())
    }

    /// Eager splitting for dirty logging, best effort as the kernel's
    /// `kvm_shadow_mmu_try_split_huge_pages`: a failure (the split caches
    /// could not be filled) leaves huge leaves for the write-protect pass,
    /// and a write fault drops them later.
    fn try_split_huge_pages(&self, start: Gfn, end: Gfn) {
        if !self.config.eager_split {
            return;
        }
        if let Err(err) = self.split_huge_pages(start, end, Level::L4K) {
            tracing::debug!(start = start.0, end = end.0, %err, "shadow eager split fell back to write protection");
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
                self.write_protect(&slot, slot.base_gfn().0, slot.end_gfn().0, Some((0, &log)));
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
            self.try_split_huge_pages(Gfn(range.start), Gfn(range.end));
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
                let at = gfn.max(slot.base_gfn().0);
                let selected = level > Level::L4K
                    || mask.is_none_or(|(first_page, bits)| {
                        let page = at - slot.base_gfn().0 - first_page;
                        bits.get((page / 64) as usize)
                            .is_some_and(|w| w & (1 << (page % 64)) != 0)
                    });
                if selected {
                    rmaps.for_each_entry(level, at, |addr| {
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
