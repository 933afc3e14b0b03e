//! Memory attributes of a VM (`KVM_SET_MEMORY_ATTRIBUTES`): each guest
//! frame is shared or private, and each huge-page range that holds both
//! kinds is "mixed", so that no huge mapping spans both (the kernel's
//! `KVM_LPAGE_MIXED_FLAG` in `lpage_info`).
//!
//! ```
//! use split::attributes::{MemoryAttribute, MemoryAttributes};
//! use split::{Gfn, Level};
//!
//! let mut attrs = MemoryAttributes::new(MemoryAttribute::Shared);
//! attrs.set(Gfn(0x200), Gfn(0x201), MemoryAttribute::Private);
//! assert_eq!(attrs.get(Gfn(0x200)), MemoryAttribute::Private);
//! // The 2 MiB range of gfn 0x200 holds both kinds: at most 4K leaves.
//! assert_eq!(attrs.max_level(Gfn(0x3ff)), Level::L4K);
//! // The next 2 MiB range is uniform, but its 1 GiB range is mixed.
//! assert_eq!(attrs.max_level(Gfn(0x400)), Level::L2M);
//! ```

use std::collections::{BTreeMap, BTreeSet};

use crate::addr::Gfn;
use crate::ept::Level;

/// What a guest frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemoryAttribute {
    /// Shared with the host: mapped from the memslot's host memory.
    Shared,
    /// Private to the guest: mapped from the slot's private memory (the
    /// guest memory file).
    Private,
}

impl MemoryAttribute {
    /// Private when `private`, else shared: the kind of an access as a
    /// fault flag (`PFERR_PRIVATE_ACCESS`) gives it.
    pub fn of_access(private: bool) -> Self {
        if private { Self::Private } else { Self::Shared }
    }

    /// `KVM_MEMORY_ATTRIBUTE_PRIVATE` (bit 3) when private, 0 when shared.
    pub fn kvm_bits(self) -> u64 {
        match self {
            Self::Shared => 0,
            Self::Private => 1 << 3,
        }
    }
}

impl std::fmt::Display for MemoryAttribute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Shared => "shared",
            Self::Private => "private",
        })
    }
}

/// The attributes of every guest frame of a VM, and which huge-page ranges
/// are mixed.
#[derive(Clone, Debug)]
pub struct MemoryAttributes {
    /// Frames not covered by a run have this attribute.
    default: MemoryAttribute,
    /// Runs of the other attribute: start -> end, disjoint, not adjacent.
    runs: BTreeMap<u64, u64>,
    /// Mixed 2 MiB ranges (`gfn >> 9`) and mixed 1 GiB ranges (`gfn >> 18`).
    mixed: [BTreeSet<u64>; 2],
}

impl MemoryAttributes {
    /// Every frame `default`: shared for a VM whose memory starts shared,
    /// private for a TD whose memory starts private.
    pub fn new(default: MemoryAttribute) -> Self {
        Self {
            default,
            runs: BTreeMap::new(),
            mixed: Default::default(),
        }
    }

    fn other(&self) -> MemoryAttribute {
        match self.default {
            MemoryAttribute::Shared => MemoryAttribute::Private,
            MemoryAttribute::Private => MemoryAttribute::Shared,
        }
    }

    /// The attribute of `gfn`.
    pub fn get(&self, gfn: Gfn) -> MemoryAttribute {
        match self.runs.range(..=gfn.0).next_back() {
            Some((_, &end)) if gfn.0 < end => self.other(),
            _ => self.default,
        }
    }

    /// The attribute shared by every frame of `[start, end)`, or `None`
    /// when the range holds both.
    pub fn uniform(&self, start: Gfn, end: Gfn) -> Option<MemoryAttribute> {
        let first = self.get(start);
        let has_boundary = self.runs.range(start.0 + 1..end.0).next().is_some()
            || self
                .runs
                .range(..end.0)
                .next_back()
                .is_some_and(|(&s, &e)| s <= start.0 && e > start.0 && e < end.0);
        (!has_boundary).then_some(first)
    }

    /// Runs of one attribute over `[start, end)`: (start, end, attribute).
    pub fn runs(&self, start: Gfn, end: Gfn) -> Vec<(Gfn, Gfn, MemoryAttribute)> {
        let mut out = Vec::new();
        let mut at = start.0;
        while at < end.0 {
            let attr = self.get(Gfn(at));
            let next = match attr == self.default {
                // Up to the next run of the other attribute.
                true => self.runs.range(at + 1..).next().map_or(end.0, |(&s, _)| s),
                // To the end of the run `at` is in.
                false => *self
                    .runs
                    .range(..=at)
                    .next_back()
                    .map(|(_, e)| e)
                    .expect("inside a run"),
            }
            .min(end.0);
            out.push((Gfn(at), Gfn(next), attr));
            at = next;
        }
        out
    }

