//! Maps keyed by the host address of a page table: the MMUs find a table's
//! header from its address, as the kernel finds a shadow page from its
//! `struct page`.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A map from page-aligned host addresses to `V`.
pub(crate) type PageMap<V> = HashMap<u64, V, BuildHasherDefault<PageAddressHasher>>;

/// A hasher for page-aligned addresses: the page number times a 64-bit odd
/// constant (Fibonacci hashing). The keys come from our own page pool, not
/// from a guest, so a keyed hash buys nothing, and SipHash costs more than
/// the rest of a lookup.
#[derive(Default)]
pub(crate) struct PageAddressHasher(u64);

impl Hasher for PageAddressHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed; other writes fold in byte by byte.
        for &byte in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(byte)).wrapping_mul(FIBONACCI);
        }
    }

    fn write_u64(&mut self, address: u64) {
        self.0 = (address >> 12).wrapping_mul(FIBONACCI);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// 2^64 divided by the golden ratio, made odd.
const FIBONACCI: u64 = 0x9e37_79b9_7f4a_7c15;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_pages_spread_over_the_high_and_low_bits() {
        let hash = |address: u64| {
            let mut hasher = PageAddressHasher::default();
            hasher.write_u64(address);
            hasher.finish()
        };
        let pages = 4096u64;
        let top7: std::collections::HashSet<u64> =
            (0..pages).map(|page| hash(page << 12) >> 57).collect();
        assert_eq!(top7.len(), 128, "every control byte value is used");
        let low12: std::collections::HashSet<u64> =
            (0..pages).map(|page| hash(page << 12) & 0xfff).collect();
        assert_eq!(low12.len(), 4096, "page numbers differ in the low bits");
        let mut map = PageMap::default();
        for page in 0..pages {
            map.insert(0x7f00_0000_0000 + (page << 12), page);
        }
        assert_eq!(map[&(0x7f00_0000_0000 + (77 << 12))], 77);
    }
}
