//! The memory cache with the caller's own page allocator (`mmukit_cache_*`).

use std::collections::{HashMap, HashSet};
use std::ffi::{c_int, c_void};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use mmu_cache::alloc::{AllocError, AllocatorId, ChunkAllocator, PageAllocator};
use mmu_cache::{PageCache, PagePool};

use crate::{cache_errno, guard, read_config};

/// A page allocator supplied by the caller.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct mmukit_page_allocator {
    /// Passed back to both callbacks.
    pub opaque: *mut c_void,
    /// Returns the address of a 4 KiB-aligned page, or 0 when none is left.
    pub page_get: Option<unsafe extern "C" fn(opaque: *mut c_void) -> u64>,
    /// Takes back a page `page_get` returned.
    pub page_free: Option<unsafe extern "C" fn(opaque: *mut c_void, page: u64)>,
}

/// How a cache is made.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct mmukit_cache_config {
    /// `sizeof(struct mmukit_cache_config)` as the caller compiled it.
    pub struct_size: u32,
    /// Objects per fill; 0 means the default (40). Fixed at the first topup.
    pub capacity: u32,
    /// Zero-fill new pages.
    pub zero: bool,
    /// Fill every 64-bit word of new pages with this value when non-zero
    /// (with `zero` too, topup answers -EINVAL).
    pub init_value: u64,
    /// The page allocator; NULL means the built-in one.
    pub allocator: *const mmukit_page_allocator,
}

/// The caller's allocator as a Rust `PageAllocator`.
pub(crate) struct CAllocator {
    callbacks: mmukit_page_allocator,
    id: AllocatorId,
    outstanding: Mutex<HashSet<u64>>,
}

// SAFETY: the callbacks are the caller's; the C contract in the header says
// they must be callable from any thread that uses the cache.
unsafe impl Send for CAllocator {}
// SAFETY: as above; the bookkeeping is behind a mutex.
unsafe impl Sync for CAllocator {}

// SAFETY: every page is the caller's allocator's, checked for alignment;
// frees are checked against the pages handed out and not yet freed.
unsafe impl PageAllocator for CAllocator {
    fn id(&self) -> AllocatorId {
        self.id
    }

    fn name(&self) -> &str {
        "C page allocator"
    }

    fn page_get(&self) -> Result<NonNull<u8>, AllocError> {
        let get = self
            .callbacks
            .page_get
            .ok_or_else(|| AllocError::OutOfMemory {
                allocator: self.name().into(),
            })?;
        // SAFETY: the caller's callback with the caller's opaque pointer.
        let page = unsafe { get(self.callbacks.opaque) };
        if page == 0 {
            return Err(AllocError::OutOfMemory {
                allocator: self.name().into(),
            });
        }
        if page % 4096 != 0 {
            return Err(AllocError::Misaligned {
                allocator: self.name().into(),
                addr: page as usize,
            });
        }
        self.outstanding
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(page);
        Ok(NonNull::new(page as *mut u8).expect("checked non-zero"))
    }

    unsafe fn page_free(&self, page: NonNull<u8>) -> Result<(), AllocError> {
        let addr = page.as_ptr() as u64;
        if !self
            .outstanding
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&addr)
        {
            return Err(AllocError::NotOwned {
                allocator: self.name().into(),
                addr: addr as usize,
            });
        }
        if let Some(free) = self.callbacks.page_free {
            // SAFETY: the caller's callback, with a page it handed out.
            unsafe { free(self.callbacks.opaque, addr) };
        }
        Ok(())
    }

    fn pages_outstanding(&self) -> usize {
        self.outstanding
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

impl CAllocator {
    /// The page now belongs to the caller: forget it.
    fn disown(&self, addr: u64) {
        self.outstanding
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&addr);
    }
}

/// A memory cache (opaque). One thread at a time.
///
/// Who owns a page from `mmukit_cache_alloc`: with the caller's allocator,
/// the caller (free it with that allocator); with the built-in one
/// (`allocator = NULL`), the cache, which lends it until
/// `mmukit_cache_free_page` gives it back or `mmukit_cache_destroy` frees
/// it with every other page of the cache.
pub struct mmukit_cache {
    cache: PageCache,
    capacity: usize,
    c_allocator: Option<Arc<CAllocator>>,
    /// Pages of the built-in allocator lent to the caller, by address.
    lent: HashMap<u64, mmu_cache::Page>,
}

