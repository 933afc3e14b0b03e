//! The page sizes of x86-64, in bytes: the one home of these numbers for
//! every mmukit crate.

/// A base page.
pub const PAGE_4K: u64 = 4 << 10;
/// A huge page mapped by a page-directory entry (and a transparent huge
/// page, and a 2 MiB HugeTLB page, and a piece of a split 1 GiB page).
pub const PAGE_2M: u64 = 2 << 20;
/// A huge page mapped by a page-directory-pointer entry (a 1 GiB HugeTLB
/// page).
pub const PAGE_1G: u64 = 1 << 30;
