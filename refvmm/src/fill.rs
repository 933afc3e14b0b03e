//! The idle workload's memory: a fill the source writes before the guest
//! starts and the destination checks word for word after a migration.

use migrate::GuestMemoryMap;

use crate::config::Fill;
use crate::guest_error::GuestError;

const PAGE: usize = 4096;

/// The word a `random` fill puts at `word` of `page`: no page is zero.
fn fill_word(page: u64, word: u64) -> u64 {
    // splitmix64 of the word's index; never zero for the first word.
    let mut z = (page << 9 | word).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) | u64::from(word == 0)
}

/// The page `fill` expects at guest frame `frame`, into `page`.
fn expected_page(fill: Fill, frame: u64, page: &mut [u8]) {
    for (word, bytes) in page.chunks_exact_mut(8).enumerate() {
        let value = match fill {
            Fill::Zero => 0,
            Fill::Random => fill_word(frame, word as u64),
        };
        bytes.copy_from_slice(&value.to_ne_bytes());
    }
}

/// Writes `fill` into every page of `memory` from `first_page` on (the
/// pages below hold the guest's program). Memory starts zeroed, so a zero
/// fill writes nothing.
pub fn write(memory: &GuestMemoryMap, fill: Fill, first_page: u64) {
    if fill == Fill::Zero {
        return;
    }
    let mut page = vec![0u8; PAGE];
    for frame in first_page..memory.pages() {
        expected_page(fill, frame, &mut page);
        memory.write(frame, &page);
    }
}

/// The idle guest's check: every page of `memory` from `first_page` on
/// holds `fill`; the first word that differs is the error.
pub fn verify(memory: &GuestMemoryMap, fill: Fill, first_page: u64) -> Result<(), GuestError> {
    let mut expected = vec![0u8; PAGE];
    let mut found = vec![0u8; PAGE];
    for frame in first_page..memory.pages() {
        expected_page(fill, frame, &mut expected);
        memory.read(frame, &mut found);
        if found == expected {
            continue;
        }
        let word = found
            .chunks_exact(8)
            .zip(expected.chunks_exact(8))
            .position(|(a, b)| a != b)
            .expect("the pages differ");
        let at = |page: &[u8]| {
            u64::from_ne_bytes(page[word * 8..word * 8 + 8].try_into().expect("8 bytes"))
        };
        return Err(GuestError::StaleMemory {
            vcpu: 0,
            gpa: frame * PAGE as u64 + word as u64 * 8,
            found: at(&found),
            expected: at(&expected),
        });
    }
    Ok(())
}
