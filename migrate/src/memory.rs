//! Guest memory as a migration sees it: host mappings in guest page order,
//! read a page run at a time on the source and written on the
//! destination. A map keeps the mappings it names alive.

use std::sync::Arc;

use gmem::{GuestRegion, View};

use crate::format::{CHUNK_PAGES, PAGE_SIZE, PageSink};

/// Something that owns a host mapping of guest memory.
pub trait HostMemory: Send + Sync {
    /// The mapping's start and length in bytes (whole pages).
    fn host_range(&self) -> (*mut u8, u64);
}

impl HostMemory for GuestRegion {
    fn host_range(&self) -> (*mut u8, u64) {
        (self.host_addr(), self.size())
    }
}

impl HostMemory for View {
    fn host_range(&self) -> (*mut u8, u64) {
        (self.as_ptr(), self.len())
    }
}

#[derive(Clone)]
struct Range {
    first_page: u64,
    pages: u64,
    host: usize,
    _owner: Arc<dyn HostMemory>,
}

/// Guest memory in page order: the concatenation of its ranges (memslot 0,
/// then memslot 1, ...), as the dirty bitmaps number it.
#[derive(Clone)]
pub struct GuestMemoryMap {
    ranges: Vec<Range>,
    pages: u64,
}

impl std::fmt::Debug for GuestMemoryMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestMemoryMap")
            .field("ranges", &self.ranges.len())
            .field("pages", &self.pages)
            .finish()
    }
}

impl GuestMemoryMap {
    /// The map of `owners`' mappings, in order.
    pub fn new(owners: Vec<Arc<dyn HostMemory>>) -> Self {
        let mut ranges = Vec::with_capacity(owners.len());
        let mut pages = 0;
        for owner in owners {
            let (host, bytes) = owner.host_range();
            ranges.push(Range {
                first_page: pages,
                pages: bytes / PAGE_SIZE,
                host: host as usize,
                _owner: owner,
            });
            pages += bytes / PAGE_SIZE;
        }
        Self { ranges, pages }
    }

    /// Guest memory in pages.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Guest memory in bytes.
    pub fn bytes(&self) -> u64 {
        self.pages * PAGE_SIZE
    }

    /// The host address of `page` and the pages from it to the end of its
    /// range.
    fn locate(&self, page: u64) -> Option<(usize, u64)> {
        let index = self
            .ranges
            .partition_point(|range| range.first_page + range.pages <= page);
        let range = self.ranges.get(index)?;
        let within = page - range.first_page;
        Some((
            range.host + (within * PAGE_SIZE) as usize,
            range.pages - within,
        ))
    }

    /// The longest run from `page` of at most `limit` pages that lies in
    /// one range and one chunk.
    pub fn run_from(&self, page: u64, limit: u64) -> u64 {
        let Some((_, left)) = self.locate(page) else {
            return 0;
        };
        let chunk_left = CHUNK_PAGES - page % CHUNK_PAGES;
        limit.min(left).min(chunk_left)
    }

    /// Copies pages `[first_page, first_page + buf.len() / 4096)` into
    /// `buf`, which the caller sized with [`run_from`](Self::run_from).
    /// The guest may be writing them: the copy is what the memory held at
    /// some moment of it, page by page, and the dirty log says which
    /// pages to send again.
    pub fn read(&self, first_page: u64, buf: &mut [u8]) {
        let count = buf.len() as u64 / PAGE_SIZE;
        let (host, left) = self.locate(first_page).expect("a page inside memory");
        assert!(count <= left, "a run inside one range");
        // SAFETY: the run lies inside a mapping this map keeps alive (the
        // range's owner); guest memory is reached through raw pointers
        // only, so no Rust reference aliases it, and `buf` is ours.
        unsafe { std::ptr::copy_nonoverlapping(host as *const u8, buf.as_mut_ptr(), buf.len()) };
    }

