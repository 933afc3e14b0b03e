//! Page allocators: the `page_get` / `page_free` hook behind every page cache.
//!
//! A [`PageAllocator`] hands out 4 KiB, 4 KiB-aligned pages and takes them back.
//! Every allocator here keeps a ledger of the pages it has handed out, so that
//! a page it does not own, or a page freed twice, is reported as an
//! [`AllocError`] instead of corrupting its free lists.
//!
//! Provided allocators:
//! - [`ChunkAllocator`]: maps 2 MiB chunks and carves them into pages; the
//!   chunks are anonymous memory, HugeTLB pages, or `memfd_secret(2)` memory
//!   (the [`SecretAllocator`] constructor) that is gone from the kernel
//!   direct map.
//! - [`HeapAllocator`]: one `std::alloc` allocation per page.
//! - [`CountingAllocator`] and [`FailingAllocator`]: wrappers for tests and
//!   fuzzing that count calls, trip on allocation inside a forbidden section,
//!   and fail on demand.

mod chunk;
mod heap;
mod ledger;
mod section;
mod testing;

use std::fmt;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub use chunk::{CHUNK_SIZE, ChunkAllocator, ChunkBacking, SecretAllocator};
pub use heap::HeapAllocator;
pub use section::NoAllocSection;
pub use testing::{CountingAllocator, FailPolicy, FailingAllocator};

/// Size in bytes of every page an allocator hands out.
pub const PAGE_SIZE: usize = mmukit_sys::size::PAGE_4K as usize;

/// Errors of page allocators.
#[derive(Debug, thiserror::Error)]
pub enum AllocError {
    /// The allocator has no memory left (its backing store refused more).
    #[error("{allocator}: out of memory")]
    OutOfMemory {
        /// Name of the allocator that ran out.
        allocator: String,
    },
    /// A test allocator refused the request on purpose.
    #[error("{allocator}: injected allocation failure (call {call})")]
    Injected {
        /// Name of the failing allocator.
        allocator: String,
        /// The 1-based number of the `page_get` call that failed.
        call: u64,
    },
    /// The HugeTLB pool that backs a chunk has too few free pages.
    #[error(
        "HugeTLB pool {pool} has {free} free pages, a 2 MiB chunk needs 1: {}",
        mmukit_sys::hugetlb::reserve_hint(pool)
    )]
    HugeTlbPoolEmpty {
        /// The sysfs name of the pool, e.g. `hugepages-2048kB`.
        pool: String,
        /// Free pages in that pool when the mapping failed.
        free: u64,
    },
    /// `memfd_secret(2)` is not available.
    #[error(
        "memfd_secret(2) is not available ({source}): the kernel needs CONFIG_SECRETMEM \
         and must not be booted with secretmem.enable=0"
    )]
    SecretMemUnavailable {
        /// The error the kernel returned.
        source: std::io::Error,
    },
    /// A system call that maps or sizes chunk memory failed.
    #[error("{operation} failed: {source}")]
    Os {
        /// What was being done.
        operation: &'static str,
        /// The error the kernel returned.
        source: std::io::Error,
    },
    /// The page was not handed out by this allocator.
    #[error("{allocator}: page {addr:#x} was not handed out by this allocator")]
    NotOwned {
        /// Name of the allocator the page was given to.
        allocator: String,
        /// Address of the page.
        addr: usize,
    },
    /// The page was handed out by this allocator but is already free.
    #[error("{allocator}: page {addr:#x} freed twice")]
    DoubleFree {
        /// Name of the allocator the page was given to.
        allocator: String,
        /// Address of the page.
        addr: usize,
    },
    /// The address is not 4 KiB aligned, so it cannot be a page.
    #[error("{allocator}: address {addr:#x} is not page aligned")]
    Misaligned {
        /// Name of the allocator the address was given to.
        allocator: String,
        /// The address.
        addr: usize,
    },
    /// A test allocator was called inside a section where allocation is forbidden.
    #[error("{allocator}: page_get called inside a section where allocation is forbidden")]
    Forbidden {
        /// Name of the allocator.
        allocator: String,
    },
}

