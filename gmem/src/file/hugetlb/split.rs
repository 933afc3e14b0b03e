//! The split of a huge page that becomes mixed and its merge back, each
//! in the order that keeps the page's data whole if a step fails.

use std::collections::BTreeSet;
use std::time::Instant;

use super::super::error::GmemError;
use super::super::mapping::{
    PUNCH_HOLE, copy_into_new_pages, copy_range, fallocate, map_whole, map_whole_sparse,
    read_range_from, write_range_into,
};
use super::super::{FileMetrics, FileState};
use super::{Backing, HugetlbFile, Memory, PIECE, PageBacking, PieceBacking};
use crate::sys;

// A whole huge page of a view is remapped through this seam, which the
// tests make fail on cue to check a merge's rollback.
#[cfg(not(test))]
use super::super::mapping::map_file_at as remap_whole_page;
#[cfg(test)]
use super::tests::remap_whole_page;

impl FileMetrics {
    /// Counts a split that began at `start`.
    fn count_split(&mut self, start: Instant) {
        self.splits += 1;
        self.split_now += 1;
        self.split_time += start.elapsed();
    }

    /// Counts a merge that began at `start`.
    fn count_merge(&mut self, start: Instant) {
        self.merges += 1;
        self.split_now -= 1;
        self.merge_time += start.elapsed();
    }
}

