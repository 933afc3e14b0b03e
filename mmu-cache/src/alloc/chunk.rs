//! The chunked system allocator: 2 MiB chunks mapped from the kernel and
//! carved into 4 KiB pages, with anonymous, HugeTLB or `memfd_secret` backing.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::os::fd::OwnedFd;

use mmukit_sys::hugetlb::HugetlbPool;
use std::ptr::NonNull;
use std::sync::Mutex;

use super::{AllocError, AllocatorId, PAGE_SIZE, PageAllocator, check_aligned};

/// Size of one chunk: 2 MiB, the x86 huge page size.
pub const CHUNK_SIZE: usize = 2 << 20;
const CHUNK_SHIFT: u32 = CHUNK_SIZE.trailing_zeros();
const PAGES_PER_CHUNK: usize = CHUNK_SIZE / PAGE_SIZE;
const BITMAP_WORDS: usize = PAGES_PER_CHUNK / 64;

/// Where a [`ChunkAllocator`]'s chunks come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkBacking {
    /// Private anonymous memory, advised to be transparent huge pages
    /// (`MADV_HUGEPAGE`) where the host's THP mode allows.
    Anonymous,
    /// 2 MiB HugeTLB pages (each chunk is one huge page, populated at map time).
    HugeTlb,
    /// `memfd_secret(2)` memory: not in the kernel direct map, not readable by
    /// other processes or the kernel. Pages are not zeroed by the allocator.
    Secret,
}

impl ChunkBacking {
    fn name(self) -> &'static str {
        match self {
            Self::Anonymous => "chunk(anonymous)",
            Self::HugeTlb => "chunk(hugetlb-2M)",
            Self::Secret => "chunk(secret)",
        }
    }
}

/// One 2 MiB chunk and which of its pages are out.
#[derive(Debug)]
struct Chunk {
    base: usize,
    out: [u64; BITMAP_WORDS],
    nr_out: usize,
}

/// Hashes chunk numbers (already unique, well-spread integers) with one
/// multiplication instead of SipHash, which would dominate `page_get`.
#[derive(Default)]
struct ChunkNumberHasher(u64);

impl Hasher for ChunkNumberHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0 << 8 | u64::from(byte)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_usize(&mut self, n: usize) {
        self.0 = (n as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

#[derive(Debug, Default)]
struct ChunkPool {
    /// Chunks by `base >> CHUNK_SHIFT`.
    chunks: HashMap<usize, Chunk, BuildHasherDefault<ChunkNumberHasher>>,
    /// Free page addresses, popped from the end.
    free: Vec<usize>,
}

/// Maps 2 MiB chunks and carves them into pages.
///
/// Chunks are 2 MiB aligned, so the chunk of a page is found by shifting its
/// address; a per-chunk bitmap tells which pages are out, which makes
/// foreign and double frees detectable at no extra memory cost. Chunks stay
/// mapped until [`ChunkAllocator::trim`] or drop.
///
/// ```
/// use mmu_cache::alloc::{ChunkAllocator, PageAllocator};
///
/// let chunks = ChunkAllocator::anonymous();
/// let page = chunks.page_get()?;
/// assert_eq!(chunks.chunks_mapped(), 1);
/// // SAFETY: the page is not used after this.
/// unsafe { chunks.page_free(page)? };
/// assert_eq!(chunks.trim(), 1);
/// # Ok::<(), mmu_cache::alloc::AllocError>(())
/// ```
#[derive(Debug)]
pub struct ChunkAllocator {
    id: AllocatorId,
    backing: ChunkBacking,
    pool: Mutex<ChunkPool>,
}

/// The secret allocator: a [`ChunkAllocator`] over `memfd_secret(2)` chunks.
///
/// The user-space analogue of `__GFP_UNMAPPED`: pages are removed from the
/// kernel's direct map. Zeroing is not forced, since a trusted consumer may
/// initialise pages itself.
pub struct SecretAllocator;

impl SecretAllocator {
    /// A chunk allocator with [`ChunkBacking::Secret`], after checking that the
    /// kernel offers `memfd_secret(2)` (a clear error when it does not).
    #[expect(
        clippy::new_ret_no_self,
        reason = "a secret chunk allocator is a ChunkAllocator; the type only checks the kernel first"
    )]
    pub fn new() -> Result<ChunkAllocator, AllocError> {
        let fd = memfd_secret()?;
        drop(fd);
        Ok(ChunkAllocator::new(ChunkBacking::Secret))
    }
}

impl ChunkAllocator {
    /// An allocator whose chunks have the given backing. Nothing is mapped
    /// until the first `page_get`.
    pub fn new(backing: ChunkBacking) -> Self {
        Self {
            id: AllocatorId::fresh(),
            backing,
            pool: Mutex::new(ChunkPool::default()),
        }
    }

    /// An allocator over private anonymous chunks.
    pub fn anonymous() -> Self {
        Self::new(ChunkBacking::Anonymous)
    }

