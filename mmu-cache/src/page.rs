//! Owned pages and the pools they come from.
//!
//! A [`PagePool<K>`] pairs a [`PageAllocator`] with an optional [`Account`]
//! and hands out pages of one kind `K` only. A [`Page<K>`] is an owned
//! 4 KiB page that remembers its pool: dropping it returns it to the
//! allocator that handed it out, and to no other. The kind keeps pools of
//! different purpose apart at compile time: an S-EPT pool cannot produce a
//! PAMT page, and a PAMT page cannot be passed where a page-table page is
//! expected. Pools of several purposes may share one allocator; the one way
//! from a pool of one kind to a pool of another is the explicitly named
//! [`PagePool::for_kind`].

use std::fmt;
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::account::{Account, AccountError};
use crate::alloc::{AllocError, AllocatorId, PAGE_SIZE, PageAllocator};

/// Number of 64-bit words in a page.
pub const WORDS_PER_PAGE: usize = PAGE_SIZE / 8;

/// The x86 cache line: the unit [`Page::prefetch`] asks for.
#[cfg(target_arch = "x86_64")]
const CACHE_LINE: usize = 64;

/// Errors of page pools.
#[derive(Debug, thiserror::Error)]
pub enum PageError {
    /// The allocator refused or failed.
    #[error(transparent)]
    Alloc(#[from] AllocError),
    /// The pool's account refused the charge.
    #[error(transparent)]
    Account(#[from] AccountError),
}

/// A purpose a page serves; a type-level tag on [`Page`].
///
/// Define one uninhabited type per pool whose pages must not be mixed with
/// another's:
///
/// ```
/// use mmu_cache::PageKind;
///
/// /// Pages that hold page tables.
/// pub enum TablePage {}
/// impl PageKind for TablePage {}
/// ```
///
/// Pages of one kind cannot be used as pages of another:
///
/// ```compile_fail
/// use mmu_cache::{Page, PageKind, PagePool, alloc::HeapAllocator};
/// enum TablePage {}
/// impl PageKind for TablePage {}
/// enum PamtPage {}
/// impl PageKind for PamtPage {}
///
/// let pool = PagePool::new(HeapAllocator::new());
/// let pamt: Page<PamtPage> = pool.get().unwrap();
/// let table: Page<TablePage> = pamt; // mismatched kinds
/// ```
///
/// and a pool of one kind does not hand out pages of another:
///
/// ```compile_fail
/// use std::sync::Arc;
/// use mmu_cache::{Page, PageKind, PagePool, alloc::HeapAllocator};
/// enum SeptPage {}
/// impl PageKind for SeptPage {}
/// enum PamtPage {}
/// impl PageKind for PamtPage {}
///
/// let sept: Arc<PagePool<SeptPage>> = PagePool::new(HeapAllocator::new());
/// let pamt: Page<PamtPage> = sept.get().unwrap(); // the pool's kind is SeptPage
/// ```
pub trait PageKind: 'static {}

/// The kind of pages with no particular purpose.
#[derive(Debug)]
pub enum PlainPage {}
impl PageKind for PlainPage {}

/// A page allocator and the account charged for its pages, handing out
/// pages of kind `K` only.
pub struct PagePool<K: PageKind = PlainPage> {
    allocator: Arc<dyn PageAllocator>,
    account: Option<Arc<Account>>,
    /// Shared by the pools of every kind made with [`for_kind`](Self::for_kind).
    free_errors: Arc<AtomicU64>,
    kind: PhantomData<fn() -> K>,
}

impl<K: PageKind> fmt::Debug for PagePool<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PagePool")
            .field("kind", &std::any::type_name::<K>())
            .field("allocator", &self.allocator.name())
            .field("account", &self.account.as_ref().map(|a| a.name()))
            .finish()
    }
}

impl<K: PageKind> PagePool<K> {
    /// A pool over `allocator`, without accounting.
    pub fn new(allocator: impl PageAllocator + 'static) -> Arc<Self> {
        Self::from_shared(Arc::new(allocator), None)
    }

    /// A pool over `allocator` whose pages are charged to `account`.
    pub fn with_account(
        allocator: impl PageAllocator + 'static,
        account: Arc<Account>,
    ) -> Arc<Self> {
        Self::from_shared(Arc::new(allocator), Some(account))
    }

