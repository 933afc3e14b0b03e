//! HugeTLB files: a memfd of 2 MiB or 1 GiB pages, reserved whole at
//! creation, and where the memory of each huge page lies while it is split.
//!
//! A huge page that becomes mixed (private and shared pages) is split so
//! that host views can fault on its private pages alone; one that becomes
//! uniform again is merged back. A 2 MiB page that no host view maps
//! splits in place (its order drops to 0, its memory stays put, as the
//! kernel splits a folio); one a host view maps splits into 4 KiB backing,
//! and so does one split in place when a host view comes to map it. A
//! 1 GiB page splits only what it must: into 2 MiB pieces (a HugeTLB file
//! of 2 MiB pages, the piece backing), and only the pieces that are mixed
//! go on down to 4 KiB; where the 2 MiB pool cannot hold the pieces, it
//! splits to 4 KiB whole. The split and merge steps are in `split.rs`.

mod split;
#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::ffi::CString;
use std::ops::Range;
use std::os::fd::OwnedFd;

use super::error::GmemError;
use super::mapping::{PUNCH_HOLE, fallocate, map_fault_source, map_file_at, map_whole, zero};
use super::{FileState, GmemConfig, PAGE_SIZE};
use crate::caps::HugetlbPool;
use crate::sys::{self, Mapping};

/// The size of a piece of a 1 GiB page split in two tiers.
pub(super) use mmukit_sys::size::PAGE_2M as PIECE;

/// A HugeTLB memfd, reserved whole at creation.
#[derive(Debug)]
pub(super) struct HugetlbFile {
    fd: OwnedFd,
    /// A mapping of the whole file: it holds the reservation, and splits
    /// copy from and to it.
    master: Mapping,
    /// The huge page size: 2 MiB or 1 GiB.
    page_size: u64,
    /// The file's size, a multiple of the page size.
    size: u64,
}

/// A file that split memory moves to, the size of the guest memory file,
/// and a mapping of all of it.
#[derive(Debug)]
pub(super) struct Backing {
    fd: OwnedFd,
    map: Mapping,
}

/// The 4 KiB backing and what lies on it.
#[derive(Debug)]
struct PageBacking {
    backing: Backing,
    /// Huge pages (`offset / page_size`) on 4 KiB pages whole.
    whole: BTreeSet<u64>,
    /// 2 MiB pieces (`offset / PIECE`) of tiered 1 GiB pages on 4 KiB
    /// pages.
    pieces: BTreeSet<u64>,
}

/// The 2 MiB backing of 1 GiB pages split in two tiers: a HugeTLB file of
/// 2 MiB pages, allocated only over tiered pages.
#[derive(Debug)]
struct PieceBacking {
    backing: Backing,
    /// 1 GiB pages (`offset / page_size`) split into pieces.
    tiered: BTreeSet<u64>,
}

/// Where the split huge pages of a file lie. Each backing is made at its
/// first use and holds the set of what lies on it, so a page is on a
/// backing only where the backing exists.
#[derive(Debug, Default)]
pub(super) struct SplitState {
    on_pages: Option<PageBacking>,
    in_pieces: Option<PieceBacking>,
    /// 2 MiB pages split in place: no host view maps them, so nothing
    /// has to hide their private pages, and their memory stays on the
    /// file's page (as the kernel splits a folio without moving it); their
    /// order is 0. A host view that comes to cover one moves it to the
    /// 4 KiB backing first.
    in_place: BTreeSet<u64>,
}

impl SplitState {
    /// Whether huge page `huge` is a tiered 1 GiB page.
    fn is_tiered(&self, huge: u64) -> bool {
        self.in_pieces
            .as_ref()
            .is_some_and(|pieces| pieces.tiered.contains(&huge))
    }

    /// Whether huge page `huge` is split (in place, whole on 4 KiB pages,
    /// or tiered).
    fn is_split(&self, huge: u64) -> bool {
        self.is_tiered(huge)
            || self.in_place.contains(&huge)
            || self
                .on_pages
                .as_ref()
                .is_some_and(|pages| pages.whole.contains(&huge))
    }

    /// Whether 2 MiB piece `piece` of a tiered page is on 4 KiB pages.
    fn piece_on_pages(&self, piece: u64) -> bool {
        self.on_pages
            .as_ref()
            .is_some_and(|pages| pages.pieces.contains(&piece))
    }

