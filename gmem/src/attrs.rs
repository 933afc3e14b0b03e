//! Shared/private attributes per 4 KiB page, kept as a map of private
//! ranges (so a 1 TiB file costs nothing until it is converted).

use std::collections::BTreeMap;

/// Who may access a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Attribute {
    /// Accessible by the host and the guest.
    Shared,
    /// The guest's only: the host view faults on it.
    Private,
}

/// Attributes of `pages` pages: disjoint, non-adjacent private ranges
/// `[start, end)` in page numbers; everything else is shared.
///
/// ```
/// use gmem::attrs::{AttrMap, Attribute};
///
/// let mut map = AttrMap::new(16, Attribute::Shared);
/// map.set(2, 6, Attribute::Private);
/// map.set(4, 5, Attribute::Shared);
/// assert_eq!(
///     map.runs(0, 8),
///     vec![
///         (0, 2, Attribute::Shared),
///         (2, 4, Attribute::Private),
///         (4, 5, Attribute::Shared),
///         (5, 6, Attribute::Private),
///         (6, 8, Attribute::Shared),
///     ]
/// );
/// assert_eq!(map.private_pages(), 3);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AttrMap {
    private: BTreeMap<u64, u64>,
    pages: u64,
}

impl AttrMap {
    /// `pages` pages, all `initial`.
    pub fn new(pages: u64, initial: Attribute) -> Self {
        let mut private = BTreeMap::new();
        if initial == Attribute::Private && pages > 0 {
            private.insert(0, pages);
        }
        Self { private, pages }
    }

    /// Number of pages.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The attribute of `page`.
    pub fn get(&self, page: u64) -> Attribute {
        match self.private.range(..=page).next_back() {
            Some((_, &end)) if page < end => Attribute::Private,
            _ => Attribute::Shared,
        }
    }

    /// Sets `[start, end)` (clipped to the map) to `attr`.
    pub fn set(&mut self, start: u64, end: u64, attr: Attribute) {
        let end = end.min(self.pages);
        if start >= end {
            return;
        }
        // Ranges that overlap or touch [start, end).
        let touching: Vec<(u64, u64)> = self
            .private
            .range(..=end)
            .rev()
            .take_while(|&(_, &e)| e >= start)
            .map(|(&s, &e)| (s, e))
            .collect();
        let (mut merged_start, mut merged_end) = (start, end);
        for (s, e) in touching {
            self.private.remove(&s);
            match attr {
                Attribute::Private => {
                    merged_start = merged_start.min(s);
                    merged_end = merged_end.max(e);
                }
                Attribute::Shared => {
                    if s < start {
                        self.private.insert(s, start.min(e));
                    }
                    if e > end {
                        self.private.insert(end, e);
                    }
                }
            }
        }
        if attr == Attribute::Private {
            self.private.insert(merged_start, merged_end);
        }
    }

    /// Runs of equal attribute covering `[start, end)`, in order.
    pub fn runs(&self, start: u64, end: u64) -> Vec<(u64, u64, Attribute)> {
        let end = end.min(self.pages);
        let mut runs = Vec::new();
        let mut at = start;
        let first = self
            .private
            .range(..=start)
            .next_back()
            .map_or(start, |(&s, _)| s);
        for (&s, &e) in self.private.range(first..end) {
            if e <= at {
                continue;
            }
            if s > at {
                runs.push((at, s, Attribute::Shared));
            }
            let run_end = e.min(end);
            runs.push((s.max(at), run_end, Attribute::Private));
            at = run_end;
        }
        if at < end {
            runs.push((at, end, Attribute::Shared));
        }
        runs
    }

    /// The attribute of every page of `[start, end)`, when they agree.
    pub fn uniform(&self, start: u64, end: u64) -> Option<Attribute> {
        match self.runs(start, end).as_slice() {
            [(_, _, attr)] => Some(*attr),
            _ => None,
        }
    }

    /// Number of private pages.
    pub fn private_pages(&self) -> u64 {
        self.private.iter().map(|(s, e)| e - s).sum()
    }

    /// Number of private ranges (the map's size).
    pub fn ranges(&self) -> usize {
        self.private.len()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn agrees_with_a_byte_per_page(
            ops in prop::collection::vec((0u64..64, 0u64..64, any::<bool>()), 0..40),
            initial in any::<bool>(),
        ) {
            let to_attr = |p: bool| if p { Attribute::Private } else { Attribute::Shared };
            let mut map = AttrMap::new(64, to_attr(initial));
            let mut model = [to_attr(initial); 64];
            for (a, b, private) in ops {
                let (start, end) = (a.min(b), a.max(b));
                map.set(start, end, to_attr(private));
                model[start as usize..end as usize].fill(to_attr(private));
                for page in 0..64u64 {
                    prop_assert_eq!(map.get(page), model[page as usize]);
                }
                // Runs tile the range, alternate, and agree with the model.
                let runs = map.runs(5, 60);
                let mut at = 5;
                for window in runs.windows(2) {
                    prop_assert_ne!(window[0].2, window[1].2);
                }
                for (s, e, attr) in runs {
                    prop_assert_eq!(s, at);
                    for page in s..e {
                        prop_assert_eq!(model[page as usize], attr);
                    }
                    at = e;
                }
                prop_assert_eq!(at, 60);
                let private = model.iter().filter(|&&a| a == Attribute::Private).count();
                prop_assert_eq!(map.private_pages(), private as u64);
                // Ranges never touch: the map is minimal.
                let ranges: Vec<_> = map.private.iter().collect();
                for pair in ranges.windows(2) {
                    prop_assert!(pair[0].1 < pair[1].0);
                }
            }
        }
    }
}