    /// A pool over an allocator that is shared with other users.
    pub fn from_shared(
        allocator: Arc<dyn PageAllocator>,
        account: Option<Arc<Account>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            allocator,
            account,
            free_errors: Arc::new(AtomicU64::new(0)),
            kind: PhantomData,
        })
    }

    /// A pool for pages of another purpose `J` on the same allocator and
    /// account (sharing the refusal counter): how one MMU keeps its tables,
    /// its table headers and its external pages on one allocator. It is
    /// the only way across purposes, and it says so by name.
    pub fn for_kind<J: PageKind>(&self) -> Arc<PagePool<J>> {
        Arc::new(PagePool {
            allocator: Arc::clone(&self.allocator),
            account: self.account.clone(),
            free_errors: Arc::clone(&self.free_errors),
            kind: PhantomData,
        })
    }

    /// The allocator behind this pool, shared.
    pub fn shared_allocator(&self) -> &Arc<dyn PageAllocator> {
        &self.allocator
    }

    /// The allocator behind this pool.
    pub fn allocator(&self) -> &dyn PageAllocator {
        &*self.allocator
    }

    /// The account charged for this pool's pages.
    pub fn account(&self) -> Option<&Arc<Account>> {
        self.account.as_ref()
    }

    /// Frees refused by the allocator when a page was dropped (always 0 unless
    /// a page was rebuilt with [`Page::from_raw`] from a wrong address).
    pub fn free_errors(&self) -> u64 {
        self.free_errors.load(Ordering::Relaxed)
    }

    /// Takes a page from the allocator, charging the account first. Page
    /// contents are unspecified.
    pub fn get(self: &Arc<Self>) -> Result<Page<K>, PageError> {
        if let Some(account) = &self.account {
            account.try_charge(PAGE_SIZE as u64)?;
        }
        match self.allocator.page_get() {
            Ok(addr) => Ok(Page {
                addr,
                pool: Arc::clone(self),
                kind: PhantomData,
            }),
            Err(err) => {
                self.uncharge();
                Err(err.into())
            }
        }
    }

    /// Returns a page by address alone: the untyped path.
    ///
    /// The allocator checks the address, so a page it never handed out, or one
    /// already freed, is refused with an error and nothing is touched.
    ///
    /// # Safety
    ///
    /// Nothing may use the page afterwards: in particular no [`Page`] for this
    /// address may still exist (its drop would free the page a second time,
    /// which is detected but lost).
    pub unsafe fn free_raw(&self, addr: NonNull<u8>) -> Result<(), AllocError> {
        // SAFETY: the caller guarantees the page is not used afterwards.
        unsafe { self.allocator.page_free(addr) }?;
        self.uncharge();
        Ok(())
    }

    fn uncharge(&self) {
        if let Some(account) = &self.account {
            account.uncharge(PAGE_SIZE as u64);
        }
    }
}

/// An owned 4 KiB page of kind `K`, returned to its own allocator on drop.
///
/// ```
/// use mmu_cache::{Page, PagePool, alloc::HeapAllocator};
///
/// let pool = PagePool::new(HeapAllocator::new());
/// let mut page: Page = pool.get()?;
/// page.fill(1 << 63);
/// assert!(page.words().iter().all(|&w| w == 1 << 63));
/// drop(page); // back to the heap allocator
/// assert_eq!(pool.allocator().pages_outstanding(), 0);
/// # Ok::<(), mmu_cache::PageError>(())
/// ```
pub struct Page<K: PageKind = PlainPage> {
    addr: NonNull<u8>,
    pool: Arc<PagePool<K>>,
    kind: PhantomData<fn() -> K>,
}

// SAFETY: a Page is the only handle to its memory (the allocator hands each
// page out once), so moving it to another thread moves exclusive access.
unsafe impl<K: PageKind> Send for Page<K> {}
// SAFETY: shared references only allow reads of the page.
unsafe impl<K: PageKind> Sync for Page<K> {}

impl<K: PageKind> fmt::Debug for Page<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Page({:#x} from {})",
            self.addr(),
            self.pool.allocator.name()
        )
    }
}

impl<K: PageKind> Page<K> {
    /// The page's address.
    pub fn addr(&self) -> usize {
        self.addr.as_ptr() as usize
    }

