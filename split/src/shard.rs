//! Counters that every vCPU thread bumps, without a shared cache line: each
//! thread adds to its own shard (the same per-thread shard the MMU lock's
//! readers count in), and a read sums the shards.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::lock::{SHARDS, thread_shard};

/// One shard's counters, on cache lines of their own.
#[repr(align(128))]
struct Shard<const N: usize>([AtomicU64; N]);

/// `N` counters, sharded per thread.
pub(crate) struct ShardedCounters<const N: usize> {
    shards: Box<[Shard<N>]>,
}

impl<const N: usize> Default for ShardedCounters<N> {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS)
                .map(|_| Shard(std::array::from_fn(|_| AtomicU64::new(0))))
                .collect(),
        }
    }
}

impl<const N: usize> ShardedCounters<N> {
    /// Adds `value` to counter `index` in this thread's shard.
    pub(crate) fn add(&self, index: usize, value: u64) {
        self.shards[thread_shard()].0[index].fetch_add(value, Ordering::Relaxed);
    }

    /// Takes `value` from counter `index` in this thread's shard (a shard
    /// may wrap below zero; the sum does not).
    pub(crate) fn sub(&self, index: usize, value: u64) {
        self.shards[thread_shard()].0[index].fetch_sub(value, Ordering::Relaxed);
    }

    /// Counter `index`: the sum of the shards.
    pub(crate) fn get(&self, index: usize) -> u64 {
        self.shards
            .iter()
            .map(|shard| shard.0[index].load(Ordering::Relaxed))
            .fold(0u64, u64::wrapping_add)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_add_and_take_and_the_sum_is_exact() {
        let counters = std::sync::Arc::new(ShardedCounters::<2>::default());
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let counters = counters.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        counters.add(0, 3);
                    }
                    // Some threads take more than they added themselves.
                    if t % 2 == 0 {
                        counters.sub(1, 5);
                    } else {
                        counters.add(1, 5);
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(counters.get(0), 8 * 3000);
        assert_eq!(counters.get(1), 0);
    }
}
