//! No-allocation sections: the mark an MMU sets on its thread while it
//! holds its lock, which production faults enter and test allocators check.

use std::cell::Cell;

thread_local! {
    static NO_ALLOC_DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// Marks the current thread as inside a section where no page may be
/// allocated (for example while an MMU lock is held).
///
/// Production allocators ignore the mark; [`CountingAllocator`](super::CountingAllocator) panics when
/// `page_get` runs inside such a section, which is how tests prove that a
/// critical section never allocates. Sections nest.
///
/// ```
/// use mmu_cache::alloc::{CountingAllocator, HeapAllocator, NoAllocSection, PageAllocator};
///
/// let counting = CountingAllocator::new(HeapAllocator::new());
/// let page = counting.page_get()?; // fine: outside any section
/// let caught = std::panic::catch_unwind(|| {
///     let _section = NoAllocSection::enter();
///     counting.page_get()
/// });
/// assert!(caught.is_err());
/// // SAFETY: the page is not used after this.
/// unsafe { counting.page_free(page)? };
/// # Ok::<(), mmu_cache::alloc::AllocError>(())
/// ```
#[must_use = "the section ends when the guard is dropped"]
#[derive(Debug)]
pub struct NoAllocSection {
    _not_send: std::marker::PhantomData<*const ()>,
}

impl NoAllocSection {
    /// Enters a section on this thread; it ends when the guard drops.
    pub fn enter() -> Self {
        NO_ALLOC_DEPTH.with(|depth| depth.set(depth.get() + 1));
        Self {
            _not_send: std::marker::PhantomData,
        }
    }

    /// Whether this thread is inside a section.
    pub fn active() -> bool {
        NO_ALLOC_DEPTH.with(|depth| depth.get() > 0)
    }
}

impl Drop for NoAllocSection {
    fn drop(&mut self) {
        NO_ALLOC_DEPTH.with(|depth| depth.set(depth.get() - 1));
    }
}
