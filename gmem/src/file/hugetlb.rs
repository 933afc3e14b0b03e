//! HugeTLB: the split of a huge page that becomes mixed and its merge
//! back. A 2 MiB page splits into 4 KiB backing. A 1 GiB page splits only
//! what it must: into 2 MiB pieces (a HugeTLB file of 2 MiB pages, the
//! "mid" backing), and only the pieces that are mixed go on down to 4 KiB;
//! where the 2 MiB pool cannot hold the pieces, it splits to 4 KiB whole.

use super::backend::populate;
use super::*;

/// The size of a piece of a 1 GiB page split in two tiers.
pub(super) const PIECE: u64 = 2 << 20;

/// Where the memory of a unit of the file lies now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Source {
    /// The file's own huge page.
    File,
    /// A 2 MiB page of the mid backing (a piece of a tiered 1 GiB page).
    Pieces,
    /// The 4 KiB backing.
    Pages,
}

/// Copies `[offset, offset + len)` from one internal mapping to another;
/// both cover the whole file, each a different one.
///
/// # Safety
///
/// Nothing may access either range while it runs: a split or merge expects
/// no access to the page it moves.
unsafe fn copy_range(from: &Mapping, to: &Mapping, offset: u64, len: u64) {
    let end = (offset + len) as usize;
    assert!(end <= from.len() && end <= to.len() && from.addr() != to.addr());
    // SAFETY: both ranges are inside their mappings (asserted), in
    // different files, and unused for the copy's length (the caller's word).
    unsafe {
        std::ptr::copy_nonoverlapping(
            from.addr().add(offset as usize),
            to.addr().add(offset as usize),
            len as usize,
        )
    };
}

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

impl Inner {
    /// The unit holding `at` and where its memory is: a huge page on the
    /// file or on 4 KiB pages, or a 2 MiB piece of a tiered page on the mid
    /// backing or on 4 KiB pages. Returns (start, end, source).
    pub(super) fn unit_of(&self, state: &FileState, at: u64) -> (u64, u64, Source) {
        let huge = at / self.granule;
        let (hs, he) = (huge * self.granule, (huge + 1) * self.granule);
        if !state.split.contains(&huge) {
            return (hs, he, Source::File);
        }
        if !state.tiered.contains(&huge) {
            return (hs, he, Source::Pages);
        }
        let piece = at / PIECE;
        let (ps, pe) = (piece * PIECE, (piece + 1) * PIECE);
        if state.split_pieces.contains(&piece) {
            (ps, pe, Source::Pages)
        } else {
            (ps, pe, Source::Pieces)
        }
    }

    /// The descriptor behind `source`.
    pub(super) fn source_fd<'a>(&'a self, state: &'a FileState, source: Source) -> &'a OwnedFd {
        match source {
            Source::File => self.storage.fd().expect("HugeTLB files have a descriptor"),
            Source::Pieces => {
                &state
                    .mid_backing
                    .as_ref()
                    .expect("tiered pages have one")
                    .fd
            }
            Source::Pages => {
                &state
                    .split_backing
                    .as_ref()
                    .expect("split pages have one")
                    .fd
            }
        }
    }

