//! Dynamic PAMT: the 4K PAMT of a 2 MiB region of host memory exists only
//! while some page of the region is used at 4K by the TDX module. A
//! refcount per region decides: the first user adds the pair of PAMT pages
//! (TDH.PHYMEM.PAMT.ADD), the last removes it (TDH.PHYMEM.PAMT.REMOVE).

use std::collections::HashMap;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use mmu_cache::alloc::{AllocError, AllocatorId, PageAllocator};
use mmu_cache::{CacheError, Page, PageCache, PageKind, PagePool};
use split::Hpa;

use crate::module::TdxModule;
use crate::status::TdxStatus;

/// Size of a PAMT region: one 2 MiB page.
pub use mmukit_sys::size::PAGE_2M as REGION;

/// Pages that hold PAMT entries. They belong to the PAMT side: a page of
/// this kind cannot be handed to a function that takes page-table pages,
/// and the other way round.
///
/// ```compile_fail
/// use mmu_cache::{Page, PagePool, alloc::HeapAllocator};
/// use split::ExternalTablePage;
/// use tdx_ext::pamt::PamtPage;
///
/// fn free_table_page(page: Page<ExternalTablePage>) { drop(page) }
/// let pool = PagePool::new(HeapAllocator::new());
/// let pamt: Page<PamtPage> = pool.get().unwrap();
/// free_table_page(pamt); // a PAMT page is not a page-table page
/// ```
#[derive(Debug)]
pub enum PamtPage {}
impl PageKind for PamtPage {}

/// Errors of Dynamic PAMT.
#[derive(Debug, thiserror::Error)]
pub enum PamtError {
    /// The PAMT cache could not provide the pair of pages.
    #[error("PAMT cache: {0}")]
    Cache(#[from] CacheError),
    /// TDH.PHYMEM.PAMT.ADD failed; the refcount stays 0 and the pages went back.
    #[error("TDH.PHYMEM.PAMT.ADD of region {region:#x}: {status}")]
    Add {
        /// The region.
        region: Hpa,
        /// The module's answer.
        status: TdxStatus,
    },
}

/// Times a PAMT.ADD answered OPERAND_BUSY is made again.
const PAMT_BUSY_RETRIES: u32 = 8;

/// When an S-EPT page becomes PAMT-backed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PamtPolicy {
    /// When it enters the MMU's external-table cache: the cache's allocator
    /// takes a PAMT reference in `page_get` and drops it in `page_free`.
    OnCacheEntry,
    /// Just before it is handed to the module, and released when the module
    /// gives it back.
    OnInstall,
}

/// Counters of Dynamic PAMT.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PamtCounters {
    /// Regions with a 4K PAMT now.
    pub regions: u64,
    /// PAMT pages in use (two per region).
    pub pages_in_use: u64,
    /// TDH.PHYMEM.PAMT.ADD calls that succeeded.
    pub adds: u64,
    /// TDH.PHYMEM.PAMT.REMOVE calls that succeeded.
    pub removes: u64,
    /// REMOVE failures: the pair is kept (leaked) and the refcount restored.
    pub leaked_pages: u64,
    /// Gets served by the lock-free fast path.
    pub fast_gets: u64,
    /// PAMT.ADD calls answered OPERAND_BUSY and made again after a kick.
    pub busy_retries: u64,
}

/// The refcounts and the PAMT pages of every region.
pub struct DynamicPamt {
    module: Arc<dyn TdxModule>,
    pool: Arc<PagePool<PamtPage>>,
    refcounts: RwLock<HashMap<u64, Arc<AtomicU32>>>,
    installed: Mutex<HashMap<u64, [Page<PamtPage>; 2]>>,
    slow: Mutex<()>,
    adds: AtomicU64,
    removes: AtomicU64,
    leaked: AtomicU64,
    fast_gets: AtomicU64,
    busy_retries: AtomicU64,
}

impl std::fmt::Debug for DynamicPamt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DynamicPamt")
            .field("counters", &self.counters())
            .finish()
    }
}

impl DynamicPamt {
    /// Dynamic PAMT over `module`, with PAMT pages from `pool`.
    pub fn new(module: Arc<dyn TdxModule>, pool: Arc<PagePool<PamtPage>>) -> Arc<Self> {
        Arc::new(Self {
            module,
            pool,
            refcounts: RwLock::new(HashMap::new()),
            installed: Mutex::new(HashMap::new()),
            slow: Mutex::new(()),
            adds: AtomicU64::new(0),
            removes: AtomicU64::new(0),
            leaked: AtomicU64::new(0),
            fast_gets: AtomicU64::new(0),
            busy_retries: AtomicU64::new(0),
        })
    }

    /// A cache of PAMT pages from this PAMT's pool (one per vCPU).
    pub fn new_cache(&self) -> PageCache<PamtPage> {
        PageCache::new(self.pool.clone()).named("pamt")
    }

    /// The pool PAMT pages come from.
    pub fn pool(&self) -> &Arc<PagePool<PamtPage>> {
        &self.pool
    }