    /// Sets `[start, end)` to `attr` and recomputes the mixed state of the
    /// huge-page ranges it touches. Returns how many frames changed.
    pub fn set(&mut self, start: Gfn, end: Gfn, attr: MemoryAttribute) -> u64 {
        if start >= end {
            return 0;
        }
        let changed = self
            .runs(start, end)
            .iter()
            .filter(|&&(_, _, a)| a != attr)
            .map(|&(s, e, _)| e - s)
            .sum();
        let (s, e) = (start.0, end.0);
        // Cut every run at the range's edges and drop what lies inside.
        let overlapping: Vec<(u64, u64)> = self
            .runs
            .range(..e)
            .rev()
            .take_while(|&(_, &re)| re > s)
            .map(|(&rs, &re)| (rs, re))
            .collect();
        for (rs, re) in overlapping {
            self.runs.remove(&rs);
            if rs < s {
                self.runs.insert(rs, s);
            }
            if re > e {
                self.runs.insert(e, re);
            }
        }
        if attr != self.default {
            let mut new_start = s;
            let mut new_end = e;
            // Merge with a run that ends where this one starts, or starts
            // where it ends.
            if let Some((&ps, &pe)) = self.runs.range(..s).next_back()
                && pe == s
            {
                self.runs.remove(&ps);
                new_start = ps;
            }
            if let Some(&ne) = self.runs.get(&e) {
                self.runs.remove(&e);
                new_end = ne;
            }
            self.runs.insert(new_start, new_end);
        }
        for (index, level) in [(0, Level::L2M), (1, Level::L1G)] {
            let pages = level.entry_pages();
            for huge in s / pages..e.div_ceil(pages) {
                let mixed = self
                    .uniform(Gfn(huge * pages), Gfn((huge + 1) * pages))
                    .is_none();
                if mixed {
                    self.mixed[index].insert(huge);
                } else {
                    self.mixed[index].remove(&huge);
                }
            }
        }
        changed
    }

    /// Whether the huge-page range of `level` holding `gfn` is mixed.
    pub fn is_mixed(&self, gfn: Gfn, level: Level) -> bool {
        match level {
            Level::L2M => self.mixed[0].contains(&(gfn.0 >> 9)),
            Level::L1G => self.mixed[1].contains(&(gfn.0 >> 18)),
            _ => false,
        }
    }

    /// The largest leaf that may map `gfn` as far as attributes go: 1G
    /// unless its 1 GiB range is mixed, then 2M unless its 2 MiB range is.
    pub fn max_level(&self, gfn: Gfn) -> Level {
        if !self.is_mixed(gfn, Level::L1G) {
            Level::L1G
        } else if !self.is_mixed(gfn, Level::L2M) {
            Level::L2M
        } else {
            Level::L4K
        }
    }

    /// Frames of the non-default attribute.
    pub fn count_other(&self) -> u64 {
        self.runs.iter().map(|(s, e)| e - s).sum()
    }

    /// Mixed ranges: (2 MiB, 1 GiB).
    pub fn mixed_ranges(&self) -> (usize, usize) {
        (self.mixed[0].len(), self.mixed[1].len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame-by-frame model to check the run map against.
    fn model_get(model: &[MemoryAttribute], gfn: u64) -> MemoryAttribute {
        model[gfn as usize]
    }

    #[test]
    fn runs_agree_with_a_frame_by_frame_model() {
        use MemoryAttribute::{Private, Shared};
        let size = 3 * 512u64 + 17;
        let mut attrs = MemoryAttributes::new(Shared);
        let mut model = vec![Shared; size as usize];
        // A deterministic walk over overlapping, adjacent and nested ranges.
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..400 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let start = seed % size;
            let len = (seed >> 20) % 700 + 1;
            let end = (start + len).min(size);
            let attr = if seed & 1 == 0 { Private } else { Shared };
            let expect_changed = (start..end)
                .filter(|&g| model_get(&model, g) != attr)
                .count() as u64;
            assert_eq!(attrs.set(Gfn(start), Gfn(end), attr), expect_changed);
            for g in start..end {
                model[g as usize] = attr;
            }
            for g in 0..size {
                assert_eq!(attrs.get(Gfn(g)), model[g as usize], "gfn {g:#x}");
            }
            for huge in 0..size / 512 {
                let range = &model[(huge * 512) as usize..((huge + 1) * 512) as usize];
                let mixed = range.iter().any(|&a| a != range[0]);
                assert_eq!(attrs.is_mixed(Gfn(huge * 512), Level::L2M), mixed);
            }
            // Runs are disjoint and never adjacent.
            let runs: Vec<_> = attrs.runs.iter().map(|(&s, &e)| (s, e)).collect();
            for pair in runs.windows(2) {
                assert!(pair[0].1 < pair[1].0, "{runs:x?}");
            }
        }
    }

    #[test]
    fn uniform_and_runs_describe_a_range() {
        use MemoryAttribute::{Private, Shared};
        let mut attrs = MemoryAttributes::new(Private);
        attrs.set(Gfn(10), Gfn(20), Shared);
        assert_eq!(attrs.uniform(Gfn(0), Gfn(10)), Some(Private));
        assert_eq!(attrs.uniform(Gfn(10), Gfn(20)), Some(Shared));
        assert_eq!(attrs.uniform(Gfn(12), Gfn(15)), Some(Shared));
        assert_eq!(attrs.uniform(Gfn(9), Gfn(11)), None);
        assert_eq!(attrs.uniform(Gfn(19), Gfn(21)), None);
        assert_eq!(
            attrs.runs(Gfn(5), Gfn(25)),
            vec![
                (Gfn(5), Gfn(10), Private),
                (Gfn(10), Gfn(20), Shared),
                (Gfn(20), Gfn(25), Private)
            ]
        );
        assert_eq!(attrs.count_other(), 10);
        assert_eq!(attrs.set(Gfn(0), Gfn(30), Private), 10);
        assert_eq!(attrs.count_other(), 0);
        assert_eq!(attrs.mixed_ranges(), (0, 0));
    }
}