    /// Maps the units of `[start, end)` that view `id` covers whole from
    /// where their memory lies now.
    pub(super) fn remap_view_range(
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
            let (us, ue, source) = self.unit_of(state, at);
            if us >= view.offset && ue <= view.offset.saturating_add(view.len) {
                let addr = (view.addr + (us - view.offset) as usize) as *mut u8;
                // SAFETY: the unit lies inside the view's own mapping (checked
                // just above, under the state lock); views hand out raw
                // pointers only.
                unsafe {
                    sys::map_fixed(
                        addr,
                        (ue - us) as usize,
                        libc::PROT_READ | libc::PROT_WRITE,
                        self.source_fd(state, source),
                        us,
                    )
                }
                .map_err(GmemError::os("mmap(MAP_FIXED)"))?;
            }
            at = ue;
        }
        Ok(())
    }

    /// Maps huge page `huge` of view `id` from where its memory lies now.
    /// A mapping of a 1 GiB HugeTLB page cannot be replaced in 2 MiB parts:
    /// for a tiered page the view's whole range goes to the fault source
    /// first, and its pieces are mapped over that.
    pub(super) fn remap_view_huge_page(
        &self,
        state: &FileState,
        id: u64,
        huge: u64,
    ) -> Result<(), GmemError> {
        let (hs, he) = (huge * self.granule, (huge + 1) * self.granule);
        if state.tiered.contains(&huge)
            && let Some(view) = state.views.iter().find(|v| v.id == id)
            && hs >= view.offset
            && he <= view.offset.saturating_add(view.len)
        {
            let addr = (view.addr + (hs - view.offset) as usize) as *mut u8;
            // SAFETY: the range lies inside the view's own mapping, under
            // the state lock; views hand out raw pointers only.
            unsafe { view::map_fault_source(addr, self.granule) }?;
        }
        self.remap_view_range(state, id, hs, he)
    }

    /// Remaps `[start, end)` of every view from where its memory lies now.
    fn remap_views(&self, state: &FileState, start: u64, end: u64) -> Result<(), GmemError> {
        let ids: Vec<u64> = state.views.iter().map(|v| v.id).collect();
        for id in ids {
            self.remap_view_range(state, id, start, end)?;
        }
        Ok(())
    }

    /// The 4 KiB backing, made at first use.
    fn page_backing(&self, state: &mut FileState) -> Result<(), GmemError> {
        if state.split_backing.is_none() {
            let fd = sys::memfd_create(c"mmukit-gmem-split", libc::MFD_CLOEXEC)
                .map_err(GmemError::os("memfd_create"))?;
            sys::ftruncate(&fd, self.size).map_err(GmemError::os("ftruncate"))?;
            let map = backend::map_whole(&fd, self.size)?;
            state.split_backing = Some(SplitBacking { fd, map });
        }
        Ok(())
    }

    /// Splits a huge page that became mixed: a 1 GiB page into 2 MiB pieces
    /// when the 2 MiB pool can hold them, else (and a 2 MiB page) into
    /// 4 KiB backing.
    pub(super) fn split(&self, state: &mut FileState, huge: u64) -> Result<(), GmemError> {
        if self.granule > PIECE {
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

    /// A 1 GiB page into 2 MiB pieces of the mid backing: its 2 MiB pages
    /// are allocated for this page only, the data copied, every view
    /// remapped piece by piece.
    fn split_tiered(&self, state: &mut FileState, huge: u64) -> Result<(), GmemError> {
        let start = Instant::now();
        if state.mid_backing.is_none() {
            let flags = libc::MFD_CLOEXEC | libc::MFD_HUGETLB | (21 << libc::MFD_HUGE_SHIFT);
            let fd = sys::memfd_create(c"mmukit-gmem-pieces", flags)
                .map_err(GmemError::os("memfd_create"))?;
            sys::ftruncate(&fd, self.size).map_err(GmemError::os("ftruncate"))?;
            // NORESERVE: 2 MiB pages are taken only where a page is split.
            let map = Mapping::new(
                self.size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                Some(&fd),
                0,
            )
            .map_err(GmemError::os("mmap"))?;
            state.mid_backing = Some(SplitBacking { fd, map });
        }
        let (hs, len) = (huge * self.granule, self.granule);
        let mid = state.mid_backing.as_ref().expect("made above");
        sys::fallocate(&mid.fd, libc::FALLOC_FL_KEEP_SIZE, hs, len)
            .map_err(GmemError::os("fallocate"))?;
        let master = self.storage.master().expect("HugeTLB files are mapped");
        // SAFETY: the page is not accessed while it is split; the mid range
        // was just allocated.
        unsafe { copy_range(master, &mid.map, hs, len) };
        state.split.insert(huge);
        state.tiered.insert(huge);
        let ids: Vec<u64> = state.views.iter().map(|v| v.id).collect();
        for id in ids {
            self.remap_view_huge_page(state, id, huge)?;
        }
        state.metrics.count_split(start);
        Ok(())
    }

    /// A 2 MiB piece of a tiered page into 4 KiB backing.
    pub(super) fn split_piece(&self, state: &mut FileState, piece: u64) -> Result<(), GmemError> {
        let start = Instant::now();
        self.page_backing(state)?;
        let ps = piece * PIECE;
        let (backing, mid) = (
            state.split_backing.as_ref().expect("made above"),
            state.mid_backing.as_ref().expect("tiered pages have one"),
        );
        populate(&backing.map, ps, PIECE)?;
        // SAFETY: the piece is not accessed while it is split.
        unsafe { copy_range(&mid.map, &backing.map, ps, PIECE) };
        state.split_pieces.insert(piece);
        self.remap_views(state, ps, ps + PIECE)?;
        state.metrics.count_split(start);
        Ok(())
    }

    /// A 2 MiB piece back from 4 KiB backing onto its mid page.
    pub(super) fn merge_piece(&self, state: &mut FileState, piece: u64) -> Result<(), GmemError> {
        let start = Instant::now();
        let ps = piece * PIECE;
        let (backing, mid) = (
            state.split_backing.as_ref().expect("split pieces have one"),
            state.mid_backing.as_ref().expect("tiered pages have one"),
        );
        // SAFETY: as in `split_piece`.
        unsafe { copy_range(&backing.map, &mid.map, ps, PIECE) };
        state.split_pieces.remove(&piece);
        if let Err(err) = self.remap_views(state, ps, ps + PIECE) {
            // Views already moved see the same data as those left behind.
            state.split_pieces.insert(piece);
            let _ = self.remap_views(state, ps, ps + PIECE);
            return Err(err);
        }
        let backing = state.split_backing.as_ref().expect("split pieces have one");
        if let Err(err) = sys::fallocate(&backing.fd, PUNCH_HOLE, ps, PIECE) {
            tracing::warn!(%err, piece, "merge: punching the 4 KiB backing failed; it is freed later");
        }
        state.metrics.count_merge(start);
        Ok(())
    }

    /// A tiered 1 GiB page back together: its split pieces first, then the
    /// pieces onto the 1 GiB page; the mid pages go back to the pool.
    fn merge_tiered(&self, state: &mut FileState, huge: u64) -> Result<(), GmemError> {
        let (hs, len) = (huge * self.granule, self.granule);
        let pieces: Vec<u64> = state
            .split_pieces
            .range(hs / PIECE..(hs + len) / PIECE)
            .copied()
            .collect();
        for piece in pieces {
            self.merge_piece(state, piece)?;
        }
        let start = Instant::now();
        let mid = state.mid_backing.as_ref().expect("tiered pages have one");
        let master = self.storage.master().expect("HugeTLB files are mapped");
        // SAFETY: as in `split_tiered`.
        unsafe { copy_range(&mid.map, master, hs, len) };
        state.tiered.remove(&huge);
        state.split.remove(&huge);
        if let Err(err) = self.remap_views(state, hs, hs + len) {
            state.split.insert(huge);
            state.tiered.insert(huge);
            let _ = self.remap_views(state, hs, hs + len);
            return Err(err);
        }
        let mid = state.mid_backing.as_ref().expect("tiered pages have one");
        if let Err(err) = sys::fallocate(&mid.fd, PUNCH_HOLE, hs, len) {
            tracing::warn!(%err, huge, "merge: giving back the 2 MiB pieces failed");
        }
        state.metrics.count_merge(start);
        Ok(())
    }

    /// Points huge page `huge` of view `id` at the 4 KiB backing
    /// (`to_split`) or back at the huge page.
    pub(super) fn remap_view_huge(
        &self,
        state: &mut FileState,
        id: u64,
        huge: u64,
        to_split: bool,
    ) -> Result<(), GmemError> {
        let (hs, he) = (huge * self.granule, (huge + 1) * self.granule);
        let Some(view) = state.views.iter().find(|v| v.id == id) else {
            return Ok(());
        };
        if hs < view.offset || he > view.offset.saturating_add(view.len) {
            return Ok(());
        }
        let addr = (view.addr + (hs - view.offset) as usize) as *mut u8;
        #[cfg(test)]
        if tests::remap_should_fail() {
            return Err(GmemError::Os {
                op: "mmap(MAP_FIXED)",
                source: io::Error::from_raw_os_error(libc::ENOMEM),
            });
        }
        let fd = if to_split {
            &state
                .split_backing
                .as_ref()
                .expect("split pages have a backing")
                .fd
        } else {
            self.storage.fd().expect("HugeTLB files have a descriptor")
        };
        // SAFETY: the huge page lies inside the view's own mapping (checked
        // above, under the state lock); views hand out raw pointers only.
        unsafe {
            sys::map_fixed(
                addr,
                self.granule as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                fd,
                hs,
            )
        }
        .map_err(GmemError::os("mmap(MAP_FIXED)"))
    }

    /// A huge page into 4 KiB backing, whole.
    fn split_to_pages(&self, state: &mut FileState, huge: u64) -> Result<(), GmemError> {
        let start = Instant::now();
        self.page_backing(state)?;
        let backing = state.split_backing.as_ref().expect("created above");
        let master = self.storage.master().expect("HugeTLB files are mapped");
        let offset = huge * self.granule;
        populate(&backing.map, offset, self.granule)?;
        // SAFETY: the page is not accessed while it is split.
        unsafe { copy_range(master, &backing.map, offset, self.granule) };
        let ids: Vec<u64> = state.views.iter().map(|v| v.id).collect();
        state.split.insert(huge);
        for id in ids {
            self.remap_view_huge(state, id, huge, true)?;
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
        if state.tiered.contains(&huge) {
            return self.merge_tiered(state, huge);
        }
        let start = Instant::now();
        let backing = state
            .split_backing
            .as_ref()
            .expect("split pages have a backing");
        let master = self.storage.master().expect("HugeTLB files are mapped");
        let offset = huge * self.granule;
        // SAFETY: a merge expects no access to the page (see above).
        unsafe { copy_range(&backing.map, master, offset, self.granule) };
        let ids: Vec<u64> = state.views.iter().map(|v| v.id).collect();
        for (done, &id) in ids.iter().enumerate() {
            if let Err(err) = self.remap_view_huge(state, id, huge, false) {
                for &moved in &ids[..done] {
                    if let Err(back) = self.remap_view_huge(state, moved, huge, true) {
                        tracing::error!(%back, view = moved, "merge rollback: a view stays on the huge page");
                    }
                }
                return Err(err);
            }
        }
        let backing = state
            .split_backing
            .as_ref()
            .expect("split pages have a backing");
        if let Err(err) = sys::fallocate(&backing.fd, PUNCH_HOLE, offset, self.granule) {
            tracing::warn!(%err, huge, "merge: punching the 4 KiB backing failed; it is freed later");
        }
        state.split.remove(&huge);
        state.metrics.count_merge(start);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;
    use crate::consts::GUEST_MEMFD_FLAG_INIT_SHARED;

    thread_local! {
        /// Remaps of a huge page to let through before one fails.
        static REMAPS_BEFORE_FAILURE: Cell<Option<u32>> = const { Cell::new(None) };
    }

    /// Whether the remap about to happen is the one to fail.
    pub(super) fn remap_should_fail() -> bool {
        REMAPS_BEFORE_FAILURE.with(|left| match left.get() {
            Some(0) => {
                left.set(None);
                true
            }
            Some(n) => {
                left.set(Some(n - 1));
                false
            }
            None => false,
        })
    }

    /// A HugeTLB file of `size` bytes in 2 MiB pages, or `None` (the skip
    /// of the running test reported) where the pool has too few free.
    fn hugetlb_file(size: u64) -> Option<GuestMemFile> {
        let test = std::thread::current()
            .name()
            .unwrap_or("hugetlb")
            .to_string();
        if !crate::caps::hugetlb_pages_free(&test, 2 << 20, size >> 21) {
            return None;
        }
        let file = GuestMemFile::create(
            &Backend::Hugetlb,
            GmemConfig {
                size,
                flags: GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
                huge_page_size_log2: 21,
            },
        );
        Some(file.expect("the pool had the pages free"))
    }

    /// A merge whose second remap fails moves the first view back onto the
    /// 4 KiB pieces and keeps the page split: both views still see the same
    /// memory, nothing written is lost, and a later merge succeeds.
    #[test]
    fn a_merge_that_fails_half_way_keeps_every_view_on_the_same_data() {
        let huge = 2u64 << 20;
        let Some(file) = hugetlb_file(huge) else {
            return;
        };
        let a = file.map_guest(0, huge).unwrap();
        let b = file.map_guest(0, huge).unwrap();
        a.fill(0, huge, 0x11).unwrap();
        file.convert(0x3000, 0x1000, Attribute::Private).unwrap();
        assert_eq!(file.split_huge_pages(), vec![0]);
        a.write_at(0x10_0000, &[0x22; 8]).unwrap();
        REMAPS_BEFORE_FAILURE.with(|left| left.set(Some(1)));
        assert!(file.convert(0x3000, 0x1000, Attribute::Shared).is_err());
        assert_eq!(file.split_huge_pages(), vec![0], "still split");
        assert_eq!(
            file.attribute(0x3000),
            Attribute::Private,
            "attributes kept"
        );
        // The two views still share one copy of the memory.
        b.write_at(0x20_0000 - 8, &[0x33; 8]).unwrap();
        let mut back = [0u8; 8];
        a.read_at(0x20_0000 - 8, &mut back).unwrap();
        assert_eq!(back, [0x33; 8]);
        b.read_at(0x10_0000, &mut back).unwrap();
        assert_eq!(back, [0x22; 8]);
        // The merge goes through now, and keeps all of it.
        file.convert(0x3000, 0x1000, Attribute::Shared).unwrap();
        assert!(file.split_huge_pages().is_empty());
        for (view, at, byte) in [
            (&a, 0x10_0000, 0x22),
            (&b, 0x20_0000 - 8, 0x33),
            (&a, 0, 0x11),
        ] {
            view.read_at(at, &mut back).unwrap();
            assert_eq!(back, [byte; 8], "at {at:#x}");
        }
    }
}