    fn counter(&self, region: u64) -> Arc<AtomicU32> {
        if let Some(counter) = self
            .refcounts
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&region)
        {
            return counter.clone();
        }
        self.refcounts
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(region)
            .or_default()
            .clone()
    }

    /// The refcount of the region holding `hpa`.
    pub fn refcount(&self, hpa: Hpa) -> u32 {
        let hpa = hpa.0;
        self.refcounts
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(hpa & !(REGION - 1)))
            .map_or(0, |c| c.load(Ordering::Acquire))
    }

    /// Takes one reference on the region of `hpa`.
    pub fn get(&self, hpa: Hpa, cache: &mut PageCache<PamtPage>) -> Result<(), PamtError> {
        self.get_many(hpa, 1, cache)
    }

    /// Takes `count` references on the region of `hpa` (512 for the 4K
    /// children of a demoted 2 MiB page): the first adds the PAMT pages.
    pub fn get_many(
        &self,
        hpa: Hpa,
        count: u32,
        cache: &mut PageCache<PamtPage>,
    ) -> Result<(), PamtError> {
        let region = hpa.0 & !(REGION - 1);
        let counter = self.counter(region);
        // Fast path: the region is backed; just count.
        let mut current = counter.load(Ordering::Acquire);
        while current != 0 {
            match counter.compare_exchange_weak(
                current,
                current + count,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    self.fast_gets.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Err(seen) => current = seen,
            }
        }
        // Slow path, under the lock, with a re-check.
        let _slow = self.slow.lock().unwrap_or_else(|p| p.into_inner());
        // Outside the lock a count only moves while it is non-zero, and
        // never down to zero, so a non-zero count here stays non-zero.
        if counter.load(Ordering::Acquire) != 0 {
            counter.fetch_add(count, Ordering::AcqRel);
            return Ok(());
        }
        let first = cache.alloc()?;
        let second = cache.alloc()?;
        let pages = [Hpa(first.addr() as u64), Hpa(second.addr() as u64)];
        // OPERAND_BUSY (another PAMT call on the region's PAMT) is transient:
        // kick and call again, a bounded number of times, as every SEAMCALL
        // of the fault path is retried.
        let mut added = self.module.pamt_add(Hpa(region), pages);
        for _ in 0..PAMT_BUSY_RETRIES {
            match added {
                Err(status) if status.is_busy() => {
                    self.busy_retries.fetch_add(1, Ordering::Relaxed);
                    self.module.kick_vcpus();
                    added = self.module.pamt_add(Hpa(region), pages);
                }
                _ => break,
            }
        }
        if let Err(status) = added {
            // The pages were never the module's: back to the cache.
            cache.free(first);
            cache.free(second);
            return Err(PamtError::Add {
                region: Hpa(region),
                status,
            });
        }
        self.installed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(region, [first, second]);
        self.adds.fetch_add(1, Ordering::Relaxed);
        counter.store(count, Ordering::Release);
        Ok(())
    }

    /// Takes the pair of PAMT pages a DEMOTE of a 2 MiB page hands to the
    /// module (under Dynamic PAMT the module takes the 4K PAMT of the range
    /// from DEMOTE itself; a PAMT.ADD is refused while the range is mapped
    /// 2M). Give it to [`adopt`](Self::adopt) when the DEMOTE succeeded, or
    /// back to `cache` when it did not.
    pub fn take_pair(
        &self,
        cache: &mut PageCache<PamtPage>,
    ) -> Result<[Page<PamtPage>; 2], PamtError> {
        let first = cache.alloc()?;
        match cache.alloc() {
            Ok(second) => Ok([first, second]),
            Err(err) => {
                cache.free(first);
                Err(err.into())
            }
        }
    }

    /// Records `pair`, which a successful DEMOTE gave the module as the 4K
    /// PAMT of the region of `hpa`, with `count` references (512: the
    /// demoted page's 4K children). The region had no 4K PAMT before.
    pub fn adopt(&self, hpa: Hpa, pair: [Page<PamtPage>; 2], count: u32) {
        let region = hpa.0 & !(REGION - 1);
        let counter = self.counter(region);
        let _slow = self.slow.lock().unwrap_or_else(|p| p.into_inner());
        let before = counter.swap(count, Ordering::AcqRel);
        debug_assert_eq!(before, 0, "region {region:#x} had a 4K PAMT already");
        self.installed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(region, pair);
        self.adds.fetch_add(1, Ordering::Relaxed);
    }

    /// Drops one reference on the region of `hpa`.
    pub fn put(&self, hpa: Hpa) {
        self.put_many(hpa, 1);
    }

    /// Drops `count` references; the last removes the PAMT pages and gives
    /// them back to their pool. Cannot fail: if the module refuses the
    /// removal, the refcount is restored, the pages are kept out of the
    /// pool (leaked, counted), and the failure is logged.
    pub fn put_many(&self, hpa: Hpa, count: u32) {
        let region = hpa.0 & !(REGION - 1);
        let counter = self.counter(region);
        let mut current = counter.load(Ordering::Acquire);
        while current > count {
            match counter.compare_exchange_weak(
                current,
                current - count,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return,
                Err(seen) => current = seen,
            }
        }
        let _slow = self.slow.lock().unwrap_or_else(|p| p.into_inner());
        let current = loop {
            let current = counter.load(Ordering::Acquire);
            assert!(current >= count, "PAMT refcount of {region:#x} underflows");
            if current > count {
                if counter
                    .compare_exchange(
                        current,
                        current - count,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    )
                    .is_ok()
                {
                    return;
                }
                continue;
            }
            // Zero first, so that no fast-path get can slip in while the
            // pages are removed; getters now wait for the lock.
            if counter
                .compare_exchange(current, 0, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                break current;
            }
        };
        match self.module.pamt_remove(Hpa(region)) {
            Ok(_) => {
                self.removes.fetch_add(1, Ordering::Relaxed);
                let pages = self
                    .installed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&region);
                drop(pages);
            }
            Err(status) => {
                tracing::error!(region, %status, "PAMT.REMOVE failed; its pages are leaked");
                // The module may still use the pair: never back to the host.
                if let Some(pages) = self
                    .installed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&region)
                {
                    for page in pages {
                        let _ = page.into_raw();
                        self.leaked.fetch_add(1, Ordering::Relaxed);
                    }
                }
                counter.store(current, Ordering::Release);
            }
        }
    }

    /// Counters.
    pub fn counters(&self) -> PamtCounters {
        let regions = self
            .installed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len() as u64;
        PamtCounters {
            regions,
            pages_in_use: regions * 2,
            adds: self.adds.load(Ordering::Relaxed),
            removes: self.removes.load(Ordering::Relaxed),
            leaked_pages: self.leaked.load(Ordering::Relaxed),
            fast_gets: self.fast_gets.load(Ordering::Relaxed),
            busy_retries: self.busy_retries.load(Ordering::Relaxed),
        }
    }
}