    /// The page's address as a pointer.
    pub fn as_ptr(&self) -> *mut u8 {
        self.addr.as_ptr()
    }

    /// The identity of the allocator that owns the page.
    pub fn owner(&self) -> AllocatorId {
        self.pool.allocator.id()
    }

    /// The pool the page returns to.
    pub fn pool(&self) -> &Arc<PagePool<K>> {
        &self.pool
    }

    /// The page as 512 words.
    pub fn words(&self) -> &[u64; WORDS_PER_PAGE] {
        // SAFETY: the page is PAGE_SIZE bytes, page aligned, owned by `self`,
        // and any bit pattern is a valid u64.
        unsafe { &*self.addr.as_ptr().cast::<[u64; WORDS_PER_PAGE]>() }
    }

    /// Starts bringing the page's 64 cache lines into the cache, without
    /// waiting for them: a hint for a page that is about to be written
    /// whole (the next table a split fills), so that its stores do not
    /// wait for one line after another. A line that no other core holds
    /// arrives exclusive, ready for a store. Nothing else changes; on
    /// targets other than x86_64 it does nothing.
    #[inline]
    pub fn prefetch(&self) {
        #[cfg(target_arch = "x86_64")]
        for line in (0..PAGE_SIZE).step_by(CACHE_LINE) {
            // SAFETY: `line` is inside the page, so the pointer stays in
            // this live allocation; a prefetch reads nothing the program
            // sees and never faults.
            unsafe {
                let at = self.addr.as_ptr().add(line).cast::<i8>();
                core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(at);
            }
        }
    }

    /// The page as 512 mutable words.
    pub fn words_mut(&mut self) -> &mut [u64; WORDS_PER_PAGE] {
        // SAFETY: as in `words`, and `&mut self` makes the access exclusive.
        unsafe { &mut *self.addr.as_ptr().cast::<[u64; WORDS_PER_PAGE]>() }
    }

    /// Writes `value` to every word of the page (the kernel's `memset64`).
    ///
    /// Uses 256-bit stores where the CPU has AVX2, which is what a plain
    /// `memset` reaches; a byte-uniform value goes straight to `memset`.
    pub fn fill(&mut self, value: u64) {
        fill_words(self.words_mut(), value);
    }

    /// Zeroes the page.
    pub fn zero(&mut self) {
        // SAFETY: the page is PAGE_SIZE writable bytes owned by `self`.
        unsafe { std::ptr::write_bytes(self.addr.as_ptr(), 0, PAGE_SIZE) };
    }

    /// Returns the page now, reporting an allocator refusal instead of only
    /// logging it as drop does.
    pub fn free(self) -> Result<(), AllocError> {
        let this = std::mem::ManuallyDrop::new(self);
        // SAFETY: `this` is never used again; the Arc is moved out exactly once.
        let pool = unsafe { std::ptr::read(&this.pool) };
        // SAFETY: the page is consumed, so nothing uses it after the free.
        unsafe { pool.free_raw(this.addr) }
    }

    /// Gives up ownership without freeing: the page stays out (and charged)
    /// until [`Page::from_raw`] rebuilds it or [`PagePool::free_raw`] frees it.
    pub fn into_raw(self) -> NonNull<u8> {
        let this = std::mem::ManuallyDrop::new(self);
        // SAFETY: dropping the pool reference exactly once; the page itself
        // is deliberately not returned.
        drop(unsafe { std::ptr::read(&this.pool) });
        this.addr
    }

    /// Rebuilds a page given up with [`Page::into_raw`].
    ///
    /// # Safety
    ///
    /// `addr` must come from `into_raw` of a `Page<K>` of this `pool`, and be
    /// rebuilt at most once.
    pub unsafe fn from_raw(pool: Arc<PagePool<K>>, addr: NonNull<u8>) -> Self {
        Self {
            addr,
            pool,
            kind: PhantomData,
        }
    }
}

fn fill_words(words: &mut [u64; WORDS_PER_PAGE], value: u64) {
    if value == u64::from_ne_bytes([value as u8; 8]) {
        // SAFETY: `words` is PAGE_SIZE writable bytes.
        unsafe { std::ptr::write_bytes(words.as_mut_ptr().cast::<u8>(), value as u8, PAGE_SIZE) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked just above.
            unsafe { fill_words_avx2(words, value) };
            return;
        }
    }
    words.fill(value);
}

