//! The migration stream reader on arbitrary bytes: every stream is read
//! to its end or refused with an error, never a panic, and no page lands
//! outside the destination's memory. A stream that reads whole must have
//! ended with `Done`, after a header within the destination's limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use migrate::format::{Reader, Record, VecPages};

/// The most memory this destination gives a stream (the receiver's
/// `Limits::max_memory_bytes`).
const LIMIT: u64 = 1 << 22;

fuzz_target!(|data: &[u8]| {
    let mut reader = Reader::new(data);
    let Ok(header) = reader.header(1 << 16) else {
        return;
    };
    assert!(header.memory_bytes > 0 && header.memory_bytes.is_multiple_of(4096));
    if header.memory_bytes > LIMIT {
        return;
    }
    let mut memory = VecPages::new(header.memory_bytes);
    let mut pages = 0u64;
    loop {
        match reader.record(&mut memory) {
            Ok(Record::Pages { first_page, count } | Record::Zeros { first_page, count }) => {
                assert!((first_page + u64::from(count)) * 4096 <= header.memory_bytes);
                pages += u64::from(count);
            }
            Ok(Record::Done { .. }) => break,
            Ok(_) => {}
            Err(err) => {
                // Every refusal says what it refused.
                assert!(!err.to_string().is_empty());
                break;
            }
        }
        assert!(reader.position() <= data.len() as u64);
    }
    assert_eq!(memory.bytes().len() as u64, header.memory_bytes);
    let _ = pages;
});