impl HugetlbFile {
    /// The 4 KiB backing, made at first use: a sparse memfd.
    fn page_backing<'a>(&self, state: &'a mut FileState) -> Result<&'a mut PageBacking, GmemError> {
        let pages = match state.splits.on_pages.take() {
            Some(pages) => pages,
            None => {
                let fd = sys::memfd_create(c"mmukit-gmem-split", libc::MFD_CLOEXEC)
                    .map_err(GmemError::os("memfd_create"))?;
                sys::ftruncate(&fd, self.size).map_err(GmemError::os("ftruncate"))?;
                let map = map_whole(&fd, self.size)?;
                PageBacking {
                    backing: Backing { fd, map },
                    whole: BTreeSet::new(),
                    pieces: BTreeSet::new(),
                }
            }
        };
        Ok(state.splits.on_pages.insert(pages))
    }

    /// The 2 MiB piece backing, made at first use: a HugeTLB memfd of
    /// 2 MiB pages mapped without a reservation, so that pages are taken
    /// only where a 1 GiB page is split.
    fn piece_backing<'a>(
        &self,
        state: &'a mut FileState,
    ) -> Result<&'a mut PieceBacking, GmemError> {
        let pieces = match state.splits.in_pieces.take() {
            Some(pieces) => pieces,
            None => {
                let flags = libc::MFD_CLOEXEC | libc::MFD_HUGETLB | (21 << libc::MFD_HUGE_SHIFT);
                let fd = sys::memfd_create(c"mmukit-gmem-pieces", flags)
                    .map_err(GmemError::os("memfd_create"))?;
                sys::ftruncate(&fd, self.size).map_err(GmemError::os("ftruncate"))?;
                let map = map_whole_sparse(&fd, self.size)?;
                PieceBacking {
                    backing: Backing { fd, map },
                    tiered: BTreeSet::new(),
                }
            }
        };
        Ok(state.splits.in_pieces.insert(pieces))
    }

    /// Splits a huge page that became mixed: a 1 GiB page into 2 MiB pieces
    /// when the 2 MiB pool can hold them, else (and a 2 MiB page) into
    /// 4 KiB backing.
    pub(super) fn split(&self, state: &mut FileState, huge: u64) -> Result<(), GmemError> {
        if self.page_size == PIECE && !self.host_view_covers(state, huge) {
            // Nothing maps the page for the host: only its order changes.
            let start = Instant::now();
            state.splits.in_place.insert(huge);
            state.metrics.count_split(start);
            return Ok(());
        }
        if self.page_size > PIECE {
            match self.split_tiered(state, huge) {
                Ok(()) => return Ok(()),
                Err(err) if matches!(err.errno(), libc::ENOSPC | libc::ENOMEM) => {
                    tracing::debug!(%err, huge, "no 2 MiB pieces: splitting to 4 KiB whole");
                }
                Err(err) => return Err(err),
            }
        }
        self.split_to_pages(state, huge)
    }

    /// A 1 GiB page into 2 MiB pieces: its 2 MiB pages are allocated for
    /// this page only, the data copied, every view remapped piece by piece.
    fn split_tiered(&self, state: &mut FileState, huge: u64) -> Result<(), GmemError> {
        let start = Instant::now();
        let (offset, len) = (huge * self.page_size, self.page_size);
        let pieces = self.piece_backing(state)?;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
        // SAFETY: the page is not accessed while it is split, and the piece
        // range is this page's alone.
        let copied = unsafe {
            copy_into_new_pages(
                &self.master,
                &pieces.backing.map,
                offset,
                len,
                PIECE,
                threads,
            )
        };
        if let Err(err) = copied {
            // Give back the pieces taken before the pool ran short.
            let _ = fallocate(&pieces.backing.fd, PUNCH_HOLE, offset, offset + len);
            return Err(err);
        }
        pieces.tiered.insert(huge);
        state.metrics.copy_time += start.elapsed();
        for view in &state.views {
            self.remap_view_huge_page(state, view.id, huge)?;
        }
        state.metrics.count_split(start);
        Ok(())
    }

    /// A 2 MiB piece of a tiered page into 4 KiB backing.
    pub(super) fn split_piece(&self, state: &mut FileState, piece: u64) -> Result<(), GmemError> {
        let start = Instant::now();
        let offset = piece * PIECE;
        self.page_backing(state)?;
        let unit = self.unit_of(&state.splits, offset);
        let (from, to) = match (unit.memory, &state.splits.on_pages) {
            (Memory::Pieces(from), Some(to)) => (&from.map, &to.backing.fd),
            // Already on 4 KiB pages (or not in a tiered page at all).
            _ => return Ok(()),
        };
        // SAFETY: the piece is not accessed while it is split.
        unsafe { write_range_into(from, to, offset, PIECE) }?;
        state.metrics.copy_time += start.elapsed();
        self.set_piece_on_pages(state, piece, true);
        self.remap_views(state, offset, offset + PIECE)?;
        state.metrics.count_split(start);
        Ok(())
    }

    /// A 2 MiB piece back from 4 KiB backing onto its piece page.
    pub(super) fn merge_piece(&self, state: &mut FileState, piece: u64) -> Result<(), GmemError> {
        let start = Instant::now();
        let offset = piece * PIECE;
        let (Some(pages), Some(pieces)) = (&state.splits.on_pages, &state.splits.in_pieces) else {
            // Without both backings no piece is on 4 KiB pages.
            return Ok(());
        };
        // SAFETY: as in `split_piece`.
        unsafe { read_range_from(&pages.backing.fd, &pieces.backing.map, offset, PIECE) }?;
        state.metrics.copy_time += start.elapsed();
        self.set_piece_on_pages(state, piece, false);
        if let Err(err) = self.remap_views(state, offset, offset + PIECE) {
            // Views already moved see the same data as those left behind.
            self.set_piece_on_pages(state, piece, true);
            let _ = self.remap_views(state, offset, offset + PIECE);
            return Err(err);
        }
        if let Some(pages) = &state.splits.on_pages
            && let Err(err) = fallocate(&pages.backing.fd, PUNCH_HOLE, offset, offset + PIECE)
        {
            tracing::warn!(%err, piece, "merge: punching the 4 KiB backing failed; it is freed later");
        }
        state.metrics.count_merge(start);
        Ok(())
    }

    /// Records whether piece `piece` lies on 4 KiB pages.
    fn set_piece_on_pages(&self, state: &mut FileState, piece: u64, on_pages: bool) {
        if let Some(pages) = &mut state.splits.on_pages {
            if on_pages {
                pages.pieces.insert(piece);
            } else {
                pages.pieces.remove(&piece);
            }
        }
    }

    /// Records whether 1 GiB page `huge` is tiered.
    fn set_tiered(&self, state: &mut FileState, huge: u64, tiered: bool) {
        if let Some(pieces) = &mut state.splits.in_pieces {
            if tiered {
                pieces.tiered.insert(huge);
            } else {
                pieces.tiered.remove(&huge);
            }
        }
    }

    /// A tiered 1 GiB page back together: its pieces on 4 KiB pages first,
    /// then the pieces onto the 1 GiB page; the 2 MiB pages go back to the
    /// pool.
    fn merge_tiered(&self, state: &mut FileState, huge: u64) -> Result<(), GmemError> {
        let (offset, len) = (huge * self.page_size, self.page_size);
        let on_pages: Vec<u64> = state
            .splits
            .on_pages
            .as_ref()
            .map_or_else(Vec::new, |pages| {
                pages
                    .pieces
                    .range(offset / PIECE..(offset + len) / PIECE)
                    .copied()
                    .collect()
            });
        for piece in on_pages {
            self.merge_piece(state, piece)?;
        }
        let start = Instant::now();
        let Some(pieces) = &state.splits.in_pieces else {
            return Ok(());
        };
        // SAFETY: as in `split_tiered`.
        unsafe { copy_range(&pieces.backing.map, &self.master, offset, len) };
        state.metrics.copy_time += start.elapsed();
        self.set_tiered(state, huge, false);
        if let Err(err) = self.remap_views(state, offset, offset + len) {
            self.set_tiered(state, huge, true);
            let _ = self.remap_views(state, offset, offset + len);
            return Err(err);
        }
        if let Some(pieces) = &state.splits.in_pieces
            && let Err(err) = fallocate(&pieces.backing.fd, PUNCH_HOLE, offset, offset + len)
        {
            tracing::warn!(%err, huge, "merge: giving back the 2 MiB pieces failed");
        }
        state.metrics.count_merge(start);
        Ok(())
    }

    /// Points huge page `huge` of view `id` at `memory`: the 4 KiB backing
    /// or the huge page itself.
    fn remap_view_whole(
        &self,
        state: &FileState,
        id: u64,
        huge: u64,
        memory: Memory<'_>,
    ) -> Result<(), GmemError> {
        let (hs, he) = (huge * self.page_size, (huge + 1) * self.page_size);
        let Some(view) = state.views.iter().find(|v| v.id == id) else {
            return Ok(());
        };
        if hs < view.offset || he > view.offset.saturating_add(view.len) {
            return Ok(());
        }
        let addr = (view.addr + (hs - view.offset) as usize) as *mut u8;
        // SAFETY: the huge page lies inside the view's own mapping (checked
        // above, under the state lock); views hand out raw pointers only.
        unsafe { remap_whole_page(addr, self.fd_of(memory), hs, self.page_size) }
    }

    /// Whether a host view maps any of huge page `huge`.
    fn host_view_covers(&self, state: &FileState, huge: u64) -> bool {
        let (hs, he) = (huge * self.page_size, (huge + 1) * self.page_size);
        state.views.iter().any(|view| {
            view.kind == super::super::ViewKind::Host
                && view.offset < he
                && hs < view.offset.saturating_add(view.len)
        })
    }

    /// Before a host view of `[offset, offset + len)` is mapped: the pages
    /// split in place that it covers move to the 4 KiB backing (every view
    /// remapped onto it), so that the host view can fault on their private
    /// pages alone. The split was counted when it was made.
    pub(in super::super) fn move_in_place_splits(
        &self,
        state: &mut FileState,
        offset: u64,
        len: u64,
    ) -> Result<(), GmemError> {
        let first = offset / self.page_size;
        let last = offset.saturating_add(len).div_ceil(self.page_size);
        let covered: Vec<u64> = state.splits.in_place.range(first..last).copied().collect();
        for huge in covered {
            let (splits, split_time) = (state.metrics.splits, state.metrics.split_time);
            self.split_to_pages(state, huge)?;
            state.splits.in_place.remove(&huge);
            state.metrics.splits = splits;
            state.metrics.split_now -= 1;
            state.metrics.split_time = split_time;
        }
        Ok(())
    }

    /// A huge page into 4 KiB backing, whole.
    fn split_to_pages(&self, state: &mut FileState, huge: u64) -> Result<(), GmemError> {
        let start = Instant::now();
        let offset = huge * self.page_size;
        let pages = self.page_backing(state)?;
        // SAFETY: the page is not accessed while it is split.
        unsafe { write_range_into(&self.master, &pages.backing.fd, offset, self.page_size) }?;
        pages.whole.insert(huge);
        state.metrics.copy_time += start.elapsed();
        if let Some(pages) = &state.splits.on_pages {
            for view in &state.views {
                self.remap_view_whole(state, view.id, huge, Memory::Pages(&pages.backing))?;
            }
        }
        state.metrics.count_split(start);
        Ok(())
    }

    /// Puts a split huge page back together, in the order that keeps its
    /// data safe if a step fails: copy the 4 KiB pieces back into the huge
    /// page; remap every view onto it (should one remap fail, the views
    /// already moved go back to the pieces, which still hold the same data,
    /// and the page stays split); only then punch the 4 KiB backing; and
    /// last forget the split. A failed punch leaves nothing to lose (every
    /// view is on the huge page): it is logged, and the backing's pages are
    /// freed when the file closes or the page is split again.
    ///
    /// Like a split, a merge expects no access to the huge page's range
    /// while it runs (a VMM converts memory the guest is not using).
    pub(super) fn merge(&self, state: &mut FileState, huge: u64) -> Result<(), GmemError> {
        if state.splits.in_place.contains(&huge) {
            let start = Instant::now();
            state.splits.in_place.remove(&huge);
            state.metrics.count_merge(start);
            return Ok(());
        }
        if state.splits.is_tiered(huge) {
            return self.merge_tiered(state, huge);
        }
        let start = Instant::now();
        let offset = huge * self.page_size;
        let Some(pages) = &state.splits.on_pages else {
            // Nothing is on 4 KiB pages: the page is whole.
            return Ok(());
        };
        // SAFETY: a merge expects no access to the page (see above).
        unsafe { read_range_from(&pages.backing.fd, &self.master, offset, self.page_size) }?;
        state.metrics.copy_time += start.elapsed();
        let ids: Vec<u64> = state.views.iter().map(|v| v.id).collect();
        for (done, &id) in ids.iter().enumerate() {
            if let Err(err) = self.remap_view_whole(state, id, huge, Memory::File) {
                for &moved in &ids[..done] {
                    let back = Memory::Pages(&pages.backing);
                    if let Err(back) = self.remap_view_whole(state, moved, huge, back) {
                        tracing::error!(%back, view = moved, "merge rollback: a view stays on the huge page");
                    }
                }
                return Err(err);
            }
        }
        if let Err(err) = fallocate(
            &pages.backing.fd,
            PUNCH_HOLE,
            offset,
            offset + self.page_size,
        ) {
            tracing::warn!(%err, huge, "merge: punching the 4 KiB backing failed; it is freed later");
        }
        if let Some(pages) = &mut state.splits.on_pages {
            pages.whole.remove(&huge);
        }
        state.metrics.count_merge(start);
        Ok(())
    }
}
