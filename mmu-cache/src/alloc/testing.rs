//! Allocators for tests and fuzzing: one that counts and trips inside
//! no-allocation sections, and one that fails on demand.

use std::ptr::NonNull;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{AllocError, AllocatorId, NoAllocSection, PageAllocator};

/// Wraps an allocator, counting `page_get` and `page_free` calls, and
/// panicking when `page_get` is called inside a [`NoAllocSection`].
///
/// Pages keep the identity of the wrapped allocator, so the wrapper and the
/// inner allocator may free each other's pages.
#[derive(Debug)]
pub struct CountingAllocator<A> {
    inner: A,
    name: String,
    gets: AtomicU64,
    get_failures: AtomicU64,
    frees: AtomicU64,
}

impl<A: PageAllocator> CountingAllocator<A> {
    /// Counts the calls made to `inner`.
    pub fn new(inner: A) -> Self {
        let name = format!("counting({})", inner.name());
        Self {
            inner,
            name,
            gets: AtomicU64::new(0),
            get_failures: AtomicU64::new(0),
            frees: AtomicU64::new(0),
        }
    }

    /// Successful `page_get` calls so far.
    pub fn gets(&self) -> u64 {
        self.gets.load(Ordering::Relaxed)
    }

    /// `page_get` calls that returned an error.
    pub fn get_failures(&self) -> u64 {
        self.get_failures.load(Ordering::Relaxed)
    }

    /// Successful `page_free` calls so far.
    pub fn frees(&self) -> u64 {
        self.frees.load(Ordering::Relaxed)
    }

    /// The wrapped allocator.
    pub fn inner(&self) -> &A {
        &self.inner
    }
}

// SAFETY: every page comes from, and goes back to, the wrapped allocator,
// which upholds the contract; the wrapper only counts.
unsafe impl<A: PageAllocator> PageAllocator for CountingAllocator<A> {
    fn id(&self) -> AllocatorId {
        self.inner.id()
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn page_get(&self) -> Result<NonNull<u8>, AllocError> {
        assert!(
            !NoAllocSection::active(),
            "{}: page_get called inside a no-allocation section",
            self.name
        );
        let result = self.inner.page_get();
        match result {
            Ok(_) => self.gets.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.get_failures.fetch_add(1, Ordering::Relaxed),
        };
        result
    }

    unsafe fn page_free(&self, page: NonNull<u8>) -> Result<(), AllocError> {
        // SAFETY: forwarded with the caller's guarantee.
        unsafe { self.inner.page_free(page) }?;
        self.frees.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn pages_outstanding(&self) -> usize {
        self.inner.pages_outstanding()
    }
}

/// When a [`FailingAllocator`] refuses a `page_get`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailPolicy {
    /// Never fail.
    Never,
    /// Serve the first `n` calls, then fail every call.
    AfterN(u64),
    /// Fail every `k`th call (calls k, 2k, 3k, ...). `k == 0` never fails.
    EveryKth(u64),
    /// Fail every call.
    Always,
}

/// Wraps an allocator and fails `page_get` according to a [`FailPolicy`].
///
/// The call counter and the policy can be changed while the allocator is in
/// use, so a test can let a setup phase succeed and then inject failures.
///
/// ```
/// use mmu_cache::alloc::{FailPolicy, FailingAllocator, HeapAllocator, PageAllocator};
///
/// let failing = FailingAllocator::new(HeapAllocator::new(), FailPolicy::AfterN(1));
/// let page = failing.page_get()?;
/// assert!(failing.page_get().is_err());
/// // SAFETY: the page is not used after this.
/// unsafe { failing.page_free(page)? };
/// # Ok::<(), mmu_cache::alloc::AllocError>(())
/// ```
#[derive(Debug)]
pub struct FailingAllocator<A> {
    inner: A,
    name: String,
    policy: Mutex<FailPolicy>,
    calls: AtomicU64,
    failures: AtomicU64,
}

impl<A: PageAllocator> FailingAllocator<A> {
    /// Fails calls to `inner` according to `policy`.
    pub fn new(inner: A, policy: FailPolicy) -> Self {
        let name = format!("failing({})", inner.name());
        Self {
            inner,
            name,
            policy: Mutex::new(policy),
            calls: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }
    }

    /// Replaces the policy and restarts the call count.
    pub fn set_policy(&self, policy: FailPolicy) {
        *self.policy.lock().unwrap_or_else(|p| p.into_inner()) = policy;
        self.calls.store(0, Ordering::Relaxed);
    }

    /// Failures injected so far.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// The wrapped allocator.
    pub fn inner(&self) -> &A {
        &self.inner
    }
}

// SAFETY: every page comes from, and goes back to, the wrapped allocator,
// which upholds the contract; the wrapper only refuses some requests.
unsafe impl<A: PageAllocator> PageAllocator for FailingAllocator<A> {
    fn id(&self) -> AllocatorId {
        self.inner.id()
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn page_get(&self) -> Result<NonNull<u8>, AllocError> {
        let call = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
        let policy = *self.policy.lock().unwrap_or_else(|p| p.into_inner());
        let fail = match policy {
            FailPolicy::Never => false,
            FailPolicy::AfterN(n) => call > n,
            FailPolicy::EveryKth(k) => k != 0 && call.is_multiple_of(k),
            FailPolicy::Always => true,
        };
        if fail {
            self.failures.fetch_add(1, Ordering::Relaxed);
            return Err(AllocError::Injected {
                allocator: self.name.clone(),
                call,
            });
        }
        self.inner.page_get()
    }

    unsafe fn page_free(&self, page: NonNull<u8>) -> Result<(), AllocError> {
        // SAFETY: forwarded with the caller's guarantee.
        unsafe { self.inner.page_free(page) }
    }

    fn pages_outstanding(&self) -> usize {
        self.inner.pages_outstanding()
    }
}
