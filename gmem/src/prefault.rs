//! Parallel prefault: `MADV_POPULATE_WRITE` over a range, split in chunks
//! that worker threads take in turn.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::sys;

/// The page size prefault steps by.
const PAGE: usize = sys::size::PAGE_4K as usize;

/// Errors of prefault.
#[derive(Debug, thiserror::Error)]
pub enum PrefaultError {
    /// No worker thread was asked for (EINVAL).
    #[error("prefault needs at least one thread")]
    NoThreads,
    /// `MADV_POPULATE_WRITE` failed (its errno is kept).
    #[error("madvise(MADV_POPULATE_WRITE): {0}")]
    Populate(#[source] std::io::Error),
}

/// Bytes each worker populates per step (and per progress report).
pub const CHUNK: u64 = 4 << 20;

/// What a prefault did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PrefaultReport {
    /// Bytes populated.
    pub bytes: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Worker threads used.
    pub threads: usize,
}

impl PrefaultReport {
    /// Throughput in GiB/s.
    pub fn gib_per_s(&self) -> f64 {
        self.bytes as f64 / (1u64 << 30) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Faults in every page of `[base, base + len)`, a readable mapping the
/// caller owns, by reading one byte of each.
pub(crate) fn touch_pages(base: usize, len: u64) {
    for offset in (0..len).step_by(PAGE) {
        // SAFETY: inside a readable mapping the caller owns; a volatile read
        // of one byte changes nothing.
        unsafe { std::ptr::read_volatile((base + offset as usize) as *const u8) };
    }
}

/// Populates `[base, base + len)` of a mapping the caller owns (by touch
/// when the memory takes no `MADV_POPULATE_WRITE`).
pub(crate) fn populate(
    base: usize,
    len: u64,
    threads: usize,
    by_touch: bool,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<PrefaultReport, PrefaultError> {
    if threads == 0 {
        return Err(PrefaultError::NoThreads);
    }
    let start = Instant::now();
    let cursor = AtomicU64::new(0);
    let done = AtomicU64::new(0);
    let failure = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..threads.min(len.div_ceil(CHUNK).max(1) as usize) {
            scope.spawn(|| {
                loop {
                    let at = cursor.fetch_add(CHUNK, Ordering::Relaxed);
                    if at >= len || failure.lock().map(|f| f.is_some()).unwrap_or(true) {
                        return;
                    }
                    let chunk = CHUNK.min(len - at);
                    if by_touch {
                        touch_pages(base + at as usize, chunk);
                        let total = done.fetch_add(chunk, Ordering::Relaxed) + chunk;
                        progress(total, len);
                        continue;
                    }
                    // SAFETY: the caller owns the mapping of [base, base + len);
                    // populating does not change its contents.
                    let result = unsafe {
                        sys::madvise(
                            (base + at as usize) as *mut u8,
                            chunk as usize,
                            libc::MADV_POPULATE_WRITE,
                        )
                    };
                    if let Err(source) = result {
                        let mut slot = failure.lock().unwrap_or_else(|p| p.into_inner());
                        slot.get_or_insert(PrefaultError::Populate(source));
                        return;
                    }
                    let total = done.fetch_add(chunk, Ordering::Relaxed) + chunk;
                    progress(total, len);
                }
            });
        }
    });
    if let Some(err) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(err);
    }
    Ok(PrefaultReport {
        bytes: len,
        elapsed: start.elapsed(),
        threads,
    })
}
