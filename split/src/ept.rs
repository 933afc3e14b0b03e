//! EPT entries as typed 64-bit values.
//!
//! Layout (Intel SDM, "EPT paging-structure entries"): read, write, execute
//! in bits 2:0; memory type in 5:3 and ignore-PAT in 6 (leaves only); page
//! size in 7 (a leaf at the 2M and 1G levels); accessed 8; dirty 9; the
//! frame address in 51:12 (51:21 for a 2M leaf, 51:30 for a 1G leaf); and
//! suppress-#VE in 63. The non-present value used here has bit 63 set, so
//! that a table filled with it suppresses #VE.

use std::fmt;

/// Read access.
pub const READ: u64 = 1 << 0;
/// Write access.
pub const WRITE: u64 = 1 << 1;
/// Execute access.
pub const EXEC: u64 = 1 << 2;
/// The three permission bits.
pub const RWX: u64 = READ | WRITE | EXEC;
const MEMTYPE_SHIFT: u32 = 3;
const MEMTYPE_MASK: u64 = 0b111 << MEMTYPE_SHIFT;
/// Ignore PAT (leaves only).
pub const IGNORE_PAT: u64 = 1 << 6;
/// Page size: a leaf at the 2M or 1G level.
pub const PAGE_SIZE_BIT: u64 = 1 << 7;
/// Accessed.
pub const ACCESSED: u64 = 1 << 8;
/// Dirty.
pub const DIRTY: u64 = 1 << 9;
/// Suppress #VE.
pub const SUPPRESS_VE: u64 = 1 << 63;
/// The frame address bits of a 4K entry or a table pointer.
pub const ADDR_MASK: u64 = ((1 << 52) - 1) & !0xfff;
/// The value of a non-present entry: only suppress-#VE set.
pub const NON_PRESENT: u64 = SUPPRESS_VE;

/// Errors of EPT entries: EPT misconfigurations.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EptError {
    /// Write permission without read permission.
    #[error("{entry}: write without read is an EPT misconfiguration")]
    WriteWithoutRead {
        /// The entry.
        entry: Entry,
    },
    /// A leaf memory type of 2, 3 or 7 (reserved).
    #[error("{entry}: memory type {memtype} is reserved")]
    ReservedMemoryType {
        /// The entry.
        entry: Entry,
        /// The memory type field.
        memtype: u8,
    },
    /// Reserved bits are set for the entry's level and form.
    #[error("{entry}: reserved bits {bits:#x} set at level {level}")]
    ReservedBits {
        /// The entry.
        entry: Entry,
        /// The level it was validated at.
        level: Level,
        /// The offending bits.
        bits: u64,
    },
    /// A frame address that is not aligned to the leaf's size.
    #[error("frame {addr:#x} is not aligned for a {level} leaf")]
    MisalignedFrame {
        /// The address.
        addr: u64,
        /// The leaf level.
        level: Level,
    },
    /// A leaf asked for at a level that cannot hold one (PML4, PML5).
    #[error("level {level} cannot hold a leaf")]
    NoLeafAtLevel {
        /// The level.
        level: Level,
    },
    /// An execute-only entry (X set, R and W clear) on a CPU without
    /// execute-only EPT translations (IA32_VMX_EPT_VPID_CAP bit 0 clear).
    #[error("{entry}: execute-only entries are a misconfiguration on this CPU")]
    ExecuteOnlyUnsupported {
        /// The entry.
        entry: Entry,
    },
}

/// What the CPU supports, as far as the validity of EPT entries goes.
///
/// The SDM's EPT misconfiguration rules depend on two of them: whether
/// execute-only translations are supported (IA32_VMX_EPT_VPID_CAP bit 0),
/// and MAXPHYADDR (address bits 51:MAXPHYADDR are reserved).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EptCaps {
    /// Execute-only entries (bits 2:0 = 100b) are allowed.
    pub execute_only: bool,
    /// The physical-address width, 36 to 52.
    pub maxphyaddr: u8,
}

impl Default for EptCaps {
    /// A CPU with execute-only support and a 52-bit physical address width,
    /// the most permissive the SDM allows.
    fn default() -> Self {
        Self {
            execute_only: true,
            maxphyaddr: 52,
        }
    }
}

