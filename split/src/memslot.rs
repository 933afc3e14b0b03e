//! Memory slots: ranges of guest frames, where they map on the host, and
//! their dirty-logging state.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::addr::{Gfn, Pfn};
use crate::ept::Level;

/// Errors of memory slots.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MemslotError {
    /// A slot with no pages.
    #[error("memslot {id}: zero pages")]
    Empty {
        /// The slot id.
        id: u32,
    },
    /// The slot's range overflows the guest physical address space.
    #[error("memslot {id}: {base_gfn} + {npages:#x} pages overflows")]
    Overflow {
        /// The slot id.
        id: u32,
        /// First guest frame.
        base_gfn: Gfn,
        /// Number of pages.
        npages: u64,
    },
    /// The slot overlaps another slot, or reuses its id.
    #[error("memslot {id} overlaps or reuses memslot {other}")]
    Overlap {
        /// The new slot's id.
        id: u32,
        /// The existing slot's id.
        other: u32,
    },
    /// No slot has this id.
    #[error("no memslot {id}")]
    NoSuchSlot {
        /// The id asked for.
        id: u32,
    },
    /// A dirty-log range that is not inside the slot or not 64-page aligned.
    #[error(
        "memslot {id}: dirty-log range at page {first_page} ({num_pages} pages) is outside the slot or not 64-aligned"
    )]
    BadLogRange {
        /// The slot id.
        id: u32,
        /// First page, relative to the slot.
        first_page: u64,
        /// Number of pages.
        num_pages: u64,
    },
    /// Dirty logging is not enabled on the slot.
    #[error("memslot {id}: dirty logging is not enabled")]
    NotLogging {
        /// The slot id.
        id: u32,
    },
}

/// How dirty logging behaves on a slot, fixed when it is enabled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogMode {
    /// Get returns and clears the log; huge pages split at enable.
    Classic,
    /// Manual protect with "initially set": every bit starts set, nothing
    /// is split or protected at enable; clear splits and protects per range.
    ManualInitiallySet,
}

/// A page of private memory: the host frame behind a guest frame, and the
/// order of the page that holds it (9 for a 2 MiB HugeTLB page, 18 for
/// 1 GiB, 0 for 4 KiB), as `kvm_gmem_get_pfn` answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrivatePage {
    /// The host frame of the guest frame asked for.
    pub pfn: Pfn,
    /// The order of the page behind it.
    pub order: u8,
}

/// Why private memory could not give a frame.
pub type PrivateMemoryError = Box<dyn std::error::Error + Send + Sync>;

/// Where a slot's private frames come from (a guest memory file bound to
/// the slot: KVM's `slot->gmem`). `split` knows nothing of files; the glue
/// that makes a file a provider lives above it.
pub trait PrivateMemory: Send + Sync + std::fmt::Debug {
    /// The frame behind page `slot_page` of the slot (0 is the slot's first
    /// guest frame) and the order of the page that holds it. Called before
    /// the MMU lock is taken, so it may allocate.
    fn get_pfn(&self, slot_page: u64) -> Result<PrivatePage, PrivateMemoryError>;
}

/// One memory slot.
#[derive(Debug)]
pub struct Memslot {
    id: u32,
    base_gfn: Gfn,
    npages: u64,
    host_base_pfn: Pfn,
    host_level: Level,
    private: Option<Arc<dyn PrivateMemory>>,
    logging: AtomicBool,
    manual: AtomicBool,
    bitmap: Vec<AtomicU64>,
}