/// Creates a cache; `*out` receives the handle.
///
/// # Safety
///
/// `config` and `out` must be valid pointers (or NULL, which gives -EINVAL);
/// `config->allocator`, when not NULL, must point to callbacks that stay
/// valid, and callable from any thread, for the cache's life.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmukit_cache_new(
    config: *const mmukit_cache_config,
    out: *mut *mut mmukit_cache,
) -> c_int {
    guard(|| {
        if config.is_null() || out.is_null() || !out.is_aligned() || !config.is_aligned() {
            return -libc::EINVAL;
        }
        // SAFETY: checked non-null and aligned; the caller's struct holds
        // `struct_size` bytes.
        let config = match unsafe { read_config(config) } {
            Ok(config) => config,
            Err(errno) => return errno,
        };
        let (pool, c_allocator) = if config.allocator.is_null() {
            (PagePool::new(ChunkAllocator::anonymous()), None)
        } else {
            // SAFETY: the caller vouches for the allocator struct.
            let callbacks = unsafe { *config.allocator };
            if callbacks.page_get.is_none() || callbacks.page_free.is_none() {
                return -libc::EINVAL;
            }
            let allocator = Arc::new(CAllocator {
                callbacks,
                id: AllocatorId::fresh(),
                outstanding: Mutex::new(HashSet::new()),
            });
            (
                PagePool::from_shared(allocator.clone(), None),
                Some(allocator),
            )
        };
        let mut cache = PageCache::new(pool).named("mmukit_cache");
        if config.zero {
            cache = cache.zeroed();
        }
        if config.init_value != 0 {
            cache = cache.with_init_value(config.init_value);
        }
        let capacity = if config.capacity == 0 {
            mmu_cache::DEFAULT_CAPACITY
        } else {
            config.capacity as usize
        };
        let handle = Box::new(mmukit_cache {
            cache,
            capacity,
            c_allocator,
            lent: HashMap::new(),
        });
        // SAFETY: checked non-null and aligned.
        unsafe { *out = Box::into_raw(handle) };
        0
    })
}

pub(crate) fn with_cache(
    cache: *mut mmukit_cache,
    body: impl FnOnce(&mut mmukit_cache) -> c_int,
) -> c_int {
    guard(|| {
        if cache.is_null() || !cache.is_aligned() {
            return -libc::EINVAL;
        }
        // SAFETY: a handle from mmukit_cache_new, per the caller's contract.
        body(unsafe { &mut *cache })
    })
}

/// Tops the cache up: nothing when it holds `min` pages, else fills to
/// capacity; -ENOMEM when fewer than `min` could be had (it keeps them).
///
/// # Safety
///
/// `cache` must be a live handle (or NULL: -EINVAL), used by one thread at a time.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmukit_cache_topup(cache: *mut mmukit_cache, min: u32) -> c_int {
    with_cache(cache, |c| {
        match c.cache.topup_with_capacity(c.capacity, min as usize) {
            Ok(()) => 0,
            Err(err) => cache_errno(&err),
        }
    })
}

/// Pops a page into `*page_out`; never calls the allocator (an empty cache
/// answers -ENOMEM). With the caller's allocator the page is the caller's
/// from now on, freed through that allocator; with the built-in one the
/// cache lends it: give it back with `mmukit_cache_free_page` (it is freed
/// with the cache otherwise, and must not be used after
/// `mmukit_cache_destroy`).
///
/// # Safety
///
/// `cache` must be a live handle; `page_out` a valid, aligned pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmukit_cache_alloc(cache: *mut mmukit_cache, page_out: *mut u64) -> c_int {
    with_cache(cache, |c| {
        if page_out.is_null() || !page_out.is_aligned() {
            return -libc::EINVAL;
        }
        if c.cache.nr_free() == 0 {
            return -libc::ENOMEM;
        }
        match c.cache.alloc() {
            Ok(page) => {
                let addr = page.addr() as u64;
                match &c.c_allocator {
                    Some(allocator) => {
                        let _ = page.into_raw();
                        allocator.disown(addr);
                    }
                    None => {
                        c.lent.insert(addr, page);
                    }
                }
                // SAFETY: checked non-null and aligned.
                unsafe { *page_out = addr };
                0
            }
            Err(err) => cache_errno(&err),
        }
    })
}

/// Gives back `page`, lent by `mmukit_cache_alloc` from the built-in
/// allocator: it returns to the allocator and must not be used again.
/// -EINVAL for a page the cache did not lend (a page of the caller's own
/// allocator is freed with that allocator).
///
/// # Safety
///
/// `cache` must be a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmukit_cache_free_page(cache: *mut mmukit_cache, page: u64) -> c_int {
    with_cache(cache, |c| match c.lent.remove(&page) {
        Some(page) => {
            drop(page);
            0
        }
        None => -libc::EINVAL,
    })
}

/// Pages lent by the cache from the built-in allocator and not given back
/// (0 for NULL).
///
/// # Safety
///
/// `cache` must be a live handle or NULL.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmukit_cache_pages_lent(cache: *const mmukit_cache) -> u64 {
    let mut lent = 0;
    with_cache(cache.cast_mut(), |c| {
        lent = c.lent.len() as u64;
        0
    });
    lent
}

/// Pages cached now (0 for NULL).
///
/// # Safety
///
/// `cache` must be a live handle or NULL.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmukit_cache_nr_free(cache: *const mmukit_cache) -> u32 {
    let mut free = 0;
    with_cache(cache.cast_mut(), |c| {
        free = c.cache.nr_free() as u32;
        0
    });
    free
}

/// Returns every cached page to the allocator; the capacity may change at
/// the next topup.
///
/// # Safety
///
/// `cache` must be a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmukit_cache_free_all(cache: *mut mmukit_cache) -> c_int {
    with_cache(cache, |c| {
        c.cache.free_all();
        0
    })
}

/// Destroys the cache, returning its cached pages, and the pages it lent
/// from the built-in allocator, to the allocator.
///
/// # Safety
///
/// `cache` must be a live handle or NULL; it is invalid afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmukit_cache_destroy(cache: *mut mmukit_cache) {
    guard(|| {
        if !cache.is_null() && cache.is_aligned() {
            // SAFETY: a handle from mmukit_cache_new, destroyed once.
            drop(unsafe { Box::from_raw(cache) });
        }
        0
    });
}
