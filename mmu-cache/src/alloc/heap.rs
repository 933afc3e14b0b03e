//! A page allocator over the global heap (`std::alloc`), one allocation per page.

use std::alloc::{Layout, alloc, dealloc};
use std::ptr::NonNull;
use std::sync::Mutex;

use super::ledger::Ledger;
use super::{AllocError, AllocatorId, PAGE_SIZE, PageAllocator, check_aligned};

const PAGE_LAYOUT: Layout = match Layout::from_size_align(PAGE_SIZE, PAGE_SIZE) {
    Ok(layout) => layout,
    Err(_) => panic!("page layout"),
};

/// Pages from the global allocator, 4 KiB aligned.
///
/// Simple and portable; each page is a separate heap allocation, so the
/// allocator's own locking is paid on every `page_get` and `page_free`.
///
/// ```
/// use mmu_cache::alloc::{HeapAllocator, PageAllocator};
///
/// let heap = HeapAllocator::new();
/// let page = heap.page_get()?;
/// assert_eq!(page.as_ptr() as usize % 4096, 0);
/// // SAFETY: the page is not used after this.
/// unsafe { heap.page_free(page)? };
/// # Ok::<(), mmu_cache::alloc::AllocError>(())
/// ```
#[derive(Debug)]
pub struct HeapAllocator {
    id: AllocatorId,
    ledger: Mutex<Ledger>,
}

impl HeapAllocator {
    /// A new heap allocator with an empty ledger.
    pub fn new() -> Self {
        Self {
            id: AllocatorId::fresh(),
            ledger: Mutex::new(Ledger::default()),
        }
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Default for HeapAllocator {
    fn default() -> Self {
        Self::new()
    }
}

// SAFETY: pages come from `alloc` with a page-sized, page-aligned layout, so
// they are aligned, writable and disjoint until `dealloc`; `page_free` only
// deallocates addresses the ledger shows as handed out and not yet returned.
unsafe impl PageAllocator for HeapAllocator {
    fn id(&self) -> AllocatorId {
        self.id
    }

    fn name(&self) -> &str {
        "heap"
    }

    fn page_get(&self) -> Result<NonNull<u8>, AllocError> {
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc(PAGE_LAYOUT) };
        let page = NonNull::new(raw).ok_or_else(|| AllocError::OutOfMemory {
            allocator: self.name().to_owned(),
        })?;
        self.ledger().record_out(page.as_ptr() as usize);
        Ok(page)
    }

    unsafe fn page_free(&self, page: NonNull<u8>) -> Result<(), AllocError> {
        let addr = page.as_ptr() as usize;
        check_aligned(self.name(), addr)?;
        self.ledger().record_back(self.name(), addr)?;
        // SAFETY: the ledger confirmed that `alloc` returned this address with
        // PAGE_LAYOUT and that it was not deallocated since.
        unsafe { dealloc(page.as_ptr(), PAGE_LAYOUT) };
        Ok(())
    }

    fn pages_outstanding(&self) -> usize {
        self.ledger().outstanding()
    }
}

impl Drop for HeapAllocator {
    fn drop(&mut self) {
        let ledger = self.ledger.get_mut().unwrap_or_else(|p| p.into_inner());
        let leaked = ledger.outstanding();
        if leaked != 0 {
            tracing::warn!(leaked, "heap page allocator dropped with pages still out");
        }
        for addr in ledger.drain_outstanding() {
            // SAFETY: every outstanding address came from `alloc(PAGE_LAYOUT)`;
            // the allocator is being dropped, so no page handed out may be used
            // any more (PageAllocator's contract).
            unsafe { dealloc(addr as *mut u8, PAGE_LAYOUT) };
        }
    }
}