impl EptCaps {
    /// The address bits an entry may use: 51:12 cut at MAXPHYADDR.
    pub fn addr_mask(self) -> u64 {
        let width = u32::from(self.maxphyaddr.clamp(36, 52));
        ADDR_MASK & ((1u64 << width) - 1)
    }
}

/// A paging level: 1 holds 4K leaves, 2 holds 2M leaves or tables, 3 holds
/// 1G leaves or tables, 4 is the PML4 and 5 the PML5.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Level(u8);

impl Level {
    /// The 4K level.
    pub const L4K: Self = Self(1);
    /// The 2M level.
    pub const L2M: Self = Self(2);
    /// The 1G level.
    pub const L1G: Self = Self(3);
    /// The PML4 level.
    pub const PML4: Self = Self(4);
    /// The PML5 level.
    pub const PML5: Self = Self(5);

    /// The level numbered `n` (1 to 5).
    pub fn new(n: u8) -> Option<Self> {
        (1..=5).contains(&n).then_some(Self(n))
    }

    /// The level's number.
    pub fn get(self) -> u8 {
        self.0
    }

    /// Bytes one entry at this level maps: 4 KiB, 2 MiB, 1 GiB, 512 GiB, 256 TiB.
    pub fn entry_bytes(self) -> u64 {
        1 << self.shift()
    }

    /// The leaf level whose entries map pages of `bytes` (4 KiB, 2 MiB or
    /// 1 GiB), if one does.
    ///
    /// ```
    /// use split::Level;
    ///
    /// assert_eq!(Level::of_page_size(2 << 20), Some(Level::L2M));
    /// assert_eq!(Level::of_page_size(8192), None);
    /// ```
    pub fn of_page_size(bytes: u64) -> Option<Self> {
        [Self::L4K, Self::L2M, Self::L1G]
            .into_iter()
            .find(|level| level.entry_bytes() == bytes)
    }

    /// Guest frames one entry at this level maps.
    pub fn entry_pages(self) -> u64 {
        1 << (self.shift() - 12)
    }

    /// The address shift of this level's index: 12, 21, 30, 39, 48.
    pub fn shift(self) -> u32 {
        12 + 9 * (u32::from(self.0) - 1)
    }

    /// The index of `gfn` in a table at this level.
    pub fn index(self, gfn: u64) -> usize {
        ((gfn >> (self.shift() - 12)) & 511) as usize
    }

    /// Whether leaves may live at this level (4K, 2M, 1G).
    pub fn can_be_leaf(self) -> bool {
        self.0 <= 3
    }

    /// The level below, if any.
    pub fn below(self) -> Option<Self> {
        (self.0 > 1).then(|| Self(self.0 - 1))
    }

    /// The frame address mask of a leaf at this level.
    pub fn leaf_addr_mask(self) -> u64 {
        ADDR_MASK & !(self.entry_bytes() - 1)
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            1 => f.write_str("4K"),
            2 => f.write_str("2M"),
            3 => f.write_str("1G"),
            4 => f.write_str("PML4"),
            _ => f.write_str("PML5"),
        }
    }
}

/// The kind of a guest access, as an EPT violation's exit qualification
/// reports it (bits 2:0: read, write, instruction fetch).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AccessKind {
    /// A data read: needs R at every level of the walk.
    Read,
    /// A data write: needs W at every level of the walk.
    Write,
    /// An instruction fetch: needs X at every level of the walk (user-mode
    /// execute of mode-based execute control is not modelled).
    Fetch,
}

impl AccessKind {
    /// All three, in exit-qualification order.
    pub const ALL: [Self; 3] = [Self::Read, Self::Write, Self::Fetch];

    /// The permission bit the access needs in every entry of the walk.
    pub fn required_bit(self) -> u64 {
        match self {
            Self::Read => READ,
            Self::Write => WRITE,
            Self::Fetch => EXEC,
        }
    }

    /// Whether effective permissions `perms` (the AND of every level's R/W/X)
    /// allow this access.
    pub fn allowed_by(self, perms: u64) -> bool {
        perms & self.required_bit() != 0
    }

    /// `Write` for a write, `Read` otherwise.
    pub fn data(write: bool) -> Self {
        if write { Self::Write } else { Self::Read }
    }
}

