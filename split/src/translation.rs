//! What a walk of an MMU's tree finds, shared by the TDP and shadow MMUs:
//! a translation, the outcome of a software access, and leaf counts.

use crate::addr::Hpa;
use crate::ept::{Entry, Level};

/// Leaf counts, as `KVM_GET_STATS` reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageStats {
    /// 4K leaves.
    pub pages_4k: u64,
    /// 2M leaves.
    pub pages_2m: u64,
    /// 1G leaves.
    pub pages_1g: u64,
}

/// The slot of `level`'s leaf count in a per-level array: 0 for 4K, 1 for
/// 2M, 2 for 1G (both MMUs keep their counts this way).
pub(crate) fn stat_index(level: Level) -> usize {
    usize::from(level.get() - 1)
}

/// What a translation found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// The host physical address of the guest address.
    pub hpa: Hpa,
    /// The leaf's R/W/X bits.
    pub perms: u64,
    /// The leaf's memory type field.
    pub memtype: u8,
    /// The leaf's level.
    pub level: Level,
    /// The leaf itself.
    pub entry: Entry,
}

/// What a software vCPU access found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Served by the tree; the host physical address.
    Hit(Hpa),
    /// Needs a fault: not mapped, or a write to a write-protected leaf.
    Miss,
}