/// Identity of one allocator instance, unique for the life of the process.
///
/// Pages remember the identity of the allocator that handed them out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AllocatorId(u64);

impl AllocatorId {
    /// A fresh identity, never returned before in this process.
    pub fn fresh() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Self(NEXT.fetch_add(1, Ordering::Relaxed))
    }

    /// The raw number, for logs.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for AllocatorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "allocator#{}", self.0)
    }
}

/// A source of 4 KiB pages: the `page_get` / `page_free` pair.
///
/// # Safety
///
/// Implementers promise, for every address `page_get` returns:
/// - it is non-null, [`PAGE_SIZE`]-aligned, and the start of `PAGE_SIZE` bytes
///   that are readable and writable by this process;
/// - those bytes overlap no other page that is handed out and not yet freed;
/// - they stay valid until the page is passed back to `page_free` (or the
///   allocator is dropped, which callers must not do while pages are out:
///   [`crate::PagePool`] keeps its allocator alive for that reason).
///
/// and, for `page_free`, that an address it did not hand out, or one already
/// freed, is refused with [`AllocError::NotOwned`] or
/// [`AllocError::DoubleFree`] without touching any memory.
///
/// Page contents on return from `page_get` are unspecified (callers fill them).
pub unsafe trait PageAllocator: Send + Sync {
    /// The identity of this allocator instance.
    fn id(&self) -> AllocatorId;

    /// A short name for messages, e.g. `chunk(anonymous)`.
    fn name(&self) -> &str;

    /// Hands out one page.
    fn page_get(&self) -> Result<NonNull<u8>, AllocError>;

    /// Takes back a page that `page_get` of this allocator handed out.
    ///
    /// # Safety
    ///
    /// The caller must not access the page after this call returns `Ok`.
    unsafe fn page_free(&self, page: NonNull<u8>) -> Result<(), AllocError>;

    /// Number of pages handed out and not yet freed.
    fn pages_outstanding(&self) -> usize;
}

// SAFETY: forwards to the shared allocator, which upholds the contract.
unsafe impl<A: PageAllocator + ?Sized> PageAllocator for Arc<A> {
    fn id(&self) -> AllocatorId {
        (**self).id()
    }

    fn name(&self) -> &str {
        (**self).name()
    }

    fn page_get(&self) -> Result<NonNull<u8>, AllocError> {
        (**self).page_get()
    }

    unsafe fn page_free(&self, page: NonNull<u8>) -> Result<(), AllocError> {
        // SAFETY: forwarded with the caller's guarantee.
        unsafe { (**self).page_free(page) }
    }

    fn pages_outstanding(&self) -> usize {
        (**self).pages_outstanding()
    }
}

