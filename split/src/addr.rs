//! Typed addresses, as vm-memory has `GuestAddress`: a guest frame, a guest
//! physical address, a host physical address and a host frame are four
//! different things, and the type says which one a `u64` is.
//!
//! The field is public (`Gfn(0x100).0`), so crossing to a raw number is
//! explicit and free; arithmetic that stays inside one kind is provided.
//!
//! ```
//! use split::addr::{Gfn, Gpa};
//!
//! let gpa = Gpa(0x20_5123);
//! assert_eq!(gpa.gfn(), Gfn(0x205));
//! assert_eq!(gpa.gfn().gpa(), Gpa(0x20_5000));
//! assert_eq!(Gfn(0x205) + 3, Gfn(0x208));
//! assert_eq!(Gfn(0x208) - Gfn(0x205), 3);
//! assert_eq!(format!("{}", Gfn(0x205)), "gfn 0x205");
//! ```

use std::fmt;
use std::ops::{Add, Range, Sub};

/// The shift from a 4 KiB page's address to its frame number.
pub const PAGE_SHIFT: u32 = 12;

macro_rules! address_type {
    ($(#[$doc:meta])* $name:ident, $label:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
        #[repr(transparent)]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($label, " {:#x}"), self.0)
            }
        }

        impl fmt::LowerHex for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::LowerHex::fmt(&self.0, f)
            }
        }

        impl Add<u64> for $name {
            type Output = Self;
            fn add(self, rhs: u64) -> Self {
                Self(self.0 + rhs)
            }
        }

        impl Sub for $name {
            type Output = u64;
            fn sub(self, rhs: Self) -> u64 {
                self.0 - rhs.0
            }
        }

        impl $name {
            /// The value rounded down to a multiple of `align` (a power of
            /// two, in the type's own unit).
            pub const fn align_down(self, align: u64) -> Self {
                Self(self.0 & !(align - 1))
            }

            /// Whether the value is a multiple of `align` (in the type's own
            /// unit).
            pub const fn is_aligned(self, align: u64) -> bool {
                self.0.is_multiple_of(align)
            }

            /// `self + rhs`, or `None` on overflow.
            pub const fn checked_add(self, rhs: u64) -> Option<Self> {
                match self.0.checked_add(rhs) {
                    Some(v) => Some(Self(v)),
                    None => None,
                }
            }
        }
    };
}

address_type!(
    /// A guest frame number: a guest physical address shifted right by 12.
    Gfn,
    "gfn"
);
address_type!(
    /// A guest physical address.
    Gpa,
    "gpa"
);
address_type!(
    /// A host physical address: the address of a host page (a table page
    /// from an MMU's pool, or the memory a leaf maps) or of a byte in it.
    Hpa,
    "hpa"
);
address_type!(
    /// A host page frame number: a host physical address shifted right by
    /// 12 (what a memslot's guest frames are backed by).
    Pfn,
    "pfn"
);

impl Gfn {
    /// The guest physical address of the frame's first byte.
    pub const fn gpa(self) -> Gpa {
        Gpa(self.0 << PAGE_SHIFT)
    }

    /// The frames `[self, end)` as a range of raw numbers.
    pub const fn until(self, end: Gfn) -> Range<u64> {
        self.0..end.0
    }
}

impl Gpa {
    /// The frame the address lies in.
    pub const fn gfn(self) -> Gfn {
        Gfn(self.0 >> PAGE_SHIFT)
    }

    /// The byte offset inside the 4 KiB page.
    pub const fn page_offset(self) -> u64 {
        self.0 & ((1 << PAGE_SHIFT) - 1)
    }
}

impl Pfn {
    /// The host physical address of the frame's first byte.
    pub const fn hpa(self) -> Hpa {
        Hpa(self.0 << PAGE_SHIFT)
    }
}

impl Hpa {
    /// The frame the address lies in.
    pub const fn pfn(self) -> Pfn {
        Pfn(self.0 >> PAGE_SHIFT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_and_addresses_convert_both_ways() {
        assert_eq!(Gpa(0x1234_5678).gfn(), Gfn(0x12345));
        assert_eq!(Gpa(0x1234_5678).page_offset(), 0x678);
        assert_eq!(Gfn(0x12345).gpa(), Gpa(0x1234_5000));
        assert_eq!(Pfn(7).hpa(), Hpa(0x7000));
        assert_eq!(Hpa(0x7fff).pfn(), Pfn(7));
    }

    #[test]
    fn arithmetic_stays_inside_one_kind() {
        assert_eq!(Gfn(0x3ff).align_down(0x200), Gfn(0x200));
        assert!(Gfn(0x400).is_aligned(0x200));
        assert!(!Gfn(0x401).is_aligned(0x200));
        assert_eq!(Gfn(u64::MAX).checked_add(1), None);
        assert_eq!(Gfn(1).checked_add(1), Some(Gfn(2)));
        assert_eq!(Gfn(5).until(Gfn(8)), 5..8);
        assert_eq!(format!("{}", Hpa(0x1000)), "hpa 0x1000");
        assert_eq!(format!("{:x}", Gpa(0xabc)), "abc");
    }
}
