//! # mmu-cache
//!
//! The pre-allocating memory cache of an MMU, with pluggable page allocators.
//!
//! An MMU must not allocate while it holds its lock: allocation may sleep,
//! fail, or recurse into the memory manager. So, as in KVM's
//! `struct kvm_mmu_memory_cache`, every operation first *tops up* the caches
//! it may need (outside the lock, where allocation is allowed and failure is
//! easy to report), then *allocates* from them under the lock, which is a
//! pop from a stack and never calls the allocator.
//!
//! The pieces:
//! - [`alloc::PageAllocator`]: the `page_get` / `page_free` hook. Chunked
//!   (anonymous, HugeTLB or `memfd_secret` chunks), heap, and test
//!   allocators are provided; a cache's owner may supply its own, e.g. to
//!   update per-page metadata when pages come and go.
//! - [`PagePool`] and [`Page<K>`]: an owned page remembers its pool and
//!   returns to its own allocator on drop; the kind `K` keeps pools of
//!   different purpose apart at compile time.
//! - [`MemoryCache`]: [`PageCache`] (zero fill or 64-bit `init_value`) and
//!   [`ObjectCache`] (typed objects from a [`Slab`]), with the kernel's topup
//!   rules.
//! - [`Account`]: bytes charged for what caches take, with an optional limit.
//! - [`cache_set!`]: the caches one operation needs, topped up together.
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::Mutex;
//! use mmu_cache::{Account, PageCache, PageKind, PagePool};
//! use mmu_cache::alloc::ChunkAllocator;
//!
//! /// Pages that hold page tables.
//! enum TablePage {}
//! impl PageKind for TablePage {}
//!
//! let account = Arc::new(Account::with_limit("vm0", 1 << 20));
//! let pool = PagePool::with_account(ChunkAllocator::anonymous(), account.clone());
//! let mut cache: PageCache<TablePage> = PageCache::new(pool).with_init_value(1 << 63);
//! let tables = Mutex::new(Vec::new());
//!
//! cache.topup(4)?; // may allocate: no lock held
//! {
//!     let mut tables = tables.lock().unwrap(); // the "MMU lock"
//!     for _ in 0..4 {
//!         tables.push(cache.alloc()?); // never allocates
//!     }
//! }
//! assert_eq!(account.charged(), 40 * 4096);
//! cache.free_all();
//! assert_eq!(account.charged(), 4 * 4096); // the four tables in use
//! # Ok::<(), mmu_cache::CacheError>(())
//! ```

pub mod account;
pub mod alloc;
pub mod cache;
pub mod page;
pub mod slab;

pub use account::{Account, AccountError};
pub use alloc::{AllocError, PAGE_SIZE};
pub use cache::{
    CacheError, CacheSource, CacheStats, DEFAULT_CAPACITY, MemoryCache, ObjectCache, ObjectSource,
    PageCache, PageSource,
};
pub use page::{Page, PageError, PageKind, PagePool, PlainPage, WORDS_PER_PAGE};
pub use slab::{Slab, SlabBox, SlabError, SlabPage};