/// Checks that `addr` is page aligned, for allocators' `page_free`.
pub(crate) fn check_aligned(name: &str, addr: usize) -> Result<(), AllocError> {
    if addr.is_multiple_of(PAGE_SIZE) {
        Ok(())
    } else {
        Err(AllocError::Misaligned {
            allocator: name.to_owned(),
            addr,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(page: NonNull<u8>) -> usize {
        page.as_ptr() as usize
    }

    fn exercise(allocator: &dyn PageAllocator, pages: usize) {
        let got: Vec<NonNull<u8>> = (0..pages).map(|_| allocator.page_get().unwrap()).collect();
        let mut addrs: Vec<usize> = got.iter().map(|&page| addr(page)).collect();
        assert!(addrs.iter().all(|a| a % PAGE_SIZE == 0));
        addrs.sort_unstable();
        assert!(
            addrs.windows(2).all(|w| w[1] - w[0] >= PAGE_SIZE),
            "pages overlap"
        );
        for (i, &page) in got.iter().enumerate() {
            // SAFETY: each page is PAGE_SIZE writable bytes owned by this test.
            unsafe { std::ptr::write_bytes(page.as_ptr(), i as u8, PAGE_SIZE) };
        }
        for (i, &page) in got.iter().enumerate() {
            // SAFETY: as above; nothing else writes these pages.
            let bytes = unsafe { std::slice::from_raw_parts(page.as_ptr(), PAGE_SIZE) };
            assert!(
                bytes.iter().all(|&b| b == i as u8),
                "page {i} was overwritten"
            );
        }
        assert_eq!(allocator.pages_outstanding(), pages);
        for page in got {
            // SAFETY: not used after this.
            unsafe { allocator.page_free(page) }.unwrap();
        }
        assert_eq!(allocator.pages_outstanding(), 0);
    }

    fn assert_refuses_foreign_and_double_frees(allocator: &dyn PageAllocator) {
        let foreign = HeapAllocator::new();
        let stranger = foreign.page_get().unwrap();
        // SAFETY: refused without touching memory (the contract under test).
        let err = unsafe { allocator.page_free(stranger) }.unwrap_err();
        // The heap may have given `stranger` the address of a page this
        // allocator once handed out and took back: then it is reported as a
        // double free. Either way it is refused.
        assert!(
            matches!(
                err,
                AllocError::NotOwned { .. } | AllocError::DoubleFree { .. }
            ),
            "{err}"
        );
        // SAFETY: back to its real owner, not used afterwards.
        unsafe { foreign.page_free(stranger) }.unwrap();

        let page = allocator.page_get().unwrap();
        // SAFETY: not used after this.
        unsafe { allocator.page_free(page) }.unwrap();
        // SAFETY: refused without touching memory.
        let err = unsafe { allocator.page_free(page) }.unwrap_err();
        assert!(matches!(err, AllocError::DoubleFree { .. }), "{err}");

        let page = allocator.page_get().unwrap();
        let inside = NonNull::new(addr(page).wrapping_add(8) as *mut u8).unwrap();
        // SAFETY: refused without touching memory.
        let err = unsafe { allocator.page_free(inside) }.unwrap_err();
        assert!(matches!(err, AllocError::Misaligned { .. }), "{err}");
        // SAFETY: not used after this.
        unsafe { allocator.page_free(page) }.unwrap();
    }

    /// The `VmFlags` line of the mapping in /proc/self/smaps that holds
    /// `addr`.
    fn vm_flags_of(addr: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            let bounds = line
                .split_whitespace()
                .next()
                .and_then(|r| r.split_once('-'))
                .and_then(|(start, end)| {
                    Some((
                        usize::from_str_radix(start, 16).ok()?,
                        usize::from_str_radix(end, 16).ok()?,
                    ))
                });
            if let Some((start, end)) = bounds {
                inside = (start..end).contains(&addr);
                continue;
            }
            if inside && line.starts_with("VmFlags:") {
                return line.to_owned();
            }
        }
        panic!("no mapping holds {addr:#x}");
    }

    #[test]
    fn anonymous_chunks_ask_for_transparent_huge_pages() {
        let chunks = ChunkAllocator::anonymous();
        let page = chunks.page_get().unwrap();
        // `hg`: the mapping was advised MADV_HUGEPAGE.
        let flags = vm_flags_of(page.as_ptr() as usize);
        assert!(flags.split_whitespace().any(|flag| flag == "hg"), "{flags}");
        // SAFETY: not used after this.
        unsafe { chunks.page_free(page) }.unwrap();
    }

    #[test]
    fn chunk_allocator_carves_2m_chunks() {
        let chunks = ChunkAllocator::anonymous();
        exercise(&chunks, 1000);
        assert_eq!(
            chunks.chunks_mapped(),
            2,
            "1000 pages need two chunks of 512"
        );
        let page = chunks.page_get().unwrap();
        assert_eq!(chunks.trim(), 1, "the chunk with a page out stays");
        assert_eq!(chunks.chunks_mapped(), 1);
        // SAFETY: not used after this.
        unsafe { chunks.page_free(page) }.unwrap();
        assert_eq!(chunks.trim(), 1);
        assert_eq!(chunks.chunks_mapped(), 0);
        assert_refuses_foreign_and_double_frees(&chunks);
    }

    #[test]
    fn heap_allocator_hands_out_aligned_pages_and_checks_frees() {
        let heap = HeapAllocator::new();
        exercise(&heap, 100);
        assert_refuses_foreign_and_double_frees(&heap);
    }

    #[test]
    fn hugetlb_chunks_work_or_name_the_empty_pool() {
        use mmukit_sys::host::{Capability, record_skip};
        let free = mmukit_sys::hugetlb::HugetlbPool::read(2 << 20).map_or(0, |pool| pool.available);
        match ChunkAllocator::hugetlb() {
            Ok(chunks) => match chunks.page_get() {
                Ok(page) => {
                    // SAFETY: not used after this.
                    unsafe { chunks.page_free(page) }.unwrap();
                    exercise(&chunks, 512);
                    assert_refuses_foreign_and_double_frees(&chunks);
                }
                // Another process may have taken the last page meanwhile.
                Err(err) => assert!(matches!(err, AllocError::HugeTlbPoolEmpty { .. }), "{err}"),
            },
            Err(err) => {
                // Refused only where the probe finds no free page (another
                // test may take the last one meanwhile), naming the pool.
                assert!(err.to_string().contains("hugepages-2048kB"), "{err}");
                assert!(err.to_string().contains("nr_hugepages"), "{err}");
                if free > 0 {
                    assert!(matches!(err, AllocError::HugeTlbPoolEmpty { .. }), "{err}");
                }
                record_skip(
                    "hugetlb_chunks_work_or_name_the_empty_pool",
                    Capability::Hugetlb2M,
                    &err.to_string(),
                );
            }
        }
    }

    #[test]
    fn secret_chunks_work_or_say_why_not() {
        use mmukit_sys::host::{Capability, memfd_secret_works, record_skip};
        if !memfd_secret_works() {
            let err = SecretAllocator::new().unwrap_err();
            assert!(
                matches!(err, AllocError::SecretMemUnavailable { .. }),
                "{err}"
            );
            record_skip(
                "secret_chunks_work_or_say_why_not",
                Capability::MemfdSecret,
                &err.to_string(),
            );
            return;
        }
        let secret = SecretAllocator::new().unwrap();
        assert_eq!(secret.backing(), ChunkBacking::Secret);
        exercise(&secret, 600);
        assert_refuses_foreign_and_double_frees(&secret);
    }

    #[test]
    fn failing_allocator_policies() {
        let outcomes = |policy, calls: usize| {
            let failing = FailingAllocator::new(HeapAllocator::new(), policy);
            let results: Vec<bool> = (0..calls)
                .map(|_| match failing.page_get() {
                    Ok(page) => {
                        // SAFETY: not used after this.
                        unsafe { failing.page_free(page) }.unwrap();
                        true
                    }
                    Err(err) => {
                        assert!(matches!(err, AllocError::Injected { .. }));
                        false
                    }
                })
                .collect();
            assert_eq!(
                failing.failures() as usize,
                results.iter().filter(|ok| !**ok).count()
            );
            results
        };
        assert_eq!(outcomes(FailPolicy::Never, 3), [true, true, true]);
        assert_eq!(outcomes(FailPolicy::Always, 2), [false, false]);
        assert_eq!(
            outcomes(FailPolicy::AfterN(2), 4),
            [true, true, false, false]
        );
        assert_eq!(
            outcomes(FailPolicy::EveryKth(3), 6),
            [true, true, false, true, true, false]
        );
        assert_eq!(outcomes(FailPolicy::EveryKth(0), 2), [true, true]);
    }

    #[test]
    fn counting_allocator_counts_and_shares_the_inner_identity() {
        let counting = CountingAllocator::new(FailingAllocator::new(
            HeapAllocator::new(),
            FailPolicy::EveryKth(2),
        ));
        assert_eq!(counting.id(), counting.inner().inner().id());
        let page = counting.page_get().unwrap();
        assert!(counting.page_get().is_err());
        // SAFETY: freed through the inner allocator, which owns it; not used after.
        unsafe { counting.inner().inner().page_free(page) }.unwrap();
        assert_eq!(
            (counting.gets(), counting.get_failures(), counting.frees()),
            (1, 1, 0)
        );
    }

    #[test]
    fn allocator_ids_are_unique() {
        let a = HeapAllocator::new();
        let b = HeapAllocator::new();
        assert_ne!(a.id(), b.id());
        assert_ne!(ChunkAllocator::anonymous().id(), a.id());
    }
}
