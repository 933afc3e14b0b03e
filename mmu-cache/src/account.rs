//! Memory accounting: the `__GFP_ACCOUNT` idea for user space.
//!
//! An [`Account`] is charged for every page and object a cache takes from its
//! allocator and uncharged when the memory goes back. With a limit, a charge
//! that would pass it is refused, so a topup fails cleanly instead of
//! growing without bound.

use std::sync::atomic::{AtomicU64, Ordering};

/// Errors of accounting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccountError {
    /// The charge would pass the account's limit.
    #[error("account {account}: {asked} bytes asked, {left} bytes left under the limit of {limit}")]
    LimitExceeded {
        /// Name of the account.
        account: String,
        /// Bytes asked for.
        asked: u64,
        /// Bytes still available under the limit.
        left: u64,
        /// The limit in bytes.
        limit: u64,
    },
}

/// A shared, thread-safe byte counter with an optional limit.
///
/// ```
/// use mmu_cache::Account;
///
/// let account = Account::with_limit("vm0", 8192);
/// account.try_charge(4096)?;
/// assert!(account.try_charge(8192).is_err());
/// account.uncharge(4096);
/// assert_eq!(account.charged(), 0);
/// assert_eq!(account.peak(), 4096);
/// # Ok::<(), mmu_cache::AccountError>(())
/// ```
#[derive(Debug)]
pub struct Account {
    name: String,
    limit: Option<u64>,
    charged: AtomicU64,
    peak: AtomicU64,
}

impl Account {
    /// An account without a limit.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            limit: None,
            charged: AtomicU64::new(0),
            peak: AtomicU64::new(0),
        }
    }

    /// An account that refuses charges past `limit` bytes.
    pub fn with_limit(name: impl Into<String>, limit: u64) -> Self {
        Self {
            limit: Some(limit),
            ..Self::new(name)
        }
    }

    /// The account's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The limit in bytes, if any.
    pub fn limit(&self) -> Option<u64> {
        self.limit
    }

    /// Bytes charged now.
    pub fn charged(&self) -> u64 {
        self.charged.load(Ordering::Relaxed)
    }

    /// The most bytes ever charged at once.
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    /// Bytes that can still be charged (`u64::MAX` without a limit).
    pub fn remaining(&self) -> u64 {
        self.limit
            .map_or(u64::MAX, |limit| limit.saturating_sub(self.charged()))
    }

    /// Charges `bytes`, or refuses without charging anything if that would
    /// pass the limit.
    pub fn try_charge(&self, bytes: u64) -> Result<(), AccountError> {
        let mut current = self.charged.load(Ordering::Relaxed);
        loop {
            let next = current.saturating_add(bytes);
            if let Some(limit) = self.limit
                && next > limit
            {
                return Err(AccountError::LimitExceeded {
                    account: self.name.clone(),
                    asked: bytes,
                    left: limit.saturating_sub(current),
                    limit,
                });
            }
            match self.charged.compare_exchange_weak(
                current,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    self.peak.fetch_max(next, Ordering::Relaxed);
                    return Ok(());
                }
                Err(seen) => current = seen,
            }
        }
    }

    /// Returns `bytes` to the account.
    ///
    /// # Panics
    ///
    /// In debug builds, when more is uncharged than was charged.
    pub fn uncharge(&self, bytes: u64) {
        let before = self.charged.fetch_sub(bytes, Ordering::Relaxed);
        debug_assert!(
            before >= bytes,
            "account {}: uncharge of {bytes} with {before} charged",
            self.name
        );
    }
}
