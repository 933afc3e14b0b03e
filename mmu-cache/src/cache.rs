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

/// Expands to a capacity: the given one, or [`DEFAULT_CAPACITY`].
#[doc(hidden)]
#[macro_export]
macro_rules! __cache_set_capacity {
    () => {
        $crate::DEFAULT_CAPACITY
    };
    ($capacity:expr) => {
        $capacity
    };
}

/// Declares a struct grouping the caches one operation needs, with a
/// minimum (and optionally a capacity) per cache, and `topup` / `free_all`
/// methods that handle them together.
///
/// `topup` tops the members up in declaration order and stops at the first
/// failure, naming the member; members keep what they obtained.
///
/// ```
/// use mmu_cache::{cache_set, ObjectCache, PageCache, PagePool, Slab, alloc::HeapAllocator};
///
/// #[derive(Default)]
/// struct Header { gfn: u64 }
///
/// cache_set! {
///     /// What one fault needs.
///     struct FaultCaches {
///         /// Page-table pages.
///         tables: PageCache => [min 5],
///         /// Table headers.
///         headers: ObjectCache<Header> => [min 5, capacity 10],
///     }
/// }
///
/// let pool = PagePool::new(HeapAllocator::new());
/// let mut caches = FaultCaches {
///     tables: PageCache::new(pool.clone()).with_init_value(1 << 63),
///     headers: ObjectCache::new(Slab::new(pool.for_kind(), None)?),
/// };
/// caches.topup()?;
/// assert_eq!((caches.tables.nr_free(), caches.headers.nr_free()), (40, 10));
/// assert_eq!(caches.free_all(), 50);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[macro_export]
macro_rules! cache_set {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident {
            $(
                $(#[$field_meta:meta])*
                $field_vis:vis $field:ident : $ty:ty => [min $min:expr $(, capacity $capacity:expr)?]
            ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        $vis struct $name {
            $(
                $(#[$field_meta])*
                $field_vis $field: $ty,
            )+
        }

        impl $name {
            /// Each member with its minimum and capacity.
            #[allow(dead_code, reason = "a cache set may leave any generated method unused")]
            pub const MEMBERS: &'static [(&'static str, usize, usize)] = &[
                $((stringify!($field), $min, $crate::__cache_set_capacity!($($capacity)?)),)+
            ];

            /// Tops every member up to its minimum, in declaration order.
            #[allow(dead_code, reason = "a cache set may leave any generated method unused")]
            pub fn topup(&mut self) -> ::core::result::Result<(), $crate::CacheError> {
                $(
                    self.$field
                        .topup_with_capacity($crate::__cache_set_capacity!($($capacity)?), $min)
                        .map_err(|err| $crate::CacheError::in_set(stringify!($field), err))?;
                )+
                Ok(())
            }

            /// Returns every member's cached objects; returns how many.
            #[allow(dead_code, reason = "a cache set may leave any generated method unused")]
            pub fn free_all(&mut self) -> usize {
                0 $(+ self.$field.free_all())+
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::alloc::{
        ChunkAllocator, CountingAllocator, FailPolicy, FailingAllocator, HeapAllocator,
        NoAllocSection, PageAllocator,
    };

    type Counting = CountingAllocator<FailingAllocator<ChunkAllocator>>;

    fn counting_pool(policy: FailPolicy) -> (Arc<Counting>, Arc<PagePool>) {
        let counting = Arc::new(CountingAllocator::new(FailingAllocator::new(
            ChunkAllocator::anonymous(),
            policy,
        )));
        let pool = PagePool::from_shared(counting.clone(), None);
        (counting, pool)
    }

    fn page_cache(policy: FailPolicy) -> (Arc<Counting>, PageCache) {
        let (counting, pool) = counting_pool(policy);
        (counting, PageCache::new(pool).named("test"))
    }

    #[test]
    fn topup_fills_to_default_capacity_then_is_a_noop() {
        let (counting, mut cache) = page_cache(FailPolicy::Never);
        cache.topup(5).unwrap();
        assert_eq!(cache.nr_free(), DEFAULT_CAPACITY);
        assert_eq!(cache.capacity(), DEFAULT_CAPACITY);
        assert_eq!(counting.gets(), 40);
        for _ in 0..35 {
            drop(cache.alloc().unwrap());
        }
        cache.topup(5).unwrap();
        assert_eq!(cache.nr_free(), 5, "5 >= min: nothing to do");
        assert_eq!(counting.gets(), 40);
        cache.topup(6).unwrap();
        assert_eq!(cache.nr_free(), 40, "below min: fill to capacity");
        assert_eq!(counting.gets(), 75);
    }

    #[test]
    fn topup_with_capacity_fixes_the_capacity() {
        let (_, mut cache) = page_cache(FailPolicy::Never);
        cache.topup_with_capacity(8, 2).unwrap();
        assert_eq!((cache.nr_free(), cache.capacity()), (8, 8));
        drop(cache.alloc().unwrap());
        let err = cache.topup_with_capacity(16, 8).unwrap_err();
        assert!(
            matches!(
                err,
                CacheError::CapacityMismatch {
                    fixed: 8,
                    requested: 16,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(
            cache.nr_free(),
            7,
            "contents unchanged by the refused topup"
        );
        cache.topup(1).unwrap(); // 7 >= 1: returns before the capacity check
        let err = cache.topup(8).unwrap_err();
        assert!(matches!(
            err,
            CacheError::CapacityMismatch {
                fixed: 8,
                requested: 40,
                ..
            }
        ));
        assert_eq!(cache.free_all(), 7);
        assert_eq!(cache.capacity(), 0);
        cache.topup_with_capacity(16, 1).unwrap();
        assert_eq!(cache.nr_free(), 16, "free_all unfixed the capacity");
    }

    #[test]
    fn bad_configurations_fail_before_anything_is_allocated() {
        let (counting, mut cache) = page_cache(FailPolicy::Never);
        assert!(matches!(
            cache.topup_with_capacity(0, 1),
            Err(CacheError::ZeroCapacity { .. })
        ));
        assert!(matches!(
            cache.topup_with_capacity(4, 5),
            Err(CacheError::MinAboveCapacity {
                min: 5,
                capacity: 4,
                ..
            })
        ));
        let mut cache = cache.zeroed().with_init_value(1 << 63);
        let err = cache.topup(1).unwrap_err();
        assert!(
            matches!(err, CacheError::InitValueWithZero { init_value, .. } if init_value == 1 << 63)
        );
        assert_eq!(counting.gets() + counting.get_failures(), 0);
        assert_eq!(cache.nr_free(), 0);
    }

    #[test]
    fn partial_fill_succeeds_once_min_is_reached() {
        let (counting, mut cache) = page_cache(FailPolicy::AfterN(10));
        cache.topup(5).unwrap();
        assert_eq!(cache.nr_free(), 10);
        assert_eq!(
            counting.get_failures(),
            1,
            "the fill stops at the first failure"
        );
    }

    #[test]
    fn fill_below_min_fails_and_keeps_what_it_got() {
        let (counting, mut cache) = page_cache(FailPolicy::AfterN(3));
        let err = cache.topup(5).unwrap_err();
        assert!(
            matches!(
                err,
                CacheError::OutOfMemory {
                    obtained: 3,
                    min: 5,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("injected"), "{err}");
        assert_eq!(cache.nr_free(), 3);
        assert_eq!(counting.inner().inner().pages_outstanding(), 3);
        counting.inner().set_policy(FailPolicy::Never);
        cache.topup(5).unwrap();
        assert_eq!(cache.nr_free(), 40);
    }

    #[test]
    fn alloc_is_lifo() {
        let (_, mut cache) = page_cache(FailPolicy::Never);
        cache.topup(1).unwrap();
        let a = cache.alloc().unwrap();
        let b = cache.alloc().unwrap();
        let (a_addr, b_addr) = (a.addr(), b.addr());
        cache.free(a);
        cache.free(b);
        assert_eq!(cache.alloc().unwrap().addr(), b_addr);
        assert_eq!(cache.alloc().unwrap().addr(), a_addr);
    }

    #[test]
    fn alloc_never_calls_the_allocator_after_topup() {
        let (counting, mut cache) = page_cache(FailPolicy::Never);
        cache.topup(40).unwrap();
        let mut taken = Vec::new();
        {
            let _lock = NoAllocSection::enter();
            for _ in 0..40 {
                taken.push(cache.alloc().unwrap());
            }
        }
        assert_eq!(counting.gets(), 40);
        // One more under the "lock" is the caller bug the counting allocator catches.
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _lock = NoAllocSection::enter();
            cache.alloc()
        }));
        assert!(
            caught.is_err(),
            "the fallback allocation ran inside the section"
        );
    }

    #[test]
    fn empty_alloc_is_counted_and_served_by_a_fallback() {
        let (counting, mut cache) = page_cache(FailPolicy::Never);
        let page = cache.alloc().unwrap();
        assert_eq!(cache.stats().empty_allocs, 1);
        assert_eq!(counting.gets(), 1);
        drop(page);
        counting.inner().set_policy(FailPolicy::Always);
        let err = cache.alloc().unwrap_err();
        assert!(
            matches!(err, CacheError::EmptyFallbackFailed { .. }),
            "{err}"
        );
        assert_eq!(cache.stats().empty_allocs, 2);
    }

    #[test]
    fn init_value_fills_all_512_words_and_zeroed_pages_are_zero() {
        let pool = PagePool::new(ChunkAllocator::anonymous());
        // Dirty some pages so that reuse would show stale contents.
        let mut dirty: Vec<Page> = (0..40).map(|_| pool.get().unwrap()).collect();
        dirty.iter_mut().for_each(|page| page.fill(0xdead_beef));
        drop(dirty);
        let mut cache: PageCache = PageCache::new(pool.clone()).with_init_value(1 << 63);
        cache.topup(40).unwrap();
        for _ in 0..40 {
            let page = cache.alloc().unwrap();
            assert!(page.words().iter().all(|&word| word == 1 << 63));
        }
        let mut dirty: Vec<Page> = (0..40).map(|_| pool.get().unwrap()).collect();
        dirty.iter_mut().for_each(|page| page.fill(0xdead_beef));
        drop(dirty);
        let mut cache: PageCache = PageCache::new(pool).zeroed();
        cache.topup(40).unwrap();
        while cache.nr_free() > 0 {
            assert!(cache.alloc().unwrap().words().iter().all(|&word| word == 0));
        }
    }

    #[test]
    fn free_all_returns_exactly_what_was_cached() {
        let (counting, mut cache) = page_cache(FailPolicy::Never);
        cache.topup(1).unwrap();
        let kept: Vec<_> = (0..7).map(|_| cache.alloc().unwrap()).collect();
        assert_eq!(cache.free_all(), 33);
        assert_eq!(counting.frees(), 33);
        assert_eq!(counting.pages_outstanding(), 7);
        drop(kept);
        assert_eq!(counting.frees(), 40);
        assert_eq!(counting.pages_outstanding(), 0);
    }

    #[test]
    fn free_keeps_objects_up_to_the_capacity() {
        let (counting, mut cache) = page_cache(FailPolicy::Never);
        let extra: Page = PagePool::from_shared(counting.clone(), None).get().unwrap();
        cache.free(extra);
        assert_eq!(
            cache.nr_free(),
            0,
            "no capacity fixed: returned to the allocator"
        );
        assert_eq!(counting.pages_outstanding(), 0);
        cache.topup_with_capacity(2, 2).unwrap();
        let page = cache.alloc().unwrap();
        cache.free(page);
        assert_eq!(cache.nr_free(), 2);
    }

    #[test]
    fn topup_returns_before_any_check_when_min_is_cached() {
        // __kvm_mmu_topup_memory_cache: `if (mc->nobjs >= min) return 0;`
        // comes first, so a call that needs no fill never fails.
        let (counting, mut cache) = page_cache(FailPolicy::Never);
        cache.topup_with_capacity(8, 4).unwrap();
        let gets = counting.gets();
        cache.topup_with_capacity(16, 8).unwrap();
        cache.topup_with_capacity(0, 0).unwrap();
        cache.topup_with_capacity(2, 3).unwrap();
        assert_eq!(counting.gets(), gets);
        assert!(matches!(
            cache.topup_with_capacity(16, 9),
            Err(CacheError::CapacityMismatch { fixed: 8, .. })
        ));
        let mut empty: PageCache = PageCache::new(cache.source().pool().clone())
            .zeroed()
            .with_init_value(7);
        empty.topup_with_capacity(0, 0).unwrap();
        assert!(matches!(
            empty.topup(1),
            Err(CacheError::InitValueWithZero { init_value: 7, .. })
        ));
    }

    #[test]
    fn init_value_zero_with_zeroing_is_no_conflict() {
        let (_, cache) = page_cache(FailPolicy::Never);
        let mut cache = cache.zeroed().with_init_value(0);
        cache.topup(1).unwrap();
        assert!(cache.alloc().unwrap().words().iter().all(|&w| w == 0));
    }

    #[test]
    fn freed_objects_come_back_with_their_fill_restored() {
        let (_, cache) = page_cache(FailPolicy::Never);
        let mut cache = cache.with_init_value(1 << 63);
        cache.topup_with_capacity(2, 1).unwrap();
        let mut page = cache.alloc().unwrap();
        page.words_mut()[17] = 0xdead;
        cache.free(page);
        let page = cache.alloc().unwrap();
        assert!(page.words().iter().all(|&w| w == 1 << 63));
        cache.free(page);

        let (_, cache) = page_cache(FailPolicy::Never);
        let mut cache = cache.zeroed();
        cache.topup_with_capacity(1, 1).unwrap();
        let mut page = cache.alloc().unwrap();
        page.words_mut()[511] = 5;
        cache.free(page);
        assert!(cache.alloc().unwrap().words().iter().all(|&w| w == 0));

        let slab = Slab::<Descriptor>::new(PagePool::new(HeapAllocator::new()), None).unwrap();
        let mut objects = ObjectCache::new(slab);
        objects.topup_with_capacity(1, 1).unwrap();
        let mut desc = objects.alloc().unwrap();
        desc.entries[3] = 9;
        desc.count = 4;
        objects.free(desc);
        let desc = objects.alloc().unwrap();
        assert_eq!((desc.entries, desc.count), ([0; 14], 0));
    }

    #[test]
    fn accounting_charges_caches_and_refuses_past_the_limit() {
        let account = Arc::new(Account::with_limit("vm", 10 * PAGE_SIZE as u64));
        let counting = Arc::new(CountingAllocator::new(HeapAllocator::new()));
        let pool = PagePool::from_shared(counting.clone(), Some(account.clone()));
        let mut cache: PageCache = PageCache::new(pool);
        cache.topup(4).unwrap();
        assert_eq!(cache.nr_free(), 10, "filled as far as the limit allows");
        assert_eq!(account.charged(), 10 * PAGE_SIZE as u64);
        let held = cache.alloc().unwrap();
        cache.free_all();
        assert_eq!(account.charged(), PAGE_SIZE as u64);
        let mut other: PageCache = PageCache::new(PagePool::from_shared(
            counting.clone(),
            Some(account.clone()),
        ));
        let gets = counting.gets();
        let err = other.topup_with_capacity(20, 12).unwrap_err();
        let CacheError::AccountLimit {
            obtained,
            min,
            source: AccountError::LimitExceeded { asked, left, .. },
            ..
        } = &err
        else {
            panic!("unexpected {err}");
        };
        assert_eq!((*obtained, *min), (9, 12), "a charge failing part-way");
        assert_eq!((*asked, *left), (PAGE_SIZE as u64, 0));
        assert!(err.to_string().contains("9 of the 12 objects"), "{err}");
        assert_eq!(counting.gets(), gets + 9, "what the account took stays");
        assert_eq!(other.nr_free(), 9);
        other.topup_with_capacity(20, 9).unwrap();
        assert_eq!(other.free_all(), 9);
        drop(held);
        assert_eq!(account.charged(), 0);
        assert_eq!(account.peak(), 10 * PAGE_SIZE as u64);
    }

    #[derive(Default)]
    struct Descriptor {
        entries: [u64; 14],
        count: u8,
    }

    #[test]
    fn object_caches_serve_default_objects_and_charge_their_size() {
        let account = Arc::new(Account::new("objects"));
        let counting = Arc::new(CountingAllocator::new(HeapAllocator::new()));
        let slab = Slab::<Descriptor>::new(
            PagePool::from_shared(counting.clone(), None),
            Some(account.clone()),
        )
        .unwrap();
        let mut cache = ObjectCache::new(slab.clone());
        cache.topup_with_capacity(553, 513).unwrap();
        assert_eq!(cache.nr_free(), 553);
        let per_page = PAGE_SIZE / std::mem::size_of::<Descriptor>();
        assert_eq!(counting.gets() as usize, 553_usize.div_ceil(per_page));
        assert_eq!(
            account.charged(),
            553 * std::mem::size_of::<Descriptor>() as u64
        );
        let mut descriptor = cache.alloc().unwrap();
        assert_eq!((descriptor.count, descriptor.entries), (0, [0; 14]));
        descriptor.entries[0] = 42;
        descriptor.count = 1;
        cache.free_all();
        assert_eq!(slab.live(), 1);
        drop(descriptor);
        assert_eq!(account.charged(), 0);
        drop(cache);
        drop(slab);
        assert_eq!(counting.pages_outstanding(), 0);
    }

    crate::cache_set! {
        struct TestSet {
            tables: PageCache => [min 5],
            descriptors: ObjectCache<Descriptor> => [min 513, capacity 553],
        }
    }

    #[test]
    fn cache_sets_top_up_every_member_and_name_the_failing_one() {
        let make_set = |policy| {
            let (counting, pool) = counting_pool(policy);
            let set = TestSet {
                tables: PageCache::new(pool.clone()),
                descriptors: ObjectCache::new(Slab::new(pool.for_kind(), None).unwrap()),
            };
            (counting, set)
        };
        assert_eq!(
            TestSet::MEMBERS,
            &[("tables", 5, 40), ("descriptors", 513, 553)]
        );
        let (_, mut set) = make_set(FailPolicy::Never);
        set.topup().unwrap();
        assert_eq!((set.tables.nr_free(), set.descriptors.nr_free()), (40, 553));
        assert_eq!(set.free_all(), 593);
        // 40 table pages, then one slab page of descriptors: far below 513.
        let (_, mut set) = make_set(FailPolicy::AfterN(41));
        let err = set.topup().unwrap_err();
        assert!(
            matches!(
                &err,
                CacheError::InSet {
                    member: "descriptors",
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(set.tables.nr_free(), 40);
        assert_eq!(
            set.descriptors.nr_free(),
            PAGE_SIZE / std::mem::size_of::<Descriptor>()
        );
    }
}