    /// The huge pages split now, in file order.
    pub(super) fn split_pages(&self) -> Vec<u64> {
        let whole = self.on_pages.iter().flat_map(|pages| &pages.whole);
        let tiered = self.in_pieces.iter().flat_map(|pieces| &pieces.tiered);
        let all: BTreeSet<u64> = whole.chain(tiered).chain(&self.in_place).copied().collect();
        all.into_iter().collect()
    }
}

/// Where the memory of a unit of the file lies now.
#[derive(Clone, Copy, Debug)]
pub(super) enum Memory<'a> {
    /// The file's own huge page.
    File,
    /// A 2 MiB page of the piece backing (a piece of a tiered 1 GiB page).
    Pieces(&'a Backing),
    /// The 4 KiB backing.
    Pages(&'a Backing),
}

/// A unit of the file: a huge page, or a 2 MiB piece of a tiered one,
/// and where its memory lies.
#[derive(Clone, Copy, Debug)]
pub(super) struct Unit<'a> {
    start: u64,
    end: u64,
    memory: Memory<'a>,
}

impl HugetlbFile {
    /// Creates a file of `config.size` bytes of `page_size` pages and
    /// reserves every page, or says how far the pool falls short.
    pub(super) fn create(config: GmemConfig, page_size: u64) -> Result<Self, GmemError> {
        let needed = config.size / page_size;
        let shortfall = |pool: Option<HugetlbPool>| GmemError::HugetlbShortfall {
            pool: pool
                .as_ref()
                .map_or_else(|| sys::hugetlb::pool_name(page_size), |p| p.name.clone()),
            needed,
            free: pool.map_or(0, |p| p.available),
        };
        let pool = HugetlbPool::read(page_size);
        if pool.as_ref().is_none_or(|p| p.available < needed) {
            return Err(shortfall(pool));
        }
        let log2 = page_size.trailing_zeros();
        let flags = libc::MFD_CLOEXEC | libc::MFD_HUGETLB | (log2 << libc::MFD_HUGE_SHIFT);
        let name = CString::new("mmukit-gmem-hugetlb").expect("no NUL");
        let fd = sys::memfd_create(&name, flags).map_err(GmemError::os("memfd_create"))?;
        sys::ftruncate(&fd, config.size).map_err(GmemError::os("ftruncate"))?;
        // A shared mapping without MAP_NORESERVE reserves every huge page of
        // the file now, so that no later fault can fail.
        let master = map_whole(&fd, config.size).map_err(|err| match err.errno() {
            libc::ENOMEM => shortfall(HugetlbPool::read(page_size)),
            _ => err,
        })?;
        Ok(Self {
            fd,
            master,
            page_size,
            size: config.size,
        })
    }

    /// The file's descriptor.
    pub(super) fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// The mapping of the whole file.
    pub(super) fn master(&self) -> &Mapping {
        &self.master
    }

    /// The huge page size.
    pub(super) fn page_size(&self) -> u64 {
        self.page_size
    }

