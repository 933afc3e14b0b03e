//! The guest's own EPT, as the shadow MMU reads it.
//!
//! In nested virtualization the L1 hypervisor builds an EPT for its L2
//! guest in L1 memory. [`GuestTables`] is how the shadow MMU reads that
//! tree; [`GuestEpt`] is an in-memory tree with the same layout, used by
//! tests, benchmarks and the software accelerator.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Mutex;

use crate::ept::{ADDR_MASK, Entry, EptError, Level, MemType, RWX};

/// Errors of building a [`GuestEpt`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GuestEptError {
    /// The frames set aside for guest tables are used up.
    #[error("no guest frame left for a new table (range {start:#x}..{end:#x} used up)")]
    OutOfTableFrames {
        /// First frame of the range.
        start: u64,
        /// One past the last frame.
        end: u64,
    },
    /// The nested frame or the L1 frame is not aligned to the leaf size.
    #[error("nested gfn {ngfn:#x} -> gfn {gfn:#x} is not aligned to a {level:?} leaf")]
    Misaligned {
        /// The nested (L2) guest frame.
        ngfn: u64,
        /// The L1 guest frame.
        gfn: u64,
        /// The leaf level asked for.
        level: Level,
    },
    /// A leaf level that EPT does not have, or a depth other than 4 or 5.
    #[error("invalid guest EPT shape: {0}")]
    Shape(&'static str),
    /// The address does not fit the tree's depth.
    #[error("nested gfn {ngfn:#x} is beyond a {levels}-level tree")]
    TooWide {
        /// The nested guest frame.
        ngfn: u64,
        /// The depth.
        levels: u8,
    },
    /// The leaf could not be encoded.
    #[error(transparent)]
    Entry(#[from] EptError),
    /// Nothing maps the nested frame at the level asked for.
    #[error("nested gfn {ngfn:#x}: no table entry at level {level:?}")]
    NotMapped {
        /// The nested guest frame.
        ngfn: u64,
        /// The level asked for.
        level: Level,
    },
    /// A huge leaf already covers the place where a table is needed.
    #[error("nested gfn {ngfn:#x}: a {level:?} leaf is in the way")]
    LeafInTheWay {
        /// The nested guest frame.
        ngfn: u64,
        /// The level of the leaf.
        level: Level,
    },
}

/// Read access to a guest's EPT tree.
pub trait GuestTables: Send + Sync {
    /// The guest frame of the root table.
    fn root_gfn(&self) -> u64;

    /// The depth of the tree: 4 or 5.
    fn levels(&self) -> u8;

    /// Entry `index` of the guest table at guest frame `table_gfn`; a frame
    /// that holds no table reads as non-present entries.
    fn read_entry(&self, table_gfn: u64, index: usize) -> Entry;
}

/// A guest EPT held in host memory, with tables at guest frames taken in
/// order from a range the caller sets aside.
///
/// ```
/// use split::guest::{GuestEpt, GuestTables};
/// use split::Level;
///
/// let guest = GuestEpt::new(4, 0x100..0x200)?;
/// // L2 frame 0x10 -> L1 frame 0x5010, read-write.
/// let written = guest.map(0x10, 0x5010, Level::L4K, 0b011)?;
/// assert_eq!(written.len(), 4); // root and three new tables
/// let leaf_table = *written.last().unwrap();
/// assert_eq!(guest.read_entry(leaf_table, 0x10).addr(Level::L4K), 0x5010 << 12);
/// # Ok::<(), split::guest::GuestEptError>(())
/// ```
#[derive(Debug)]
pub struct GuestEpt {
    levels: u8,
    root_gfn: u64,
    frames: Range<u64>,
    state: Mutex<GuestState>,
}

#[derive(Debug)]
struct GuestState {
    tables: HashMap<u64, Box<[u64; 512]>>,
    next_frame: u64,
}

impl GuestEpt {
    /// An empty tree of `levels` levels whose tables live at frames of
    /// `table_frames`; the first frame holds the root.
    pub fn new(levels: u8, table_frames: Range<u64>) -> Result<Self, GuestEptError> {
        if !(4..=5).contains(&levels) {
            return Err(GuestEptError::Shape("depth must be 4 or 5"));
        }
        if table_frames.is_empty() {
            return Err(GuestEptError::OutOfTableFrames {
                start: table_frames.start,
                end: table_frames.end,
            });
        }
        let root_gfn = table_frames.start;
        let mut tables = HashMap::new();
        tables.insert(root_gfn, Box::new([0; 512]));
        Ok(Self {
            levels,
            root_gfn,
            state: Mutex::new(GuestState {
                tables,
                next_frame: root_gfn + 1,
            }),
            frames: table_frames,
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, GuestState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn top(&self) -> Level {
        Level::new(self.levels).expect("checked at construction")
    }

    /// Maps nested frame `ngfn` to L1 frame `gfn` with a leaf at `level`
    /// and permissions `perms` (R/W/X bits), creating tables on the way.
    /// Returns the frames of the guest tables that were written, root first:
    /// the writes a shadow MMU must hear about.
    pub fn map(
        &self,
        ngfn: u64,
        gfn: u64,
        level: Level,
        perms: u64,
    ) -> Result<Vec<u64>, GuestEptError> {
        if !level.can_be_leaf() {
            return Err(GuestEptError::Shape("leaves are 4K, 2M or 1G"));
        }
        let pages = level.entry_pages();
        if !ngfn.is_multiple_of(pages) || !gfn.is_multiple_of(pages) {
            return Err(GuestEptError::Misaligned { ngfn, gfn, level });
        }
        self.check_width(ngfn)?;
        let mut state = self.state();
        let mut written = Vec::new();
        let mut table = self.root_gfn;
        let mut at = self.top();
        while at > level {
            let index = at.index(ngfn);
            let entry = Entry::from_bits(state.tables[&table][index]);
            let below = at.below().expect("above the leaf level");
            if entry.is_leaf(at) {
                return Err(GuestEptError::LeafInTheWay { ngfn, level: at });
            }
            if entry.is_present() {
                table = entry.addr(at) >> 12;
            } else {
                if state.next_frame >= self.frames.end {
                    return Err(GuestEptError::OutOfTableFrames {
                        start: self.frames.start,
                        end: self.frames.end,
                    });
                }
                let new = state.next_frame;
                state.next_frame += 1;
                state.tables.insert(new, Box::new([0; 512]));
                state.tables.get_mut(&table).expect("linked")[index] =
                    Entry::table(new << 12).bits();
                written.push(table);
                table = new;
            }
            at = below;
        }
        let leaf = Entry::leaf(level, gfn << 12, perms & RWX, MemType::Wb)?;
        state.tables.get_mut(&table).expect("linked")[level.index(ngfn)] = leaf.bits();
        written.push(table);
        Ok(written)
    }

    /// Removes the leaf that maps `ngfn`; returns the frame of the table
    /// written, or `None` when nothing mapped it.
    pub fn unmap(&self, ngfn: u64) -> Option<u64> {
        let mut state = self.state();
        let mut table = self.root_gfn;
        let mut at = self.top();
        loop {
            let index = at.index(ngfn);
            let entry = Entry::from_bits(state.tables.get(&table)?[index]);
            if !entry.is_present() {
                return None;
            }
            if entry.is_leaf(at) {
                state.tables.get_mut(&table).expect("present")[index] = 0;
                return Some(table);
            }
            table = entry.addr(at) >> 12;
            at = at.below()?;
        }
    }

    /// Sets the R/W/X bits of the non-leaf entry at `level` on the walk to
    /// `ngfn` to `perms`, as a guest hypervisor narrowing a whole range
    /// does (the other bits, the table address, stay). Returns the frame of
    /// the table written. Any `perms` is written as is, a misconfiguration
    /// included: the walker, not the writer, judges entries.
    pub fn set_table_perms(
        &self,
        ngfn: u64,
        level: Level,
        perms: u64,
    ) -> Result<u64, GuestEptError> {
        self.check_width(ngfn)?;
        let mut state = self.state();
        let mut table = self.root_gfn;
        let mut at = self.top();
        loop {
            let index = at.index(ngfn);
            let entry = Entry::from_bits(state.tables[&table][index]);
            if !entry.is_present() || entry.is_leaf(at) {
                return Err(GuestEptError::NotMapped { ngfn, level });
            }
            if at == level {
                let bits = (entry.bits() & !RWX) | (perms & RWX);
                state.tables.get_mut(&table).expect("linked")[index] = bits;
                return Ok(table);
            }
            table = (entry.bits() & ADDR_MASK) >> 12;
            at = at.below().ok_or(GuestEptError::NotMapped { ngfn, level })?;
        }
    }

    /// Number of guest tables, the root included.
    pub fn tables(&self) -> usize {
        self.state().tables.len()
    }

    fn check_width(&self, ngfn: u64) -> Result<(), GuestEptError> {
        if ngfn >> (self.top().shift() + 9 - 12) != 0 {
            return Err(GuestEptError::TooWide {
                ngfn,
                levels: self.levels,
            });
        }
        Ok(())
    }
}

impl GuestTables for GuestEpt {
    fn root_gfn(&self) -> u64 {
        self.root_gfn
    }

    fn levels(&self) -> u8 {
        self.levels
    }

    fn read_entry(&self, table_gfn: u64, index: usize) -> Entry {
        Entry::from_bits(
            self.state()
                .tables
                .get(&table_gfn)
                .map_or(0, |table| table[index]),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_builds_tables_and_reports_written_frames() {
        let guest = GuestEpt::new(4, 0x10..0x20).unwrap();
        let first = guest.map(0, 0x200, Level::L2M, RWX).unwrap();
        assert_eq!(first.len(), 3, "root, PDPT and PD are written");
        let second = guest.map(0x200, 0x400, Level::L2M, RWX).unwrap();
        assert_eq!(second, vec![*first.last().unwrap()], "only the PD");
        assert_eq!(guest.tables(), 3);
        assert_eq!(guest.unmap(0x200), Some(second[0]));
        assert_eq!(guest.unmap(0x200), None);
    }

    #[test]
    fn bad_requests_are_refused() {
        let guest = GuestEpt::new(4, 0x10..0x12).unwrap();
        assert!(matches!(
            guest.map(1, 0x200, Level::L2M, RWX),
            Err(GuestEptError::Misaligned { .. })
        ));
        assert!(matches!(
            guest.map(0, 0, Level::L4K, RWX),
            Err(GuestEptError::OutOfTableFrames { .. })
        ));
        assert!(matches!(
            guest.map(1 << 36, 0, Level::L4K, RWX),
            Err(GuestEptError::TooWide { .. })
        ));
        assert!(GuestEpt::new(3, 0..1).is_err());
        let guest = GuestEpt::new(4, 0x10..0x20).unwrap();
        guest.map(0, 0, Level::L1G, RWX).unwrap();
        assert!(matches!(
            guest.map(0x10, 0, Level::L4K, RWX),
            Err(GuestEptError::LeafInTheWay { .. })
        ));
    }
}