impl fmt::Display for AccessKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Fetch => "fetch",
        })
    }
}

/// EPT memory types for leaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum MemType {
    /// Uncacheable.
    Uc = 0,
    /// Write combining.
    Wc = 1,
    /// Write through.
    Wt = 4,
    /// Write protected.
    Wp = 5,
    /// Write back.
    Wb = 6,
}

impl MemType {
    /// The memory type with field value `value`, if it is not reserved.
    pub fn from_bits(value: u8) -> Option<Self> {
        Some(match value {
            0 => Self::Uc,
            1 => Self::Wc,
            4 => Self::Wt,
            5 => Self::Wp,
            6 => Self::Wb,
            _ => return None,
        })
    }
}

/// One EPT entry.
///
/// ```
/// use split::ept::{Entry, Level, MemType, READ, WRITE};
///
/// let leaf = Entry::leaf(Level::L2M, 0x4020_0000, READ | WRITE, MemType::Wb)?;
/// leaf.validate(Level::L2M)?;
/// assert!(Entry::leaf(Level::L2M, 0x4020_1000, READ, MemType::Wb).is_err());
/// assert!(leaf.is_leaf(Level::L2M));
/// assert_eq!(leaf.addr(Level::L2M), 0x4020_0000);
/// assert!(Entry::from_bits(WRITE).validate(Level::L4K).is_err());
/// # Ok::<(), split::ept::EptError>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Entry(u64);

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Entry({:#018x})", self.0)
    }
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EPT entry {:#018x}", self.0)
    }
}

impl Entry {
    /// The non-present entry (suppress-#VE set).
    pub const NON_PRESENT: Self = Self(NON_PRESENT);

    /// The entry with these bits.
    pub const fn from_bits(bits: u64) -> Self {
        Self(bits)
    }

    /// The raw bits.
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// A leaf at `level` mapping the frame at `addr` (the page-size bit is set
    /// for 2M and 1G leaves).
    ///
    /// A level that cannot hold a leaf is [`EptError::NoLeafAtLevel`]; an
    /// address that is not aligned to the leaf's size, or that does not fit
    /// the 52 address bits of an entry, is [`EptError::MisalignedFrame`].
    pub fn leaf(level: Level, addr: u64, perms: u64, memtype: MemType) -> Result<Self, EptError> {
        if !level.can_be_leaf() {
            return Err(EptError::NoLeafAtLevel { level });
        }
        if addr & !level.leaf_addr_mask() != 0 {
            return Err(EptError::MisalignedFrame { addr, level });
        }
        let size = if level > Level::L4K { PAGE_SIZE_BIT } else { 0 };
        Ok(Self(
            addr | (perms & RWX) | ((memtype as u64) << MEMTYPE_SHIFT) | size,
        ))
    }

    /// A pointer to a next-level table at `addr`, with full permissions
    /// (leaves decide the effective ones).
    pub fn table(addr: u64) -> Self {
        Self((addr & ADDR_MASK) | RWX)
    }

    /// Whether any of read, write or execute is set.
    pub fn is_present(self) -> bool {
        self.0 & RWX != 0
    }

    /// Whether this is a leaf when found at `level`.
    pub fn is_leaf(self, level: Level) -> bool {
        self.is_present()
            && (level == Level::L4K || (level.can_be_leaf() && self.0 & PAGE_SIZE_BIT != 0))
    }

    /// Whether this is a huge (2M or 1G) leaf when found at `level`.
    pub fn is_huge_leaf(self, level: Level) -> bool {
        level > Level::L4K && self.is_leaf(level)
    }

    /// The permission bits.
    pub fn perms(self) -> u64 {
        self.0 & RWX
    }

    /// The memory type field (meaningful for leaves).
    pub fn memtype_bits(self) -> u8 {
        ((self.0 & MEMTYPE_MASK) >> MEMTYPE_SHIFT) as u8
    }

    /// The frame address, with the mask of a leaf at `level` (or of a table
    /// pointer when this is not a leaf there).
    pub fn addr(self, level: Level) -> u64 {
        if self.is_leaf(level) {
            self.0 & level.leaf_addr_mask()
        } else {
            self.0 & ADDR_MASK
        }
    }