    /// The unit holding `at` and where its memory is: a huge page on the
    /// file or on 4 KiB pages, or a 2 MiB piece of a tiered page on the
    /// piece backing or on 4 KiB pages.
    fn unit_of<'a>(&self, splits: &'a SplitState, at: u64) -> Unit<'a> {
        let huge = at / self.page_size;
        if let Some(pieces) = &splits.in_pieces
            && pieces.tiered.contains(&huge)
        {
            let piece = at / PIECE;
            let memory = match &splits.on_pages {
                Some(pages) if pages.pieces.contains(&piece) => Memory::Pages(&pages.backing),
                _ => Memory::Pieces(&pieces.backing),
            };
            return Unit {
                start: piece * PIECE,
                end: (piece + 1) * PIECE,
                memory,
            };
        }
        let memory = match &splits.on_pages {
            Some(pages) if pages.whole.contains(&huge) => Memory::Pages(&pages.backing),
            _ => Memory::File,
        };
        Unit {
            start: huge * self.page_size,
            end: (huge + 1) * self.page_size,
            memory,
        }
    }

    /// The descriptor that holds `memory`.
    fn fd_of<'a>(&'a self, memory: Memory<'a>) -> &'a OwnedFd {
        match memory {
            Memory::File => &self.fd,
            Memory::Pieces(backing) | Memory::Pages(backing) => &backing.fd,
        }
    }

    /// The mapping of the whole of what holds `memory`.
    fn map_of<'a>(&'a self, memory: Memory<'a>) -> &'a Mapping {
        match memory {
            Memory::File => &self.master,
            Memory::Pieces(backing) | Memory::Pages(backing) => &backing.map,
        }
    }

    /// The order of the page behind `offset` (what `kvm_gmem_get_pfn`
    /// returns as `max_order`): that of the huge page while it is whole, of
    /// a 2 MiB piece of a tiered page, 0 on 4 KiB pages and in a page split
    /// in place.
    pub(super) fn page_order(&self, splits: &SplitState, offset: u64) -> u8 {
        if splits.in_place.contains(&(offset / self.page_size)) {
            return 0;
        }
        let size = match self.unit_of(splits, offset).memory {
            Memory::File => self.page_size,
            Memory::Pieces(_) => PIECE,
            Memory::Pages(_) => PAGE_SIZE,
        };
        (size.trailing_zeros() - PAGE_SIZE.trailing_zeros()) as u8
    }

    /// Allocates `[start, end)`: the file, and the units on 4 KiB pages too
    /// (2 MiB pieces were allocated when their page was split).
    pub(super) fn allocate(
        &self,
        state: &FileState,
        start: u64,
        end: u64,
    ) -> Result<(), GmemError> {
        fallocate(&self.fd, libc::FALLOC_FL_KEEP_SIZE, start, end)?;
        let mut at = start;
        while at < end {
            let unit = self.unit_of(&state.splits, at);
            if let Memory::Pages(backing) = unit.memory {
                fallocate(
                    &backing.fd,
                    libc::FALLOC_FL_KEEP_SIZE,
                    at.max(unit.start),
                    end.min(unit.end),
                )?;
            }
            at = unit.end;
        }
        Ok(())
    }

    /// Punches `[start, end)`: units on 4 KiB pages punch their backing;
    /// huge pages and pieces are zeroed in place, so that they stay
    /// reserved and no later fault can fail.
    pub(super) fn punch(&self, state: &FileState, start: u64, end: u64) -> Result<(), GmemError> {
        let mut at = start;
        while at < end {
            let unit = self.unit_of(&state.splits, at);
            let next = unit.end.min(end);
            match unit.memory {
                Memory::Pages(backing) => fallocate(&backing.fd, PUNCH_HOLE, at, next)?,
                memory => zero(self.map_of(memory), at, next),
            }
            at = next;
        }
        Ok(())
    }

    /// Maps the memory of `[offset, offset + len)` at `addr` from where
    /// each unit lies now.
    ///
    /// # Safety
    ///
    /// `[addr, addr + len)` must lie inside a view's mapping, under the
    /// state lock.
    pub(super) unsafe fn map_memory(
        &self,
        state: &FileState,
        addr: *mut u8,
        offset: u64,
        len: u64,
    ) -> Result<(), GmemError> {
        let mut at = offset;
        while at < offset + len {
            let unit = self.unit_of(&state.splits, at);
            let next = unit.end.min(offset + len);
            // Pages of a unit that is not on 4 KiB pages share its
            // attribute, so the run covers it whole.
            debug_assert!(
                matches!(unit.memory, Memory::Pages(_)) || (at == unit.start && next == unit.end)
            );
            let target = addr.wrapping_add((at - offset) as usize);
            // SAFETY: inside the caller's range.
            unsafe { map_file_at(target, self.fd_of(unit.memory), at, next - at) }?;
            at = next;
        }
        Ok(())
    }

    /// Maps the units of `[start, end)` that view `id` covers whole from
    /// where their memory lies now.
    fn remap_view_range(
        &self,
        state: &FileState,
        id: u64,
        start: u64,
        end: u64,
    ) -> Result<(), GmemError> {
        let Some(view) = state.views.iter().find(|v| v.id == id) else {
            return Ok(());
        };
        let mut at = start;
        while at < end {
            let unit = self.unit_of(&state.splits, at);
            if unit.start >= view.offset && unit.end <= view.offset.saturating_add(view.len) {
                let addr = (view.addr + (unit.start - view.offset) as usize) as *mut u8;
                // SAFETY: the unit lies inside the view's own mapping
                // (checked just above, under the state lock); views hand out
                // raw pointers only.
                unsafe {
                    map_file_at(
                        addr,
                        self.fd_of(unit.memory),
                        unit.start,
                        unit.end - unit.start,
                    )
                }?;
            }
            at = unit.end;
        }
        Ok(())
    }

    /// Maps huge page `huge` of view `id` from where its memory lies now.
    /// A mapping of a 1 GiB HugeTLB page cannot be replaced in 2 MiB parts:
    /// for a tiered page the view's whole range goes to the fault source
    /// first, and its pieces are mapped over that.
    fn remap_view_huge_page(&self, state: &FileState, id: u64, huge: u64) -> Result<(), GmemError> {
        let (hs, he) = (huge * self.page_size, (huge + 1) * self.page_size);
        if state.splits.is_tiered(huge)
            && let Some(view) = state.views.iter().find(|v| v.id == id)
            && hs >= view.offset
            && he <= view.offset.saturating_add(view.len)
        {
            let addr = (view.addr + (hs - view.offset) as usize) as *mut u8;
            // SAFETY: the range lies inside the view's own mapping, under
            // the state lock; views hand out raw pointers only.
            unsafe { map_fault_source(addr, self.page_size) }?;
        }
        self.remap_view_range(state, id, hs, he)
    }

    /// Remaps `[start, end)` of every view from where its memory lies now.
    fn remap_views(&self, state: &FileState, start: u64, end: u64) -> Result<(), GmemError> {
        for view in &state.views {
            self.remap_view_range(state, view.id, start, end)?;
        }
        Ok(())
    }

    /// Maps the split huge pages of the new view `id` from where their
    /// memory lies now (2 MiB pieces or 4 KiB backing).
    pub(super) fn remap_new_view(&self, state: &FileState, id: u64) -> Result<(), GmemError> {
        for huge in state.splits.split_pages() {
            self.remap_view_huge_page(state, id, huge)?;
        }
        Ok(())
    }

    /// Makes the huge pages of `[start, end)` follow their new attributes:
    /// a page that became mixed is split, one that became uniform again is
    /// merged, and in a tiered 1 GiB page the pieces the range touched go
    /// to 4 KiB pages when mixed and back when uniform.
    ///
    /// Returns the page range (in 4 KiB pages) whose host views must be
    /// protected again: the range, widened to the huge pages reshaped. On
    /// failure, returns what was reshaped before the huge page that failed,
    /// which kept its layout as did those after it.
    pub(super) fn follow_conversion(
        &self,
        state: &mut FileState,
        start: u64,
        end: u64,
    ) -> Result<Range<u64>, ConversionStopped> {
        let pages_per_huge = self.page_size / PAGE_SIZE;
        let mut reshaped = start / PAGE_SIZE..end / PAGE_SIZE;
        for huge in start / self.page_size..end.div_ceil(self.page_size) {
            let (hs, he) = (huge * pages_per_huge, (huge + 1) * pages_per_huge);
            if let Err(error) = self.follow_in_huge_page(state, huge, start, end) {
                return Err(ConversionStopped {
                    reshaped_from: reshaped.start,
                    kept_from: hs.max(start / PAGE_SIZE),
                    error,
                });
            }
            reshaped = reshaped.start.min(hs)..reshaped.end.max(he);
        }
        Ok(reshaped)
    }

    /// [`follow_conversion`](Self::follow_conversion) for one huge page.
    fn follow_in_huge_page(
        &self,
        state: &mut FileState,
        huge: u64,
        start: u64,
        end: u64,
    ) -> Result<(), GmemError> {
        let pages_per_huge = self.page_size / PAGE_SIZE;
        let mixed = is_mixed(state, huge * pages_per_huge, (huge + 1) * pages_per_huge);
        match (mixed, state.splits.is_split(huge)) {
            (true, false) => self.split(state, huge)?,
            (false, true) => self.merge(state, huge)?,
            _ => {}
        }
        if !state.splits.is_tiered(huge) {
            return Ok(());
        }
        let base = huge * self.page_size;
        let (rs, re) = (start.max(base), end.min(base + self.page_size));
        let pages_per_piece = PIECE / PAGE_SIZE;
        for piece in rs / PIECE..re.div_ceil(PIECE) {
            let mixed = is_mixed(
                state,
                piece * pages_per_piece,
                (piece + 1) * pages_per_piece,
            );
            match (mixed, state.splits.piece_on_pages(piece)) {
                (true, false) => self.split_piece(state, piece)?,
                (false, true) => self.merge_piece(state, piece)?,
                _ => {}
            }
        }
        Ok(())
    }
}

/// Where a conversion's reshaping of huge pages stopped, in 4 KiB pages.
#[derive(Debug)]
pub(super) struct ConversionStopped {
    /// The first page of the huge pages reshaped before the failure.
    pub(super) reshaped_from: u64,
    /// The first page whose huge page kept its layout (and whose
    /// attributes must go back to what they were).
    pub(super) kept_from: u64,
    /// Why.
    pub(super) error: GmemError,
}

/// Whether pages `[first, last)` hold both attributes.
fn is_mixed(state: &FileState, first: u64, last: u64) -> bool {
    state.attrs.uniform(first, last).is_none()
}
