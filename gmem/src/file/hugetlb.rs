//! HugeTLB: the reservation at creation, and the split of a huge page
//! that becomes mixed into 4 KiB backing and its merge back.

use super::*;

impl Inner {
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

    pub(super) fn split(&self, state: &mut FileState, huge: u64) -> Result<(), GmemError> {
        let start = Instant::now();
        if state.split_backing.is_none() {
            let fd = sys::memfd_create(c"mmukit-gmem-split", libc::MFD_CLOEXEC)
                .map_err(GmemError::os("memfd_create"))?;
            sys::ftruncate(&fd, self.size).map_err(GmemError::os("ftruncate"))?;
            let map = backend::map_whole(&fd, self.size)?;
            state.split_backing = Some(SplitBacking { fd, map });
        }
        let backing = state.split_backing.as_ref().expect("created above");
        let master = self.storage.master().expect("HugeTLB files are mapped");
        let offset = (huge * self.granule) as usize;
        // Allocate the 4 KiB pages in one call rather than one fault each.
        // SAFETY: inside the internal mapping of the backing.
        unsafe {
            sys::madvise(
                backing.map.addr().add(offset),
                self.granule as usize,
                libc::MADV_POPULATE_WRITE,
            )
        }
        .map_err(GmemError::os("madvise(MADV_POPULATE_WRITE)"))?;
        // SAFETY: both internal mappings cover the whole file; the ranges are
        // the same huge page in two different files.
        unsafe {
            std::ptr::copy_nonoverlapping(
                master.addr().add(offset),
                backing.map.addr().add(offset),
                self.granule as usize,
            )
        };
        let ids: Vec<u64> = state.views.iter().map(|v| v.id).collect();
        state.split.insert(huge);
        for id in ids {
            self.remap_view_huge(state, id, huge, true)?;
        }
        state.metrics.splits += 1;
        state.metrics.split_now += 1;
        state.metrics.split_time += start.elapsed();
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
        let start = Instant::now();
        let backing = state
            .split_backing
            .as_ref()
            .expect("split pages have a backing");
        let master = self.storage.master().expect("HugeTLB files are mapped");
        let offset = huge * self.granule;
        // SAFETY: as in `split`, the other way.
        unsafe {
            std::ptr::copy_nonoverlapping(
                backing.map.addr().add(offset as usize),
                master.addr().add(offset as usize),
                self.granule as usize,
            )
        };
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
        if let Err(err) = sys::fallocate(
            &backing.fd,
            libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE,
            offset,
            self.granule,
        ) {
            tracing::warn!(%err, huge, "merge: punching the 4 KiB backing failed; it is freed later");
        }
        state.split.remove(&huge);
        state.metrics.merges += 1;
        state.metrics.split_now -= 1;
        state.metrics.merge_time += start.elapsed();
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

    fn hugetlb_file(size: u64) -> Option<GuestMemFile> {
        let file = GuestMemFile::create(
            &Backend::Hugetlb,
            GmemConfig {
                size,
                flags: GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
                huge_page_size_log2: 21,
            },
        );
        match file {
            Ok(file) => Some(file),
            Err(err) => {
                eprintln!("skip: no 2 MiB HugeTLB pages here ({err})");
                None
            }
        }
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