    /// Whether `bit` is set.
    pub fn has(self, bit: u64) -> bool {
        self.0 & bit == bit
    }

    /// This entry with `bit` set.
    pub fn with(self, bit: u64) -> Self {
        Self(self.0 | bit)
    }

    /// This entry with `bit` cleared.
    pub fn without(self, bit: u64) -> Self {
        Self(self.0 & !bit)
    }

    /// The `index`th child of this huge leaf at `level`: every bit copied but
    /// the page-size bit (cleared only at 4K), and the frame advanced by
    /// `index` child pages.
    pub fn split_child(self, level: Level, index: usize) -> Self {
        let child_level = level.below().expect("a huge leaf is above 4K");
        let addr = self.addr(level) + index as u64 * child_level.entry_bytes();
        let mut bits = (self.0 & !ADDR_MASK) | addr;
        if child_level == Level::L4K {
            bits &= !PAGE_SIZE_BIT;
        }
        Self(bits)
    }

    /// Checks the entry as found at `level` on a CPU with every capability
    /// ([`EptCaps::default`]); a non-present entry is valid.
    pub fn validate(self, level: Level) -> Result<(), EptError> {
        self.validate_with(level, EptCaps::default())
    }

    /// Checks the entry as found at `level` on a CPU with `caps`, as the SDM
    /// decides EPT misconfigurations: write without read; execute-only
    /// without the capability; a reserved memory type; address bits at or
    /// above MAXPHYADDR; frame bits below a huge leaf's alignment; bits 7:3
    /// of a non-leaf entry. A non-present entry is valid.
    pub fn validate_with(self, level: Level, caps: EptCaps) -> Result<(), EptError> {
        if !self.is_present() {
            return Ok(());
        }
        if self.has(WRITE) && !self.has(READ) {
            return Err(EptError::WriteWithoutRead { entry: self });
        }
        if self.perms() == EXEC && !caps.execute_only {
            return Err(EptError::ExecuteOnlyUnsupported { entry: self });
        }
        let beyond_width = self.0 & ADDR_MASK & !caps.addr_mask();
        if beyond_width != 0 {
            return Err(EptError::ReservedBits {
                entry: self,
                level,
                bits: beyond_width,
            });
        }
        let leaf = self.is_leaf(level);
        let reserved = if leaf {
            let memtype = self.memtype_bits();
            if MemType::from_bits(memtype).is_none() {
                return Err(EptError::ReservedMemoryType {
                    entry: self,
                    memtype,
                });
            }
            // Frame bits below the leaf's alignment are reserved.
            self.0 & ADDR_MASK & !level.leaf_addr_mask()
        } else {
            // Non-leaf entries: memory type, ignore-PAT and (PML4E, PML5E) page size.
            let size = if level.can_be_leaf() {
                0
            } else {
                PAGE_SIZE_BIT
            };
            self.0 & (MEMTYPE_MASK | IGNORE_PAT | size)
        };
        if reserved != 0 {
            return Err(EptError::ReservedBits {
                entry: self,
                level,
                bits: reserved,
            });
        }
        Ok(())
    }
}

