//! Views: mappings of a file that follow its attributes; private pages
//! and the parts past the end fault with SIGBUS.

use std::sync::Arc;

use crate::attrs::Attribute;
use crate::sys::Mapping;

use super::error::{GmemError, InvalidArgument, Unsupported};
use super::mapping::map_fault_source;
use super::rules::{check_mmap, check_mmap_generic};
use super::{FileState, GuestMemFile, Inner, PAGE_SIZE, ViewKind, ViewRecord};

impl GuestMemFile {
    /// Maps `[offset, offset + len)` shared as a host view (private pages
    /// fault). Needs the MMAP flag (ENODEV). The length may pass the end of
    /// the file; accesses there fault.
    pub fn map(&self, offset: u64, len: u64) -> Result<View, GmemError> {
        self.mmap(offset, len, libc::MAP_SHARED, ViewKind::Host)
    }

    /// Maps a guest view (every page accessible) of `[offset, offset + len)`.
    pub fn map_guest(&self, offset: u64, len: u64) -> Result<View, GmemError> {
        self.mmap(offset, len, libc::MAP_SHARED, ViewKind::Guest)
    }

    /// `mmap(2)` with guest_memfd's rules: MMAP flag (ENODEV), `MAP_SHARED`
    /// (EINVAL), aligned offset (EINVAL; the huge page size for HugeTLB,
    /// whose lengths are whole huge pages too).
    pub fn mmap(
        &self,
        offset: u64,
        len: u64,
        map_flags: i32,
        kind: ViewKind,
    ) -> Result<View, GmemError> {
        let inner = &self.inner;
        // Views start on a 2 MiB boundary when they are that big (a huge
        // page boundary for HugeTLB), so huge mappings line up with them.
        let align = if let Some(hugetlb) = inner.storage.hugetlb() {
            hugetlb.page_size()
        } else if len >= 2 << 20 {
            2 << 20
        } else {
            PAGE_SIZE
        } as usize;
        // guest_memfd: the kernel's generic checks come before our
        // reservation, and the kernel applies its own to the mapping.
        let len = if inner.storage.kernel_file().is_some() {
            check_mmap_generic(offset, len, map_flags)?.0
        } else {
            check_mmap(offset, len, map_flags, inner.flags, inner.granule)?
        };
        if let Some(addr) = inner.storage.window(offset) {
            return self.map_window(addr, offset, len, kind);
        }
        let mapping =
            Mapping::reserve_aligned(len as usize, align).map_err(GmemError::os("mmap"))?;
        inner
            .storage
            .map_view(inner, &mapping, offset, len, map_flags)?;
        // The kernel maps whole pages (checked above for the others).
        let len = len.next_multiple_of(PAGE_SIZE);
        // Past the end of the file an access raises SIGBUS, as on a
        // guest_memfd: where the backend does not do that itself, the part
        // past the end is mapped from the fault source.
        let inside = len.min(inner.size.saturating_sub(offset));
        if !inner.storage.faults_past_end() && inside < len {
            // SAFETY: the tail of the fresh mapping, which nothing uses yet.
            unsafe { map_fault_source(mapping.addr().add(inside as usize), len - inside) }?;
        }
        let addr = mapping.addr() as usize;
        let view = self.register(Some(mapping), addr, offset, len, kind);
        {
            let mut state = self.state();
            if let Some(hugetlb) = inner.storage.hugetlb() {
                if kind == ViewKind::Host {
                    hugetlb.move_in_place_splits(&mut state, offset, len)?;
                }
                hugetlb.remap_new_view(&state, view.id)?;
            }
            let end_page = offset
                .saturating_add(len)
                .min(inner.size)
                .div_ceil(PAGE_SIZE);
            inner.protect(&state, offset / PAGE_SIZE, end_page, Some(view.id))?;
        }
        Ok(view)
    }

