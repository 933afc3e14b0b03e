//! The memory cache: objects allocated ahead of a critical section.
//!
//! [`MemoryCache`] follows the kernel's `struct kvm_mmu_memory_cache`:
//! `topup` before taking a lock, `alloc` (which never calls the allocator)
//! under it. [`PageCache`] serves pages, optionally zeroed or filled with a
//! 64-bit `init_value`; [`ObjectCache`] serves typed objects from a [`Slab`].
//! The [`cache_set!`](crate::cache_set) macro groups the caches one operation
//! needs and tops them up together.

use std::marker::PhantomData;
use std::sync::Arc;

use crate::account::{Account, AccountError};
use crate::alloc::PAGE_SIZE;
use crate::page::{Page, PageError, PageKind, PagePool, PlainPage};
use crate::slab::{Slab, SlabBox, SlabError};

/// The capacity fixed by [`MemoryCache::topup`] (the kernel's
/// `KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE` on x86).
pub const DEFAULT_CAPACITY: usize = 40;

/// Errors of memory caches.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A topup asked for a capacity of zero.
    #[error("cache {cache}: capacity 0 requested")]
    ZeroCapacity {
        /// The cache's name.
        cache: &'static str,
    },
    /// A topup asked for a minimum above the capacity.
    #[error("cache {cache}: minimum {min} is above the capacity {capacity}")]
    MinAboveCapacity {
        /// The cache's name.
        cache: &'static str,
        /// The minimum asked for.
        min: usize,
        /// The capacity asked for.
        capacity: usize,
    },
    /// A topup asked for a capacity other than the one fixed by an earlier topup.
    #[error(
        "cache {cache}: capacity {requested} requested, but it is fixed at {fixed} until free_all"
    )]
    CapacityMismatch {
        /// The cache's name.
        cache: &'static str,
        /// The capacity fixed at the first topup.
        fixed: usize,
        /// The capacity asked for now.
        requested: usize,
    },
    /// The cache was configured with both zero fill and an `init_value`.
    #[error("cache {cache}: init_value {init_value:#x} conflicts with zero fill")]
    InitValueWithZero {
        /// The cache's name.
        cache: &'static str,
        /// The configured value.
        init_value: u64,
    },
    /// The account refused a charge before the minimum was reached (a
    /// memcg charge failing part-way); what was obtained stays cached.
    #[error("cache {cache}: {obtained} of the {min} objects needed: {source}")]
    AccountLimit {
        /// The cache's name.
        cache: &'static str,
        /// Objects in the cache after the failed fill.
        obtained: usize,
        /// The minimum asked for.
        min: usize,
        /// The refusal, with the bytes asked and left.
        source: AccountError,
    },
    /// The allocator failed before the minimum was reached; what was obtained stays cached.
    #[error("cache {cache}: out of memory with {obtained} of the {min} objects needed: {source}")]
    OutOfMemory {
        /// The cache's name.
        cache: &'static str,
        /// Objects in the cache after the failed fill.
        obtained: usize,
        /// The minimum asked for.
        min: usize,
        /// What the allocator said.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// `alloc` found the cache empty and the fallback allocation failed too.
    #[error("cache {cache}: empty on alloc, and the fallback allocation failed: {source}")]
    EmptyFallbackFailed {
        /// The cache's name.
        cache: &'static str,
        /// What the allocator said.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A member of a cache set failed its topup.
    #[error("cache set member {member}: {source}")]
    InSet {
        /// The field name of the member.
        member: &'static str,
        /// The member's error.
        source: Box<CacheError>,
    },
}

impl CacheError {
    /// Wraps the error of a cache-set member, naming it.
    pub fn in_set(member: &'static str, source: CacheError) -> Self {
        Self::InSet {
            member,
            source: Box::new(source),
        }
    }
}

/// Where a [`MemoryCache`] gets its objects.
pub trait CacheSource {
    /// What the cache holds.
    type Item;
    /// Why obtaining an item can fail.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Bytes one item costs its account.
    fn item_bytes(&self) -> u64;

    /// The account charged for items, if any.
    fn account(&self) -> Option<&Account>;

    /// Checks the source's configuration before a fill.
    fn check(&self, cache: &'static str) -> Result<(), CacheError>;

    /// Obtains one new item from the allocator.
    fn obtain(&self) -> Result<Self::Item, Self::Error>;

    /// The account's refusal inside an [`obtain`](Self::obtain) error, if
    /// that is why it failed.
    fn charge_refusal(err: &Self::Error) -> Option<&AccountError>;

    /// Makes an item handed back to the cache as good as a new one (its
    /// fill restored), or returns `None` to send it back to its allocator.
    fn recycle(&self, item: Self::Item) -> Option<Self::Item>;
}

/// Counters of a cache's life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Topups that had to fill.
    pub fills: u64,
    /// Items obtained from the allocator by fills.
    pub obtained: u64,
    /// Items handed out by `alloc`.
    pub allocs: u64,
    /// `alloc` calls that found the cache empty (caller bugs).
    pub empty_allocs: u64,
}

/// A LIFO stack of pre-allocated objects with the kernel's topup rules.
///
/// ```
/// use mmu_cache::{PageCache, PagePool, alloc::ChunkAllocator};
///
/// let mut cache: PageCache = PageCache::new(PagePool::new(ChunkAllocator::anonymous()))
///     .with_init_value(1 << 63);
/// cache.topup(5)?;                 // outside the lock: may allocate
/// assert_eq!(cache.nr_free(), 40); // filled to the default capacity
/// let table = cache.alloc()?;      // under the lock: never allocates
/// assert!(table.words().iter().all(|&w| w == 1 << 63));
/// # Ok::<(), mmu_cache::CacheError>(())
/// ```
#[derive(Debug)]
pub struct MemoryCache<S: CacheSource> {
    name: &'static str,
    source: S,
    objects: Vec<S::Item>,
    /// Fixed by the first filling topup; 0 while unset.
    capacity: usize,
    stats: CacheStats,
}

impl<S: CacheSource> MemoryCache<S> {
    /// An empty cache over `source`. Nothing is allocated until a topup.
    pub fn from_source(source: S) -> Self {
        Self {
            name: "unnamed",
            source,
            objects: Vec::new(),
            capacity: 0,
            stats: CacheStats::default(),
        }
    }

    /// Names the cache in errors and logs.
    pub fn named(mut self, name: &'static str) -> Self {
        self.name = name;
        self
    }

    /// The cache's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The source items come from.
    pub fn source(&self) -> &S {
        &self.source
    }

    /// Objects ready to be handed out.
    pub fn nr_free(&self) -> usize {
        self.objects.len()
    }

    /// The capacity fixed by the first topup, or 0 when none is fixed.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Counters of the cache's life.
    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// Ensures at least `min` objects are cached, filling up to the default
    /// capacity (40) when fewer are.
    pub fn topup(&mut self, min: usize) -> Result<(), CacheError> {
        self.topup_with_capacity(DEFAULT_CAPACITY, min)
    }

    /// Ensures at least `min` objects are cached, filling up to `capacity`
    /// (the kernel's `__kvm_mmu_topup_memory_cache`).
    ///
    /// When `nr_free() >= min` the call returns at once, before any other
    /// check, as the kernel's does. Otherwise the configuration is checked
    /// before anything is allocated: capacity 0, a minimum above the
    /// capacity, a capacity other than the one fixed by an earlier fill
    /// (until [`free_all`](Self::free_all)), or a conflicting fill
    /// configuration. Then the cache fills to `capacity`. If the allocator
    /// or the account (a memcg charge, in kernel terms) fails on the way,
    /// what was obtained stays cached, and the topup still succeeds when
    /// `min` objects were reached; otherwise it fails with
    /// [`CacheError::AccountLimit`] or [`CacheError::OutOfMemory`].
    pub fn topup_with_capacity(&mut self, capacity: usize, min: usize) -> Result<(), CacheError> {
        if self.objects.len() >= min {
            return Ok(());
        }
        let cache = self.name;
        if capacity == 0 {
            return Err(CacheError::ZeroCapacity { cache });
        }
        if min > capacity {
            return Err(CacheError::MinAboveCapacity {
                cache,
                min,
                capacity,
            });
        }
        if self.capacity != 0 && self.capacity != capacity {
            return Err(CacheError::CapacityMismatch {
                cache,
                fixed: self.capacity,
                requested: capacity,
            });
        }
        self.source.check(cache)?;
        self.capacity = capacity;
        self.objects.reserve_exact(capacity - self.objects.len());
        self.stats.fills += 1;
        while self.objects.len() < capacity {
            match self.source.obtain() {
                Ok(item) => {
                    self.objects.push(item);
                    self.stats.obtained += 1;
                }
                Err(_) if self.objects.len() >= min => return Ok(()),
                Err(err) => {
                    let obtained = self.objects.len();
                    return Err(match S::charge_refusal(&err) {
                        Some(refusal) => CacheError::AccountLimit {
                            cache,
                            obtained,
                            min,
                            source: refusal.clone(),
                        },
                        None => CacheError::OutOfMemory {
                            cache,
                            obtained,
                            min,
                            source: Box::new(err),
                        },
                    });
                }
            }
        }
        Ok(())
    }

    /// The object [`alloc`](Self::alloc) would return next, if any.
    #[inline]
    pub fn peek(&self) -> Option<&S::Item> {
        self.objects.last()
    }

    /// Pops the most recently cached object. Never calls the allocator while
    /// the cache has objects.
    ///
    /// An empty cache is a caller bug (a missing or too small topup): it is
    /// counted in [`CacheStats::empty_allocs`], logged once per cache, and
    /// served by a fallback allocation; only if that fails too is an error
    /// returned.
    #[inline]
    pub fn alloc(&mut self) -> Result<S::Item, CacheError> {
        match self.objects.pop() {
            Some(item) => {
                self.stats.allocs += 1;
                Ok(item)
            }
            None => self.alloc_from_empty(),
        }
    }

    #[cold]
    #[inline(never)]
    fn alloc_from_empty(&mut self) -> Result<S::Item, CacheError> {
        self.stats.empty_allocs += 1;
        if self.stats.empty_allocs == 1 {
            tracing::warn!(
                cache = self.name,
                "alloc from an empty memory cache: the caller did not top up enough; \
                 serving it with a fallback allocation"
            );
        }
        let item = self
            .source
            .obtain()
            .map_err(|err| CacheError::EmptyFallbackFailed {
                cache: self.name,
                source: Box::new(err),
            })?;
        self.stats.allocs += 1;
        Ok(item)
    }

    /// Gives an object back: kept if the cache has room under its capacity,
    /// with its fill restored (zero, `init_value`, or `T::default()`), so
    /// that no object ever comes out of the cache stale; otherwise returned
    /// to its allocator.
    pub fn free(&mut self, item: S::Item) {
        if self.objects.len() < self.capacity
            && let Some(item) = self.source.recycle(item)
        {
            self.objects.push(item);
        }
    }

    /// Returns every cached object to its allocator and unfixes the capacity;
    /// returns how many objects were released.
    pub fn free_all(&mut self) -> usize {
        let released = self.objects.len();
        self.objects = Vec::new();
        self.capacity = 0;
        released
    }
}

/// The source of a [`PageCache`]: a pool and how new pages are filled.
#[derive(Debug)]
pub struct PageSource<K: PageKind> {
    pool: Arc<PagePool<K>>,
    zero: bool,
    init_value: Option<u64>,
    kind: PhantomData<fn() -> K>,
}

impl<K: PageKind> PageSource<K> {
    /// The pool pages come from.
    pub fn pool(&self) -> &Arc<PagePool<K>> {
        &self.pool
    }

    /// Whether new pages are zeroed.
    pub fn zero(&self) -> bool {
        self.zero
    }

    /// The value written to every word of a new page, if any.
    pub fn init_value(&self) -> Option<u64> {
        self.init_value
    }
}

impl<K: PageKind> PageSource<K> {
    /// Writes the configured fill into `page`: `init_value` in every word,
    /// or zeroes; nothing when neither is configured.
    fn fill(&self, page: &mut Page<K>) {
        if let Some(value) = self.init_value {
            page.fill(value);
        } else if self.zero {
            page.zero();
        }
    }
}

impl<K: PageKind> CacheSource for PageSource<K> {
    type Item = Page<K>;
    type Error = PageError;

    fn item_bytes(&self) -> u64 {
        PAGE_SIZE as u64
    }

    fn account(&self) -> Option<&Account> {
        self.pool.account().map(|account| &**account)
    }

    fn check(&self, cache: &'static str) -> Result<(), CacheError> {
        match self.init_value {
            // The kernel's rule is `init_value && gfp_zero`: a zero
            // init_value is what zeroing writes anyway.
            Some(init_value) if self.zero && init_value != 0 => {
                Err(CacheError::InitValueWithZero { cache, init_value })
            }
            _ => Ok(()),
        }
    }

    fn obtain(&self) -> Result<Page<K>, PageError> {
        let mut page = self.pool.get()?;
        self.fill(&mut page);
        Ok(page)
    }

    fn charge_refusal(err: &PageError) -> Option<&AccountError> {
        match err {
            PageError::Account(refusal) => Some(refusal),
            PageError::Alloc(_) => None,
        }
    }

    fn recycle(&self, mut page: Page<K>) -> Option<Page<K>> {
        self.fill(&mut page);
        Some(page)
    }
}

/// A cache of pages of kind `K`.
pub type PageCache<K = PlainPage> = MemoryCache<PageSource<K>>;

impl<K: PageKind> MemoryCache<PageSource<K>> {
    /// An empty page cache over `pool`; new pages are left as the allocator
    /// gives them unless [`zeroed`](Self::zeroed) or
    /// [`with_init_value`](Self::with_init_value) says otherwise.
    pub fn new(pool: Arc<PagePool<K>>) -> Self {
        Self::from_source(PageSource {
            pool,
            zero: false,
            init_value: None,
            kind: PhantomData,
        })
    }

    /// Zero every new page (the kernel's `__GFP_ZERO`).
    pub fn zeroed(mut self) -> Self {
        self.source.zero = true;
        self
    }

    /// Write `value` to all 512 words of every new page (the kernel's
    /// `init_value`, e.g. `1 << 63` for EPT's suppress-#VE non-present
    /// entries). A non-zero value combined with [`zeroed`](Self::zeroed)
    /// makes the next filling topup fail; 0 with zeroing is no conflict.
    pub fn with_init_value(mut self, value: u64) -> Self {
        self.source.init_value = Some(value);
        self
    }
}

/// The source of an [`ObjectCache`]: a slab; objects start as `T::default()`.
#[derive(Debug)]
pub struct ObjectSource<T> {
    slab: Arc<Slab<T>>,
}

impl<T> ObjectSource<T> {
    /// The slab objects come from.
    pub fn slab(&self) -> &Arc<Slab<T>> {
        &self.slab
    }
}

impl<T: Default> CacheSource for ObjectSource<T> {
    type Item = SlabBox<T>;
    type Error = SlabError;

    fn item_bytes(&self) -> u64 {
        self.slab.object_bytes()
    }

    fn account(&self) -> Option<&Account> {
        self.slab.account().map(|account| &**account)
    }

    fn check(&self, _cache: &'static str) -> Result<(), CacheError> {
        Ok(())
    }

    fn obtain(&self) -> Result<SlabBox<T>, SlabError> {
        self.slab.alloc(T::default())
    }

    fn charge_refusal(err: &SlabError) -> Option<&AccountError> {
        match err {
            SlabError::Page(PageError::Account(refusal)) => Some(refusal),
            _ => None,
        }
    }

    fn recycle(&self, mut object: SlabBox<T>) -> Option<SlabBox<T>> {
        *object = T::default();
        Some(object)
    }
}

/// A cache of typed objects from a slab.
///
/// Objects are built with `T::default()` (the analogue of `__GFP_ZERO` for
/// typed objects). An object cache has no `init_value`: the type has no such
/// method, which is how the kernel's "init_value only for page caches" rule
/// holds here.
///
/// ```compile_fail
/// use mmu_cache::{ObjectCache, PagePool, Slab, alloc::HeapAllocator};
/// let slab = Slab::<u64>::new(PagePool::new(HeapAllocator::new()), None).unwrap();
/// let cache = ObjectCache::new(slab).with_init_value(1); // no such method
/// ```
pub type ObjectCache<T> = MemoryCache<ObjectSource<T>>;

impl<T: Default> MemoryCache<ObjectSource<T>> {
    /// An empty object cache over `slab`.
    pub fn new(slab: Arc<Slab<T>>) -> Self {
        Self::from_source(ObjectSource { slab })
    }
}

mod set;
#[cfg(test)]
mod tests;