    /// An allocator over 2 MiB HugeTLB chunks. Fails at once, naming the pool,
    /// when the pool has no free page.
    pub fn hugetlb() -> Result<Self, AllocError> {
        let free = HugetlbPool::read(CHUNK_SIZE as u64).map_or(0, |pool| pool.available);
        if free == 0 {
            return Err(AllocError::HugeTlbPoolEmpty {
                pool: mmukit_sys::hugetlb::pool_name(CHUNK_SIZE as u64),
                free,
            });
        }
        Ok(Self::new(ChunkBacking::HugeTlb))
    }

    /// The backing of this allocator's chunks.
    pub fn backing(&self) -> ChunkBacking {
        self.backing
    }

    /// Number of chunks currently mapped.
    pub fn chunks_mapped(&self) -> usize {
        self.lock().chunks.len()
    }

    /// Unmaps every chunk with no page out; returns how many were unmapped.
    pub fn trim(&self) -> usize {
        let mut pool = self.lock();
        let idle: Vec<usize> = pool
            .chunks
            .iter()
            .filter(|(_, chunk)| chunk.nr_out == 0)
            .map(|(&key, _)| key)
            .collect();
        if idle.is_empty() {
            return 0;
        }
        pool.free
            .retain(|addr| !idle.contains(&(addr >> CHUNK_SHIFT)));
        for key in &idle {
            if let Some(chunk) = pool.chunks.remove(key) {
                // SAFETY: the chunk was mapped by `map_chunk` and none of its
                // pages is out, so nothing refers to it any more.
                unsafe { unmap(chunk.base, CHUNK_SIZE) };
            }
        }
        idle.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ChunkPool> {
        self.pool
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn map_chunk(&self) -> Result<usize, AllocError> {
        let base = reserve_aligned_chunk()?;
        let mapped = match self.backing {
            ChunkBacking::Anonymous => {
                map_anonymous_chunk(base, libc::MAP_PRIVATE, "mmap(anonymous chunk)")
                    .inspect(|()| advise_huge_page(base))
            }
            ChunkBacking::HugeTlb => map_anonymous_chunk(
                base,
                libc::MAP_PRIVATE | libc::MAP_HUGETLB | libc::MAP_HUGE_2MB | libc::MAP_POPULATE,
                "mmap(hugetlb chunk)",
            )
            .map_err(|err| match err {
                AllocError::Os { source, .. } if source.raw_os_error() == Some(libc::ENOMEM) => {
                    AllocError::HugeTlbPoolEmpty {
                        pool: mmukit_sys::hugetlb::pool_name(CHUNK_SIZE as u64),
                        free: HugetlbPool::read(CHUNK_SIZE as u64).map_or(0, |pool| pool.available),
                    }
                }
                other => other,
            }),
            ChunkBacking::Secret => map_secret_chunk(base),
        };
        if let Err(err) = mapped {
            // SAFETY: `base..base + CHUNK_SIZE` is our own reservation (or what
            // a failed MAP_FIXED left of it); nothing else uses it.
            unsafe { unmap(base, CHUNK_SIZE) };
            return Err(err);
        }
        Ok(base)
    }
}

fn memfd_secret() -> Result<OwnedFd, AllocError> {
    mmukit_sys::memfd_secret().map_err(|source| AllocError::SecretMemUnavailable { source })
}

fn map_secret_chunk(base: usize) -> Result<(), AllocError> {
    let fd = memfd_secret()?;
    mmukit_sys::ftruncate(&fd, CHUNK_SIZE as u64).map_err(|source| AllocError::Os {
        operation: "ftruncate(memfd_secret)",
        source,
    })?;
    // The mapping keeps the file alive after `fd` is closed.
    // SAFETY: `base..base + CHUNK_SIZE` is a reservation this allocator owns,
    // so replacing it with MAP_FIXED cannot clobber anyone else's mapping.
    unsafe {
        mmukit_sys::map_fixed(
            base as *mut u8,
            CHUNK_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            &fd,
            0,
        )
    }
    .map_err(|source| AllocError::Os {
        operation: "mmap(memfd_secret chunk)",
        source,
    })
}

/// Reserves a `CHUNK_SIZE`-aligned `CHUNK_SIZE` of address space (as
/// PROT_NONE, to be replaced with MAP_FIXED).
fn reserve_aligned_chunk() -> Result<usize, AllocError> {
    let reservation =
        mmukit_sys::Mapping::reserve_aligned(CHUNK_SIZE, CHUNK_SIZE).map_err(|source| {
            AllocError::Os {
                operation: "mmap(reserve chunk)",
                source,
            }
        })?;
    // The pool owns the chunk from now on (unmapped by `unmap`).
    Ok(reservation.into_raw() as usize)
}

/// Asks for the anonymous chunk at `base` to be one transparent huge page
/// (`MADV_HUGEPAGE`), where the host's THP mode allows it. Tables carved
/// from it then share one TLB entry, as the kernel's page tables do in its
/// huge-mapped direct map; a split that writes thousands of new tables
/// otherwise misses the TLB on every one. A refusal (a kernel without THP)
/// leaves 4 KiB pages, which work the same.
fn advise_huge_page(base: usize) {
    // SAFETY: `base..base + CHUNK_SIZE` is the chunk this allocator just
    // mapped; the advice changes how it is backed, not its contents.
    let advised = unsafe { mmukit_sys::madvise(base as *mut u8, CHUNK_SIZE, libc::MADV_HUGEPAGE) };
    if let Err(err) = advised {
        tracing::trace!(base, %err, "anonymous chunk stays on 4 KiB pages");
    }
}

/// Maps anonymous memory with `flags` over the reserved chunk at `base`.
fn map_anonymous_chunk(
    base: usize,
    flags: libc::c_int,
    operation: &'static str,
) -> Result<(), AllocError> {
    // SAFETY: `base..base + CHUNK_SIZE` is a reservation this allocator owns,
    // so replacing it with MAP_FIXED cannot clobber anyone else's mapping.
    unsafe {
        mmukit_sys::map_fixed_anonymous(
            base as *mut u8,
            CHUNK_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
        )
    }
    .map_err(|source| AllocError::Os { operation, source })
}

/// # Safety
///
/// `addr..addr + len` must be a mapping (or part of one) that this module
/// created and that nothing refers to any more.
unsafe fn unmap(addr: usize, len: usize) {
    // SAFETY: guaranteed by the caller.
    unsafe { mmukit_sys::munmap(addr as *mut u8, len) };
}

// SAFETY: pages are carved from chunks this allocator mapped read/write; the
// per-chunk bitmap guarantees a page is out at most once, and `page_free`
// refuses (without touching memory) addresses outside its chunks or whose bit
// is clear. Chunks are unmapped only when no page of theirs is out, or on drop.
unsafe impl PageAllocator for ChunkAllocator {
    fn id(&self) -> AllocatorId {
        self.id
    }

    fn name(&self) -> &str {
        self.backing.name()
    }

    fn page_get(&self) -> Result<NonNull<u8>, AllocError> {
        let mut pool = self.lock();
        if pool.free.is_empty() {
            let base = self.map_chunk()?;
            pool.chunks.insert(
                base >> CHUNK_SHIFT,
                Chunk {
                    base,
                    out: [0; BITMAP_WORDS],
                    nr_out: 0,
                },
            );
            pool.free
                .extend((0..PAGES_PER_CHUNK).rev().map(|i| base + i * PAGE_SIZE));
        }
        let addr = pool.free.pop().expect("a chunk was just mapped");
        let chunk = pool
            .chunks
            .get_mut(&(addr >> CHUNK_SHIFT))
            .expect("free pages belong to mapped chunks");
        let index = (addr - chunk.base) / PAGE_SIZE;
        chunk.out[index / 64] |= 1 << (index % 64);
        chunk.nr_out += 1;
        Ok(NonNull::new(addr as *mut u8).expect("chunks are never at address 0"))
    }

    unsafe fn page_free(&self, page: NonNull<u8>) -> Result<(), AllocError> {
        let addr = page.as_ptr() as usize;
        check_aligned(self.name(), addr)?;
        let mut pool = self.lock();
        let Some(chunk) = pool.chunks.get_mut(&(addr >> CHUNK_SHIFT)) else {
            return Err(AllocError::NotOwned {
                allocator: self.name().to_owned(),
                addr,
            });
        };
        let index = (addr - chunk.base) / PAGE_SIZE;
        let bit = 1u64 << (index % 64);
        if chunk.out[index / 64] & bit == 0 {
            return Err(AllocError::DoubleFree {
                allocator: self.name().to_owned(),
                addr,
            });
        }
        chunk.out[index / 64] &= !bit;
        chunk.nr_out -= 1;
        pool.free.push(addr);
        Ok(())
    }

    fn pages_outstanding(&self) -> usize {
        self.lock().chunks.values().map(|chunk| chunk.nr_out).sum()
    }
}

impl Drop for ChunkAllocator {
    fn drop(&mut self) {
        let pool = self.pool.get_mut().unwrap_or_else(|p| p.into_inner());
        let leaked: usize = pool.chunks.values().map(|chunk| chunk.nr_out).sum();
        if leaked != 0 {
            tracing::warn!(
                leaked,
                allocator = self.backing.name(),
                "chunk allocator dropped with pages still out"
            );
        }
        for chunk in pool.chunks.values() {
            // SAFETY: the allocator is being dropped, so by the PageAllocator
            // contract no page of this chunk may be used any more.
            unsafe { unmap(chunk.base, CHUNK_SIZE) };
        }
    }
}