    /// Pages `[first_page, first_page + count)`, which the caller sized
    /// with [`run_from`](Self::run_from), as a slice of the live mapping.
    ///
    /// # Safety
    ///
    /// The guest (or a device) may write these bytes while the slice
    /// lives, so the caller must treat what it reads as a moment's view,
    /// byte by byte, and nothing more: read it, never rely on two reads
    /// agreeing. Nothing may unmap the memory meanwhile (the map keeps it
    /// mapped).
    pub(crate) unsafe fn racy_pages(&self, first_page: u64, count: u64) -> &[u8] {
        let (host, left) = self.locate(first_page).expect("a page inside memory");
        assert!(count <= left, "a run inside one range");
        // SAFETY: the run lies inside a mapping this map keeps alive (the
        // range's owner); the caller takes on that others may write it.
        unsafe { std::slice::from_raw_parts(host as *const u8, (count * PAGE_SIZE) as usize) }
    }

    /// Populates pages `[first_page, first_page + count)` for writing
    /// (`MADV_POPULATE_WRITE`), range by range, changing no contents.
    pub fn populate(&self, first_page: u64, count: u64) -> std::io::Result<()> {
        let mut page = first_page;
        let end = first_page.saturating_add(count).min(self.pages);
        while page < end {
            let (host, left) = self.locate(page).expect("a page inside memory");
            let run = left.min(end - page);
            // SAFETY: the run lies inside a mapping this map keeps alive;
            // populating faults pages in as a write would and changes no
            // contents, so no reader or writer of them can tell.
            unsafe {
                mmukit_sys::madvise(
                    host as *mut u8,
                    (run * PAGE_SIZE) as usize,
                    libc::MADV_POPULATE_WRITE,
                )
            }?;
            page += run;
        }
        Ok(())
    }

    /// Copies `buf` (whole pages) into pages from `first_page`, inside one
    /// range, as a device model writes guest memory: a running guest sees
    /// the bytes arrive in no particular order.
    pub fn write(&self, first_page: u64, buf: &[u8]) {
        let count = buf.len() as u64 / PAGE_SIZE;
        let (host, left) = self.locate(first_page).expect("a page inside memory");
        assert!(count <= left, "a run inside one range");
        // SAFETY: the run lies inside a mapping this map keeps alive (the
        // range's owner); guest memory is reached through raw pointers
        // only, so no Rust reference aliases it, and `buf` is ours.
        unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), host as *mut u8, buf.len()) };
    }

    /// A sink that writes received pages into this memory, only those of
    /// chunks `c` with `c % parts == part` (one connection's share).
    ///
    /// # Safety
    ///
    /// Nothing else may read or write the memory while the sink (or
    /// another sink of a different part) is in use: no vCPU runs, and no
    /// two sinks share a part.
    pub unsafe fn sink(&self, part: u32, parts: u32) -> MemorySink<'_> {
        MemorySink {
            map: self,
            part: u64::from(part),
            parts: u64::from(parts.max(1)),
        }
    }
}

/// Writes received pages into guest memory (see [`GuestMemoryMap::sink`]).
#[derive(Debug)]
pub struct MemorySink<'a> {
    map: &'a GuestMemoryMap,
    part: u64,
    parts: u64,
}

impl PageSink for MemorySink<'_> {
    fn pages_mut(&mut self, first_page: u64, count: u32) -> Option<&mut [u8]> {
        let last = first_page.checked_add(u64::from(count))? - 1;
        let chunk = first_page / CHUNK_PAGES;
        if chunk != last / CHUNK_PAGES || chunk % self.parts != self.part {
            return None;
        }
        let (host, left) = self.map.locate(first_page)?;
        if u64::from(count) > left {
            return None;
        }
        // SAFETY: the run lies inside a mapping the map keeps alive; the
        // sink's contract gives it this chunk alone (its part of the
        // chunks, nothing else touching memory), so the slice is unique
        // while the reader fills it.
        Some(unsafe {
            std::slice::from_raw_parts_mut(host as *mut u8, (u64::from(count) * PAGE_SIZE) as usize)
        })
    }
}