/// Writes a split's new table: `words[i] = first + i * step`, the children
/// of one huge leaf (`Entry::split_child(level, i)`, whose frame bits never
/// carry into the others, so child i is child 0 advanced by `i` child
/// pages). Written as an induction (one add per word), which the compiler
/// turns into vector adds and stores; a multiply by a step it cannot see
/// would not vectorize as well.
pub fn fill_split_children(words: &mut [u64], first: u64, step: u64) {
    let mut child = first;
    for word in words {
        *word = child;
        child = child.wrapping_add(step);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEVELS: [Level; 3] = [Level::L4K, Level::L2M, Level::L1G];
    const MEMTYPES: [MemType; 5] = [
        MemType::Uc,
        MemType::Wc,
        MemType::Wt,
        MemType::Wp,
        MemType::Wb,
    ];

    #[test]
    fn leaves_round_trip_for_every_flag_combination_and_level() {
        for level in LEVELS {
            let addr = 0x0001_2345_u64 << 30 & level.leaf_addr_mask();
            for perms in 0..8u64 {
                for memtype in MEMTYPES {
                    for extra in [
                        0,
                        IGNORE_PAT,
                        ACCESSED,
                        DIRTY,
                        ACCESSED | DIRTY,
                        SUPPRESS_VE,
                    ] {
                        let entry = Entry::from_bits(
                            Entry::leaf(level, addr, perms, memtype).unwrap().bits() | extra,
                        );
                        if perms == 0 {
                            assert!(!entry.is_present());
                            continue;
                        }
                        assert!(entry.is_leaf(level));
                        assert_eq!(entry.addr(level), addr);
                        assert_eq!(entry.perms(), perms);
                        assert_eq!(MemType::from_bits(entry.memtype_bits()), Some(memtype));
                        assert!(entry.has(extra));
                        assert_eq!(Entry::from_bits(entry.bits()), entry);
                        let valid = entry.validate(level);
                        if perms & WRITE != 0 && perms & READ == 0 {
                            assert!(
                                matches!(valid, Err(EptError::WriteWithoutRead { .. })),
                                "{entry}"
                            );
                        } else {
                            assert_eq!(valid, Ok(()), "{entry} at {level}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn misconfigurations_are_rejected() {
        let wb = MemType::Wb;
        assert!(matches!(
            Entry::from_bits(WRITE | EXEC).validate(Level::L4K),
            Err(EptError::WriteWithoutRead { .. })
        ));
        for memtype in [2u64, 3, 7] {
            let entry = Entry::from_bits(READ | memtype << 3);
            assert!(matches!(
                entry.validate(Level::L4K),
                Err(EptError::ReservedMemoryType { memtype: m, .. }) if u64::from(m) == memtype
            ));
        }
        // Bits 20:12 of a 2M leaf and 29:12 of a 1G leaf are reserved.
        let leaf_2m = Entry::leaf(Level::L2M, 0x20_0000, READ, wb)
            .unwrap()
            .with(1 << 12);
        assert!(matches!(
            leaf_2m.validate(Level::L2M),
            Err(EptError::ReservedBits { bits: 0x1000, .. })
        ));
        let leaf_1g = Entry::leaf(Level::L1G, 0x4000_0000, READ, wb)
            .unwrap()
            .with(1 << 29);
        assert!(matches!(
            leaf_1g.validate(Level::L1G),
            Err(EptError::ReservedBits { .. })
        ));
        // Bit 29 is a frame bit of a 2M leaf, not a reserved one.
        assert_eq!(
            Entry::leaf(Level::L2M, 0x4000_0000, READ, wb)
                .unwrap()
                .with(1 << 29)
                .validate(Level::L2M),
            Ok(())
        );
        // Bit 7 of a PML4E is reserved; memory type bits of a table pointer too.
        let pml4e = Entry::table(0x1000).with(PAGE_SIZE_BIT);
        assert!(matches!(
            pml4e.validate(Level::PML4),
            Err(EptError::ReservedBits {
                bits: PAGE_SIZE_BIT,
                ..
            })
        ));
        let pde = Entry::table(0x1000).with(6 << 3);
        assert!(matches!(
            pde.validate(Level::L2M),
            Err(EptError::ReservedBits { .. })
        ));
        assert_eq!(Entry::table(0x1000).validate(Level::PML4), Ok(()));
        assert_eq!(Entry::NON_PRESENT.validate(Level::PML4), Ok(()));
        assert!(!Entry::NON_PRESENT.is_present());
    }

    #[test]
    fn leaf_refuses_misaligned_frames_and_levels_without_leaves() {
        let wb = MemType::Wb;
        for (level, bad) in [
            (Level::L4K, 0x1234),
            (Level::L2M, 0x4000_1000),
            (Level::L2M, 0x1_0010_0000),
            (Level::L1G, 0x4020_0000),
            (Level::L4K, 1 << 52),
        ] {
            assert_eq!(
                Entry::leaf(level, bad, READ, wb),
                Err(EptError::MisalignedFrame { addr: bad, level }),
                "{bad:#x} at {level}"
            );
        }
        for level in [Level::PML4, Level::PML5] {
            assert_eq!(
                Entry::leaf(level, 0, READ, wb),
                Err(EptError::NoLeafAtLevel { level })
            );
        }
        assert!(Entry::leaf(Level::L1G, 0xc000_0000, READ, wb).is_ok());
    }

    #[test]
    fn execute_only_and_address_width_follow_the_cpu() {
        let x_only = Entry::leaf(Level::L4K, 0x5000, EXEC, MemType::Wb).unwrap();
        assert_eq!(x_only.validate(Level::L4K), Ok(()));
        let no_x_only = EptCaps {
            execute_only: false,
            maxphyaddr: 52,
        };
        assert_eq!(
            x_only.validate_with(Level::L4K, no_x_only),
            Err(EptError::ExecuteOnlyUnsupported { entry: x_only })
        );
        // A table pointer with only X is execute-only too (SDM 29.3.3.1).
        assert!(
            Entry::from_bits(0x5000 | EXEC)
                .validate_with(Level::L2M, no_x_only)
                .is_err()
        );
        assert!(
            Entry::leaf(Level::L4K, 0x5000, READ | EXEC, MemType::Wb)
                .unwrap()
                .validate_with(Level::L4K, no_x_only)
                .is_ok()
        );
        let narrow = EptCaps {
            execute_only: true,
            maxphyaddr: 39,
        };
        let high = Entry::leaf(Level::L4K, 1 << 40, READ, MemType::Wb).unwrap();
        assert_eq!(high.validate(Level::L4K), Ok(()));
        assert_eq!(
            high.validate_with(Level::L4K, narrow),
            Err(EptError::ReservedBits {
                entry: high,
                level: Level::L4K,
                bits: 1 << 40
            })
        );
        let table = Entry::table(1 << 45);
        assert!(table.validate_with(Level::PML4, narrow).is_err());
        assert!(
            Entry::table((1 << 39) - 4096)
                .validate_with(Level::PML4, narrow)
                .is_ok()
        );
    }

    #[test]
    fn a_filled_split_table_holds_every_child_of_the_leaf() {
        for level in [Level::L2M, Level::L1G] {
            let leaf = Entry::leaf(level, 0x40_0000_0000, READ | WRITE | EXEC, MemType::Wb)
                .unwrap()
                .with(1 << 8);
            let below = level.below().unwrap();
            let mut words = [0u64; 512];
            fill_split_children(
                &mut words,
                leaf.split_child(level, 0).bits(),
                below.entry_bytes(),
            );
            for (i, &word) in words.iter().enumerate() {
                assert_eq!(
                    Entry::from_bits(word),
                    leaf.split_child(level, i),
                    "child {i}"
                );
            }
        }
    }

    #[test]
    fn split_children_copy_every_bit_but_page_size_at_4k() {
        let parent = Entry::leaf(Level::L2M, 0x8000_0000, READ | WRITE | EXEC, MemType::Wb)
            .unwrap()
            .with(IGNORE_PAT | ACCESSED | DIRTY | SUPPRESS_VE);
        for index in [0, 1, 255, 511] {
            let child = parent.split_child(Level::L2M, index);
            assert_eq!(
                child.bits() & !ADDR_MASK,
                parent.bits() & !ADDR_MASK & !PAGE_SIZE_BIT
            );
            assert_eq!(child.addr(Level::L4K), 0x8000_0000 + index as u64 * 4096);
            assert!(child.is_leaf(Level::L4K) && child.validate(Level::L4K).is_ok());
        }
        let giant = Entry::leaf(Level::L1G, 0x40_0000_0000, READ, MemType::Wt).unwrap();
        let child = giant.split_child(Level::L1G, 3);
        assert!(
            child.is_huge_leaf(Level::L2M),
            "2M children keep the size bit"
        );
        assert_eq!(child.addr(Level::L2M), 0x40_0000_0000 + 3 * (2 << 20));
        assert_eq!(child.bits() & !ADDR_MASK, giant.bits() & !ADDR_MASK);
    }

    #[test]
    fn levels_index_gfns() {
        let gfn = (5 << 27) | (4 << 18) | (3 << 9) | 2;
        assert_eq!(
            [Level::L4K, Level::L2M, Level::L1G, Level::PML4].map(|l| l.index(gfn)),
            [2, 3, 4, 5]
        );
        assert_eq!(Level::L1G.entry_pages(), 512 * 512);
        assert_eq!(Level::new(0), None);
        assert_eq!(Level::L4K.below(), None);
    }
}
