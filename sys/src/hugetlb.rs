//! The HugeTLB pools, read from sysfs, and the one way mmukit tells a user
//! to reserve their pages.

use std::path::Path;

use crate::host::Capability;

/// One HugeTLB pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HugetlbPool {
    /// The pool's directory name, such as `hugepages-2048kB`.
    pub name: String,
    /// The page size in bytes.
    pub page_size: u64,
    /// Pages in the pool.
    pub total: u64,
    /// Free pages not promised to a reservation.
    pub available: u64,
}

/// The sysfs name of the pool of `page_size`-byte pages.
pub fn pool_name(page_size: u64) -> String {
    format!("hugepages-{}kB", page_size >> 10)
}

impl HugetlbPool {
    /// The pool of `page_size` bytes, read from sysfs; `None` where the
    /// kernel has no such pool, or where [`crate::host::HIDE_ENV`] hides it.
    pub fn read(page_size: u64) -> Option<Self> {
        let capability = Capability::hugetlb_of(page_size)?;
        if capability.is_hidden() {
            return None;
        }
        let name = pool_name(page_size);
        let dir = Path::new("/sys/kernel/mm/hugepages").join(&name);
        let read = |file: &str| -> Option<u64> {
            std::fs::read_to_string(dir.join(file))
                .ok()?
                .trim()
                .parse()
                .ok()
        };
        let total = read("nr_hugepages")?;
        let free = read("free_hugepages")?;
        let reserved = read("resv_hugepages").unwrap_or(0);
        Some(Self {
            name,
            page_size,
            total,
            available: free.saturating_sub(reserved),
        })
    }
}

/// How to reserve pages in the pool named `pool` (the one message every
/// mmukit crate gives).
///
/// ```
/// let hint = mmukit_sys::hugetlb::reserve_hint("hugepages-2048kB");
/// assert!(hint.contains("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"));
/// ```
pub fn reserve_hint(pool: &str) -> String {
    format!("reserve more with `echo N > /sys/kernel/mm/hugepages/{pool}/nr_hugepages` (as root)")
}