/// A page allocator whose pages are PAMT-backed from the moment they are
/// handed out (the [`PamtPolicy::OnCacheEntry`] design): `page_get` takes a
/// PAMT reference on the page's region, `page_free` drops it.
pub struct PamtBackedAllocator<A> {
    inner: A,
    pamt: Arc<DynamicPamt>,
    cache: Mutex<PageCache<PamtPage>>,
    id: AllocatorId,
}

impl<A: PageAllocator> PamtBackedAllocator<A> {
    /// Wraps `inner`.
    pub fn new(inner: A, pamt: Arc<DynamicPamt>) -> Self {
        let cache = Mutex::new(pamt.new_cache());
        Self {
            inner,
            pamt,
            cache,
            id: AllocatorId::fresh(),
        }
    }
}

impl<A> PamtBackedAllocator<A> {
    /// PAMT pages idle in this allocator's own cache.
    pub fn pamt_cached(&self) -> usize {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .nr_free()
    }

    /// Returns the PAMT pages idle in this allocator's cache to their pool.
    pub fn free_cached(&self) -> usize {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .free_all()
    }
}

/// What the mirror needs of a PAMT-backed allocator whose page type it
/// does not know.
pub(crate) trait PamtCache: Send + Sync {
    fn cached(&self) -> usize;
    fn free_cached(&self) -> usize;
}

impl<A: Send + Sync> PamtCache for PamtBackedAllocator<A> {
    fn cached(&self) -> usize {
        self.pamt_cached()
    }

    fn free_cached(&self) -> usize {
        PamtBackedAllocator::free_cached(self)
    }
}

// SAFETY: pages come from `inner`, which upholds the contract; this wrapper
// only adds PAMT bookkeeping around its calls and checks frees through it.
unsafe impl<A: PageAllocator> PageAllocator for PamtBackedAllocator<A> {
    fn id(&self) -> AllocatorId {
        self.id
    }

    fn name(&self) -> &str {
        "pamt-backed"
    }

    fn page_get(&self) -> Result<NonNull<u8>, AllocError> {
        let page = self.inner.page_get()?;
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let backed = cache
            .topup(2)
            .map_err(|err| err.to_string())
            .and_then(|()| {
                self.pamt
                    .get(Hpa(page.as_ptr() as u64), &mut cache)
                    .map_err(|err| err.to_string())
            });
        if let Err(why) = backed {
            // SAFETY: the page came from `inner` just now and is unused.
            let _ = unsafe { self.inner.page_free(page) };
            return Err(AllocError::OutOfMemory {
                allocator: format!("pamt-backed ({why})"),
            });
        }
        Ok(page)
    }

    unsafe fn page_free(&self, page: NonNull<u8>) -> Result<(), AllocError> {
        // SAFETY: forwarded under the caller's guarantee.
        unsafe { self.inner.page_free(page) }?;
        self.pamt.put(Hpa(page.as_ptr() as u64));
        Ok(())
    }

    fn pages_outstanding(&self) -> usize {
        self.inner.pages_outstanding()
    }
}
