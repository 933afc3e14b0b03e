//! Reverse maps and parent lists: lists of entry addresses, one address
//! inline or chains of 14-entry descriptors from an object cache.

use super::*;

/// A descriptor of an rmap or parent list: up to [`PTE_LIST_EXT`] entry
/// addresses and the next descriptor.
pub struct PteListDesc {
    pub(super) sptes: [u64; PTE_LIST_EXT],
    pub(super) count: u8,
    pub(super) more: Option<SlabBox<PteListDesc>>,
}

impl Default for PteListDesc {
    fn default() -> Self {
        Self {
            sptes: [0; PTE_LIST_EXT],
            count: 0,
            more: None,
        }
    }
}

impl fmt::Debug for PteListDesc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PteListDesc")
            .field("count", &self.count)
            .field("more", &self.more.is_some())
            .finish()
    }
}

/// A list of entry addresses: empty, one address, or a descriptor chain
/// whose first descriptor is the only one that may be partly full.
#[derive(Debug, Default)]
pub(super) enum PteList {
    #[default]
    Empty,
    One(u64),
    Many(SlabBox<PteListDesc>),
}

impl PteList {
    /// Adds `spte`. The empty case, which every split child and most faults
    /// meet, is inlined; the rest takes descriptors from `descs`.
    #[inline]
    pub(super) fn add(
        &mut self,
        spte: u64,
        descs: &mut ObjectCache<PteListDesc>,
    ) -> Result<(), CacheError> {
        if let Self::Empty = self {
            *self = Self::One(spte);
            return Ok(());
        }
        self.add_to_list(spte, descs)
    }

    #[inline(never)]
    fn add_to_list(
        &mut self,
        spte: u64,
        descs: &mut ObjectCache<PteListDesc>,
    ) -> Result<(), CacheError> {
        match self {
            Self::Empty => *self = Self::One(spte),
            Self::One(first) => {
                let first = *first;
                let mut desc = descs.alloc()?;
                *desc = PteListDesc::default();
                desc.sptes[0] = first;
                desc.sptes[1] = spte;
                desc.count = 2;
                *self = Self::Many(desc);
            }
            Self::Many(head) if usize::from(head.count) < PTE_LIST_EXT => {
                let at = usize::from(head.count);
                head.sptes[at] = spte;
                head.count += 1;
            }
            Self::Many(_) => {
                let mut desc = descs.alloc()?;
                *desc = PteListDesc::default();
                desc.sptes[0] = spte;
                desc.count = 1;
                let Self::Many(old) = std::mem::take(self) else {
                    unreachable!("matched above")
                };
                desc.more = Some(old);
                *self = Self::Many(desc);
            }
        }
        Ok(())
    }

    /// Removes `spte`; the hole is filled with the last entry of the first
    /// descriptor, which is dropped when it empties.
    pub(super) fn remove(&mut self, spte: u64) -> bool {
        match self {
            Self::Empty => false,
            Self::One(only) => {
                let found = *only == spte;
                if found {
                    *self = Self::Empty;
                }
                found
            }
            Self::Many(head) => {
                let last_index = usize::from(head.count) - 1;
                let last = head.sptes[last_index];
                let mut found = false;
                let mut desc: &mut PteListDesc = head;
                loop {
                    let count = usize::from(desc.count);
                    if let Some(i) = desc.sptes[..count].iter().position(|&s| s == spte) {
                        desc.sptes[i] = last;
                        found = true;
                        break;
                    }
                    match desc.more.as_deref_mut() {
                        Some(next) => desc = next,
                        None => break,
                    }
                }
                if !found {
                    return false;
                }
                head.count -= 1;
                if head.count == 0 {
                    *self = match head.more.take() {
                        Some(next) => Self::Many(next),
                        None => Self::Empty,
                    };
                }
                true
            }
        }
    }

    pub(super) fn first(&self) -> Option<u64> {
        match self {
            Self::Empty => None,
            Self::One(only) => Some(*only),
            Self::Many(head) => Some(head.sptes[0]),
        }
    }

    pub(super) fn for_each(&self, mut visit: impl FnMut(u64)) {
        match self {
            Self::Empty => {}
            Self::One(only) => visit(*only),
            Self::Many(head) => {
                let mut desc: Option<&PteListDesc> = Some(head);
                while let Some(d) = desc {
                    d.sptes[..usize::from(d.count)]
                        .iter()
                        .for_each(|&s| visit(s));
                    desc = d.more.as_deref();
                }
            }
        }
    }

    pub(super) fn len(&self) -> usize {
        let mut n = 0;
        self.for_each(|_| n += 1);
        n
    }

    pub(super) fn descriptors(&self) -> usize {
        let mut n = 0;
        if let Self::Many(head) = self {
            let mut desc: Option<&PteListDesc> = Some(head);
            while let Some(d) = desc {
                n += 1;
                desc = d.more.as_deref();
            }
        }
        n
    }
}

/// Rmaps of one memslot: per leaf level, one list per frame at that level.
pub(super) struct SlotRmaps {
    pub(super) slot: Arc<Memslot>,
    pub(super) levels: [Vec<PteList>; 3],
}

impl SlotRmaps {
    pub(super) fn new(slot: Arc<Memslot>) -> Self {
        let levels = [0u32, 9, 18].map(|shift| {
            let count = ((slot.end_gfn().0 - 1) >> shift) - (slot.base_gfn().0 >> shift) + 1;
            (0..count).map(|_| PteList::Empty).collect()
        });
        Self { slot, levels }
    }

    pub(super) fn index(&self, level: Level, gfn: u64) -> usize {
        let shift = 9 * u32::from(level.get() - 1);
        ((gfn >> shift) - (self.slot.base_gfn().0 >> shift)) as usize
    }

    pub(super) fn head(&mut self, level: Level, gfn: u64) -> &mut PteList {
        let index = self.index(level, gfn);
        &mut self.levels[usize::from(level.get() - 1)][index]
    }
}
