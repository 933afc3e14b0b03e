//! The MMU lock: a reader-writer lock whose readers count in per-thread
//! shards, so that vCPU threads taking it for read (every software access
//! and fault) do not bounce one cache line between cores. Writers (zap,
//! split, dirty-log protection) are rare: they raise a flag and wait for
//! every shard to drain.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

/// Huge leaves a splitter splits between two voluntary releases of the
/// lock, so that faults waiting for it are not starved by a long split.
pub(crate) const SPLITS_PER_YIELD: u64 = 64;

/// Reader shards per lock; threads beyond this share shards.
pub(crate) const SHARDS: usize = 64;

/// A counter on its own cache lines.
#[repr(align(128))]
#[derive(Default)]
struct Padded(AtomicUsize);

/// The sharded reader-writer lock.
pub(crate) struct MmuLock {
    writer: Mutex<()>,
    writing: AtomicBool,
    readers: Box<[Padded]>,
}

impl Default for MmuLock {
    fn default() -> Self {
        Self {
            writer: Mutex::new(()),
            writing: AtomicBool::new(false),
            readers: (0..SHARDS).map(|_| Padded::default()).collect(),
        }
    }
}

/// This thread's reader shard, assigned round-robin at first use.
pub(crate) fn thread_shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: Cell<Option<usize>> = const { Cell::new(None) };
    }
    SHARD.with(|shard| {
        shard.get().unwrap_or_else(|| {
            let assigned = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
            shard.set(Some(assigned));
            assigned
        })
    })
}

fn wait_while(mut busy: impl FnMut() -> bool) {
    let mut spins = 0u32;
    while busy() {
        if spins < 64 {
            std::hint::spin_loop();
            spins += 1;
        } else {
            std::thread::yield_now();
        }
    }
}

impl MmuLock {
    /// Takes the lock for read.
    pub(crate) fn read(&self) -> ReadGuard<'_> {
        let counter = &self.readers[thread_shard()].0;
        loop {
            // Announce the reader, then check for a writer. The writer does
            // the opposite (flag, then counters); with both sequentially
            // consistent, one of the two always sees the other.
            counter.fetch_add(1, Ordering::SeqCst);
            if !self.writing.load(Ordering::SeqCst) {
                return ReadGuard { counter };
            }
            counter.fetch_sub(1, Ordering::Release);
            wait_while(|| self.writing.load(Ordering::Relaxed));
        }
    }

    /// Takes the lock for write: new readers wait, present ones drain.
    pub(crate) fn write(&self) -> WriteGuard<'_> {
        let writer = self
            .writer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        self.writing.store(true, Ordering::SeqCst);
        for shard in &*self.readers {
            wait_while(|| shard.0.load(Ordering::SeqCst) != 0);
        }
        WriteGuard {
            lock: self,
            _writer: writer,
        }
    }
}

/// Held while reading; dropping it releases the reader.
pub(crate) struct ReadGuard<'a> {
    counter: &'a AtomicUsize,
}

impl Drop for ReadGuard<'_> {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::Release);
    }
}

/// Held while writing; dropping it lets readers in again.
pub(crate) struct WriteGuard<'a> {
    lock: &'a MmuLock,
    _writer: MutexGuard<'a, ()>,
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        self.lock.writing.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicU64;

    use super::*;

    #[test]
    fn writers_exclude_readers_and_each_other() {
        let lock = Arc::new(MmuLock::default());
        // Writers move one unit between two counters; readers must never see
        // the move half done.
        let a = Arc::new(AtomicU64::new(1000));
        let b = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..4)
            .map(|id| {
                let (lock, a, b) = (lock.clone(), a.clone(), b.clone());
                std::thread::spawn(move || {
                    for _ in 0..2000 {
                        if id % 2 == 0 {
                            let _guard = lock.write();
                            if a.load(Ordering::Relaxed) > 0 {
                                a.fetch_sub(1, Ordering::Relaxed);
                                std::hint::spin_loop();
                                b.fetch_add(1, Ordering::Relaxed);
                            }
                        } else {
                            let _guard = lock.read();
                            let sum = a.load(Ordering::Relaxed) + b.load(Ordering::Relaxed);
                            assert_eq!(sum, 1000, "a reader saw a write in progress");
                        }
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(a.load(Ordering::Relaxed) + b.load(Ordering::Relaxed), 1000);
        assert_eq!(b.load(Ordering::Relaxed), 1000);
    }

    #[test]
    fn readers_share() {
        let lock = MmuLock::default();
        let first = lock.read();
        let second = lock.read();
        drop((first, second));
        drop(lock.write());
        let _again = lock.read();
    }
}