    /// A view that is a window of the memory's one mapping at `addr`
    /// (private anonymous memory): it must lie inside the file, and there
    /// is nothing to map, since no page is private.
    fn map_window(
        &self,
        addr: usize,
        offset: u64,
        len: u64,
        kind: ViewKind,
    ) -> Result<View, GmemError> {
        let len = len.next_multiple_of(PAGE_SIZE);
        let size = self.inner.size;
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(Unsupported::ViewPastEndOfPrivateAnonymous { offset, len, size }.into());
        }
        Ok(self.register(None, addr, offset, len, kind))
    }

    fn register(
        &self,
        mapping: Option<Mapping>,
        addr: usize,
        offset: u64,
        len: u64,
        kind: ViewKind,
    ) -> View {
        let mut state = self.state();
        let id = state.next_view;
        state.next_view += 1;
        state.views.push(ViewRecord {
            id,
            addr,
            offset,
            len,
            kind,
        });
        View {
            file: self.inner.clone(),
            id,
            addr,
            mapping,
            offset,
            len,
            kind,
        }
    }
}

impl Inner {
    /// Applies the attributes of pages `[first, last)` to the host views
    /// (or only to view `only`).
    /// Makes host views follow the attributes of pages `[first, last)`
    /// (only view `only`, when given): a private page is mapped from the
    /// fault source, so that touching it raises SIGBUS as guest_memfd's
    /// fault handler does; a shared page is mapped from its memory again.
    /// Guest views are never changed.
    pub(super) fn protect(
        &self,
        state: &FileState,
        first: u64,
        last: u64,
        only: Option<u64>,
    ) -> Result<(), GmemError> {
        for view in &state.views {
            if view.kind != ViewKind::Host || only.is_some_and(|id| id != view.id) {
                continue;
            }
            let view_first = view.offset / PAGE_SIZE;
            let view_last = view.offset.saturating_add(view.len).min(self.size) / PAGE_SIZE;
            let (s, e) = (first.max(view_first), last.min(view_last));
            if s >= e {
                continue;
            }
            for (run_start, run_end, attr) in state.attrs.runs(s, e) {
                let addr = (view.addr + (run_start * PAGE_SIZE - view.offset) as usize) as *mut u8;
                let len = (run_end - run_start) * PAGE_SIZE;
                match attr {
                    // SAFETY: the range lies inside this view's mapping, which
                    // the view owns and which stays mapped while it is
                    // registered (we hold the state lock). Views hand out raw
                    // pointers only.
                    Attribute::Private => unsafe { map_fault_source(addr, len) }?,
                    Attribute::Shared => {
                        // SAFETY: as above.
                        unsafe { self.map_memory(state, addr, run_start * PAGE_SIZE, len) }?
                    }
                }
            }
        }
        Ok(())
    }

    /// Maps the file's memory for `[offset, offset + len)` at `addr`: the
    /// file, the split backing of a split huge page, or the anonymous
    /// memory.
    ///
    /// # Safety
    ///
    /// `[addr, addr + len)` must lie inside a view's mapping, under the
    /// state lock.
    unsafe fn map_memory(
        &self,
        state: &FileState,
        addr: *mut u8,
        offset: u64,
        len: u64,
    ) -> Result<(), GmemError> {
        // SAFETY: guaranteed by the caller.
        unsafe { self.storage.map_memory(self, state, addr, offset, len) }
    }
}

/// A mapping of part of a guest memory file, unmapped on drop.
///
/// Memory is reached through [`as_ptr`](Self::as_ptr) (guest memory is
/// shared with a guest, so there are no Rust references into it) or copied
/// with [`read_at`](Self::read_at) / [`write_at`](Self::write_at), which
/// check the attributes of a host view first.
#[derive(Debug)]
pub struct View {
    file: Arc<Inner>,
    id: u64,
    addr: usize,
    mapping: Option<Mapping>,
    offset: u64,
    len: u64,
    kind: ViewKind,
}