/// # Safety
///
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn fill_words_avx2(words: &mut [u64; WORDS_PER_PAGE], value: u64) {
    // With AVX2 enabled the compiler emits 256-bit stores for this loop.
    words.fill(value);
}

impl<K: PageKind> Drop for Page<K> {
    fn drop(&mut self) {
        // SAFETY: the page is being dropped, so nothing uses it afterwards.
        if let Err(err) = unsafe { self.pool.free_raw(self.addr) } {
            self.pool.free_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(%err, "page refused by its allocator on drop");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alloc::{ChunkAllocator, HeapAllocator};

    /// Pages for a purpose of their own.
    enum OtherPage {}
    impl PageKind for OtherPage {}

    #[test]
    fn pages_go_back_to_their_own_allocator() {
        let heap = PagePool::new(HeapAllocator::new());
        let chunks: Arc<PagePool<OtherPage>> = PagePool::new(ChunkAllocator::anonymous());
        let a: Page = heap.get().unwrap();
        let b = chunks.get().unwrap();
        assert_ne!(a.owner(), b.owner());
        drop(a);
        drop(b);
        assert_eq!(heap.allocator().pages_outstanding(), 0);
        assert_eq!(chunks.allocator().pages_outstanding(), 0);
        assert_eq!(heap.free_errors() + chunks.free_errors(), 0);
    }

    #[test]
    fn pools_of_two_kinds_share_an_allocator_only_when_asked() {
        let tables: Arc<PagePool> = PagePool::new(HeapAllocator::new());
        let others: Arc<PagePool<OtherPage>> = tables.for_kind();
        let table = tables.get().unwrap();
        let other = others.get().unwrap();
        assert_eq!(table.owner(), other.owner(), "one allocator");
        assert_eq!(tables.allocator().pages_outstanding(), 2);
        drop((table, other));
        assert_eq!(tables.allocator().pages_outstanding(), 0);
    }

    #[test]
    fn the_untyped_path_detects_wrong_owner_and_double_free() {
        let heap = PagePool::new(HeapAllocator::new());
        let chunks: Arc<PagePool> = PagePool::new(ChunkAllocator::anonymous());
        let page: Page = heap.get().unwrap();
        let raw = page.into_raw();
        // SAFETY: the page is not used through `raw` afterwards; the call is
        // refused, which is what is tested.
        let err = unsafe { chunks.free_raw(raw) }.unwrap_err();
        assert!(matches!(err, AllocError::NotOwned { .. }), "{err}");
        // SAFETY: `raw` came from into_raw of a page of `heap`.
        let page: Page = unsafe { Page::from_raw(heap.clone(), raw) };
        page.free().unwrap();
        // SAFETY: refused: the page is already free.
        let err = unsafe { heap.free_raw(raw) }.unwrap_err();
        assert!(matches!(err, AllocError::DoubleFree { .. }), "{err}");
    }

    #[test]
    fn a_refused_drop_is_counted_not_hidden() {
        let heap = PagePool::new(HeapAllocator::new());
        let page: Page = heap.get().unwrap();
        let raw = page.into_raw();
        // SAFETY: deliberately rebuilt twice to provoke a double free, which
        // the allocator refuses without touching memory.
        let (first, second): (Page, Page) = unsafe {
            (
                Page::from_raw(heap.clone(), raw),
                Page::from_raw(heap.clone(), raw),
            )
        };
        drop(first);
        drop(second);
        assert_eq!(heap.free_errors(), 1);
    }

    #[test]
    fn accounted_pools_charge_while_pages_live() {
        let account = Arc::new(Account::with_limit("pool", PAGE_SIZE as u64));
        let pool = PagePool::with_account(HeapAllocator::new(), account.clone());
        let page: Page = pool.get().unwrap();
        assert_eq!(account.charged(), PAGE_SIZE as u64);
        assert!(matches!(pool.get(), Err(PageError::Account(_))));
        assert_eq!(
            pool.allocator().pages_outstanding(),
            1,
            "a refused charge allocates nothing"
        );
        drop(page);
        assert_eq!(account.charged(), 0);
    }
}