impl Memslot {
    /// A slot of `npages` guest frames from `base_gfn`, backed by host frames
    /// from `host_base_pfn` (no host memory is touched: frames are numbers).
    /// The host is taken to map them with pages of any size; see
    /// [`with_host_page_level`](Self::with_host_page_level).
    pub fn new(
        id: u32,
        base_gfn: Gfn,
        npages: u64,
        host_base_pfn: Pfn,
    ) -> Result<Self, MemslotError> {
        if npages == 0 {
            return Err(MemslotError::Empty { id });
        }
        let overflow = MemslotError::Overflow {
            id,
            base_gfn,
            npages,
        };
        let end = base_gfn.checked_add(npages).ok_or(overflow.clone())?;
        host_base_pfn.checked_add(npages).ok_or(overflow.clone())?;
        if end.0 > 1 << 45 {
            return Err(overflow);
        }
        Ok(Self {
            id,
            base_gfn,
            npages,
            host_base_pfn,
            host_level: Level::L1G,
            private: None,
            logging: AtomicBool::new(false),
            manual: AtomicBool::new(false),
            bitmap: (0..npages.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        })
    }

    /// The slot with its host memory mapped by pages no larger than `level`
    /// (4K for ordinary memory, 2M where transparent huge pages or 2 MiB
    /// HugeTLB pages back it, 1G for 1 GiB HugeTLB pages): no leaf of the
    /// slot's shared memory is larger, as KVM bounds a leaf by
    /// `host_pfn_mapping_level`. One bound holds for the whole slot.
    ///
    /// ```
    /// use split::{Gfn, Level, Memslot, Pfn};
    ///
    /// let slot = Memslot::new(0, Gfn(0), 1 << 18, Pfn(0x4_0000))?;
    /// assert_eq!(slot.max_level(Gfn(0)), Level::L1G);
    /// let slot = slot.with_host_page_level(Level::L2M);
    /// assert_eq!(slot.max_level(Gfn(0)), Level::L2M);
    /// # Ok::<(), split::MemslotError>(())
    /// ```
    pub fn with_host_page_level(mut self, level: Level) -> Self {
        self.host_level = level;
        self
    }

    /// The largest page the host maps the slot's memory with.
    pub fn host_page_level(&self) -> Level {
        self.host_level
    }

    /// The slot with private memory from `private` (KVM's
    /// `KVM_SET_USER_MEMORY_REGION2` with a guest_memfd): private faults
    /// on its frames take their frames from it.
    pub fn with_private_memory(mut self, private: Arc<dyn PrivateMemory>) -> Self {
        self.private = Some(private);
        self
    }

    /// The slot's private memory, if it has some.
    pub fn private_memory(&self) -> Option<&Arc<dyn PrivateMemory>> {
        self.private.as_ref()
    }

    /// The slot id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// First guest frame.
    pub fn base_gfn(&self) -> Gfn {
        self.base_gfn
    }

    /// Number of guest frames.
    pub fn npages(&self) -> u64 {
        self.npages
    }

    /// One past the last guest frame.
    pub fn end_gfn(&self) -> Gfn {
        self.base_gfn + self.npages
    }

    /// Whether `gfn` is in the slot.
    pub fn contains(&self, gfn: Gfn) -> bool {
        (self.base_gfn..self.end_gfn()).contains(&gfn)
    }

    /// The host frame `gfn` maps to.
    pub fn host_pfn(&self, gfn: Gfn) -> Pfn {
        debug_assert!(self.contains(gfn));
        self.host_base_pfn + (gfn - self.base_gfn)
    }

    /// The guest frame that host frame `pfn` backs, if this slot maps it.
    pub fn gfn_of_host_pfn(&self, pfn: Pfn) -> Option<Gfn> {
        let offset = pfn.0.checked_sub(self.host_base_pfn.0)?;
        (offset < self.npages).then(|| self.base_gfn + offset)
    }

    /// Whether the host frames of two slots overlap.
    pub fn host_overlaps(&self, other: &Memslot) -> bool {
        self.host_base_pfn < other.host_base_pfn + other.npages
            && other.host_base_pfn < self.host_base_pfn + self.npages
    }

    /// The largest leaf level that may map `gfn` from the slot's host
    /// memory: no larger than the host's pages, the aligned region inside
    /// the slot, and the host frames sharing its alignment.
    pub fn max_level(&self, gfn: Gfn) -> Level {
        for level in [Level::L1G, Level::L2M] {
            if level > self.host_level {
                continue;
            }
            let pages = level.entry_pages();
            let start = gfn.align_down(pages);
            let host_aligned = self
                .host_base_pfn
                .0
                .wrapping_sub(self.base_gfn.0)
                .is_multiple_of(pages);
            if host_aligned && start >= self.base_gfn && start + pages <= self.end_gfn() {
                return level;
            }
        }
        Level::L4K
    }

    /// Whether dirty logging is on.
    pub fn logging(&self) -> bool {
        self.logging.load(Ordering::Acquire)
    }

    /// The log mode, when logging is on.
    pub fn log_mode(&self) -> Option<LogMode> {
        self.logging().then(|| {
            if self.manual.load(Ordering::Relaxed) {
                LogMode::ManualInitiallySet
            } else {
                LogMode::Classic
            }
        })
    }

    pub(crate) fn start_logging(&self, mode: LogMode) {
        let manual = mode == LogMode::ManualInitiallySet;
        self.manual.store(manual, Ordering::Relaxed);
        let fill = if manual { !0 } else { 0 };
        for (i, word) in self.bitmap.iter().enumerate() {
            word.store(fill & self.word_mask(i), Ordering::Relaxed);
        }
        self.logging.store(true, Ordering::Release);
    }

    pub(crate) fn stop_logging(&self) {
        self.logging.store(false, Ordering::Release);
        for word in &self.bitmap {
            word.store(0, Ordering::Relaxed);
        }
    }

    /// The valid bits of bitmap word `index`.
    fn word_mask(&self, index: usize) -> u64 {
        let bits = self.npages - index as u64 * 64;
        if bits >= 64 { !0 } else { (1 << bits) - 1 }
    }

    /// Marks `gfn` dirty.
    pub(crate) fn mark_dirty(&self, gfn: Gfn) {
        let page = gfn - self.base_gfn;
        self.bitmap[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Relaxed);
    }

    /// A copy of the bitmap.
    pub(crate) fn snapshot(&self) -> Vec<u64> {
        self.bitmap
            .iter()
            .map(|word| word.load(Ordering::Relaxed))
            .collect()
    }

    /// Takes the bitmap, leaving it clear.
    pub(crate) fn take(&self) -> Vec<u64> {
        self.bitmap
            .iter()
            .map(|word| word.swap(0, Ordering::Relaxed))
            .collect()
    }

    /// Checks a manual-protect clear of `mask` words from page `first_page`:
    /// the slot logs, `first_page` is a multiple of 64 inside the slot, and
    /// the mask does not pass the slot's last bitmap word.
    pub(crate) fn check_clear(&self, first_page: u64, mask: &[u64]) -> Result<(), MemslotError> {
        let id = self.id;
        if self.log_mode().is_none() {
            return Err(MemslotError::NotLogging { id });
        }
        let num_pages = mask.len() as u64 * 64;
        if !first_page.is_multiple_of(64)
            || first_page >= self.npages
            || first_page + num_pages > self.npages.next_multiple_of(64)
        {
            return Err(MemslotError::BadLogRange {
                id,
                first_page,
                num_pages,
            });
        }
        Ok(())
    }

    /// Clears the bits of `mask` from page `first_page` (a multiple of 64).
    /// `KVM_CLEAR_DIRTY_LOG`'s bitmap step, one 64-page word at a time:
    /// clears the bits of `mask` (bit i is slot page `first_page + i`) and
    /// returns, for each word where any bit was really cleared, the word's
    /// first page and the bits that were set both in the log and in the mask
    /// (the kernel's `mask &= atomic_long_fetch_andnot(mask, p)`). Only
    /// those pages need protecting again.
    pub(crate) fn clear_words(&self, first_page: u64, mask: &[u64]) -> Vec<ClearedWord> {
        let first_word = (first_page / 64) as usize;
        mask.iter()
            .enumerate()
            .filter(|&(_, &bits)| bits != 0)
            .filter_map(|(offset, &bits)| {
                let word = first_word + offset;
                let cleared = bits & self.bitmap[word].fetch_and(!bits, Ordering::Relaxed);
                (cleared != 0).then_some(ClearedWord {
                    first_page: word as u64 * 64,
                    bits: cleared,
                })
            })
            .collect()
    }
}

/// One word of a dirty-log clear: the bits that were set in the log and in
/// the mask, and are now clear.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ClearedWord {
    /// The slot page of bit 0 (a multiple of 64).
    pub(crate) first_page: u64,
    /// The cleared bits.
    pub(crate) bits: u64,
}

impl ClearedWord {
    /// The guest frames from the first to the last cleared page (the range
    /// the kernel splits and write-protects: `__ffs(mask)` to `__fls(mask)`),
    /// for a slot starting at `base_gfn`.
    pub(crate) fn gfn_range(self, base_gfn: Gfn) -> std::ops::Range<u64> {
        let first = base_gfn.0 + self.first_page;
        first + u64::from(self.bits.trailing_zeros())
            ..first + 64 - u64::from(self.bits.leading_zeros())
    }

    /// Whether the page at guest frame `gfn` is among the cleared ones.
    pub(crate) fn has(self, base_gfn: Gfn, gfn: u64) -> bool {
        let page = gfn.wrapping_sub(base_gfn.0 + self.first_page);
        page < 64 && self.bits & (1 << page) != 0
    }
}