impl View {
    /// The address of the view's first byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.addr as *mut u8
    }

    /// Keeps the mapping for the rest of the process: the view stops
    /// following conversions and is never unmapped.
    pub(crate) fn leak_mapping(&mut self) {
        let mut state = self.file.state();
        state.views.retain(|v| v.id != self.id);
        if let Some(mapping) = self.mapping.take() {
            std::mem::forget(mapping);
        }
    }

    /// The host frame (address >> 12) through which this view reaches the
    /// file page at `file_offset`, or `None` when the view does not cover
    /// it. A view keeps its addresses when the file splits or merges a huge
    /// page (it is remapped in place, data copied), so a frame handed to an
    /// MMU stays good; what changes is the page's order
    /// ([`GuestMemFile::page_order`]).
    pub fn host_frame(&self, file_offset: u64) -> Option<u64> {
        let inside = file_offset.checked_sub(self.offset)?;
        (inside < self.len).then(|| (self.addr as u64 + inside) >> 12)
    }

    /// The file offset the view starts at.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The view's length.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the view is empty (never: views have a length).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Host or guest view.
    pub fn kind(&self) -> ViewKind {
        self.kind
    }

    fn check(&self, state: &FileState, at: u64, len: usize) -> Result<usize, GmemError> {
        let end = at
            .checked_add(len as u64)
            .filter(|&end| end <= self.len)
            .ok_or(InvalidArgument::OutsideView {
                at,
                len: len as u64,
            })?;
        let (file_start, file_end) = (
            self.offset.saturating_add(at),
            self.offset.saturating_add(end),
        );
        if file_end > self.file.size {
            return Err(GmemError::Fault {
                offset: self.file.size.max(file_start),
                why: "past the end of the file",
            });
        }
        if len > 0 && self.file.kernel_private() {
            return Err(GmemError::Fault {
                offset: file_start,
                why: "the kernel holds the page private",
            });
        }
        if self.kind == ViewKind::Host && len > 0 {
            let private = state
                .attrs
                .runs(file_start / PAGE_SIZE, file_end.div_ceil(PAGE_SIZE))
                .into_iter()
                .find(|run| run.2 == Attribute::Private);
            if let Some((page, _, _)) = private {
                return Err(GmemError::Fault {
                    offset: (page * PAGE_SIZE).max(file_start),
                    why: "the page is private",
                });
            }
        }
        Ok(at as usize)
    }

    /// Copies from the view at `at` into `buf`; a host view refuses private
    /// pages (EFAULT) instead of faulting.
    pub fn read_at(&self, at: u64, buf: &mut [u8]) -> Result<(), GmemError> {
        let state = self.file.state();
        let at = self.check(&state, at, buf.len())?;
        // SAFETY: the range is inside the mapping and accessible (checked
        // under the state lock, which conversions take).
        unsafe {
            std::ptr::copy_nonoverlapping(self.as_ptr().add(at), buf.as_mut_ptr(), buf.len())
        };
        Ok(())
    }

    /// Copies `buf` into the view at `at`; a host view refuses private pages.
    pub fn write_at(&self, at: u64, buf: &[u8]) -> Result<(), GmemError> {
        let state = self.file.state();
        let at = self.check(&state, at, buf.len())?;
        // SAFETY: as in `read_at`.
        unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), self.as_ptr().add(at), buf.len()) };
        Ok(())
    }

    /// Fills `[at, at + len)` with `byte`; a host view refuses private pages.
    pub fn fill(&self, at: u64, len: u64, byte: u8) -> Result<(), GmemError> {
        let state = self.file.state();
        let at = self.check(&state, at, len as usize)?;
        // SAFETY: as in `read_at`.
        unsafe { std::ptr::write_bytes(self.as_ptr().add(at), byte, len as usize) };
        Ok(())
    }
}

impl Drop for View {
    fn drop(&mut self) {
        let mut state = self.file.state();
        state.views.retain(|v| v.id != self.id);
        // Unmapped under the lock, so that no conversion remaps into it.
        drop(self.mapping.take());
    }
}
