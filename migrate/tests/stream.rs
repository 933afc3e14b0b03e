//! The stream reader refuses every malformed, truncated, foreign or damaged
//! stream, and says what was wrong.

use migrate::format::{Header, Reader, Record, StreamError, VecPages, Writer};

const MEMORY: u64 = 64 * 4096;

/// A small stream: header, two page runs, a zero run, a pass end, the
/// connection's end, a state section and the end.
fn stream() -> Vec<u8> {
    let mut bytes = Vec::new();
    let mut writer = Writer::new(&mut bytes);
    writer
        .header(&Header {
            streams: 0,
            session: 42,
            memory_bytes: MEMORY,
            config: r#"{"vcpus": 1}"#.into(),
        })
        .unwrap();
    writer.pages(3, &[0x11; 2 * 4096]).unwrap();
    writer.zeros(10, 4).unwrap();
    writer.pass_end(0).unwrap();
    writer.pages(3, &[0x22; 4096]).unwrap();
    writer.stream_end(7).unwrap();
    writer.state("vcpu0", b"registers").unwrap();
    writer.done(1, 7).unwrap();
    bytes
}

/// Reads a whole stream; the records, or the first error.
fn read(bytes: &[u8]) -> Result<(Vec<Record>, VecPages), StreamError> {
    let mut reader = Reader::new(bytes);
    let header = reader.header(1 << 20)?;
    let mut memory = VecPages::new(header.memory_bytes);
    let mut records = Vec::new();
    loop {
        let record = reader.record(&mut memory)?;
        let done = matches!(record, Record::Done { .. });
        records.push(record);
        if done {
            return Ok((records, memory));
        }
    }
}

#[test]
fn a_stream_reads_back_as_written() {
    let (records, memory) = read(&stream()).unwrap();
    assert_eq!(records.len(), 7);
    assert_eq!(
        records[0],
        Record::Pages {
            first_page: 3,
            count: 2
        }
    );
    assert_eq!(
        records[5],
        Record::State {
            name: "vcpu0".into(),
            data: b"registers".to_vec()
        }
    );
    let bytes = memory.bytes();
    assert_eq!(bytes[3 * 4096], 0x22, "the later pass wins");
    assert_eq!(bytes[4 * 4096], 0x11);
    assert_eq!(bytes[10 * 4096], 0);
}

#[test]
fn every_truncation_is_refused_and_names_where_the_stream_stopped() {
    let bytes = stream();
    for len in 0..bytes.len() {
        match read(&bytes[..len]) {
            Err(StreamError::Truncated { at, .. }) => assert!(at <= len as u64, "at {len}"),
            other => panic!("a stream cut at {len} of {}: {other:?}", bytes.len()),
        }
    }
}

/// Where the first record's contents start: the header (36 fixed bytes,
/// 12 of configuration, the CRC), then the record's head (13 fixed bytes,
/// two page checksums, the CRC).
const FIRST_CONTENTS: usize = 36 + 12 + 4 + 13 + 2 * 8 + 4;

#[test]
fn every_flipped_byte_is_refused_but_in_a_page_sent_again() {
    let original = stream();
    let (_, expected) = read(&original).unwrap();
    // Page 3's first contents: the next pass sends page 3 again.
    let healed = FIRST_CONTENTS..FIRST_CONTENTS + 4096;
    for at in 0..original.len() {
        let mut bytes = original.clone();
        bytes[at] ^= 0x40;
        let outcome = read(&bytes);
        if healed.contains(&at) {
            let (_, memory) = outcome.unwrap_or_else(|err| panic!("a flip at byte {at}: {err}"));
            assert!(
                memory.bytes() == expected.bytes(),
                "a flip at byte {at} is overwritten by the page sent again"
            );
        } else {
            assert!(
                outcome.is_err(),
                "a flip at byte {at} of {} went through",
                original.len()
            );
        }
    }
}

#[test]
fn a_damaged_page_never_sent_again_fails_the_connection_end_by_name() {
    let mut bytes = stream();
    // Inside page 4, the first record's second page, which no later
    // record sends.
    bytes[FIRST_CONTENTS + 4096 + 100] ^= 1;
    let err = read(&bytes).unwrap_err();
    assert!(
        matches!(
            err,
            StreamError::Owed {
                what: "a connection's end",
                page: 4,
                pages: 1,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("damaged"), "{err}");
}

#[test]
fn a_page_that_changed_after_its_checksum_is_owed_until_it_comes_again() {
    let mut bytes = stream();
    bytes[FIRST_CONTENTS + 7] ^= 1;
    let mut reader = Reader::new(&bytes[..]);
    let header = reader.header(1 << 20).unwrap();
    let mut memory = VecPages::new(header.memory_bytes);
    reader.record(&mut memory).unwrap();
    assert_eq!(reader.owed_pages(), 1, "page 3 is owed, page 4 is not");
    reader.record(&mut memory).unwrap(); // zeros
    reader.record(&mut memory).unwrap(); // pass end
    assert_eq!(reader.owed_pages(), 1, "other records settle nothing");
    reader.record(&mut memory).unwrap(); // page 3 again
    assert_eq!(reader.owed_pages(), 0);
    assert!(matches!(
        reader.record(&mut memory).unwrap(),
        Record::StreamEnd { pages: 7 }
    ));
}

#[test]
fn a_flipped_record_head_is_a_checksum_error_before_any_page_is_written() {
    let mut bytes = stream();
    // The first record's first page number.
    bytes[36 + 12 + 4 + 1] ^= 1;
    let mut reader = Reader::new(&bytes[..]);
    let header = reader.header(1 << 20).unwrap();
    let mut memory = VecPages::new(header.memory_bytes);
    let err = reader.record(&mut memory).unwrap_err();
    assert!(matches!(err, StreamError::Checksum { .. }), "{err}");
    assert!(
        memory.bytes().iter().all(|&b| b == 0),
        "nothing was written"
    );
}

#[test]
fn foreign_streams_and_unknown_versions_are_refused_by_name() {
    let err = read(b"GET / HTTP/1.1\r\n\r\n").unwrap_err();
    assert!(matches!(err, StreamError::Magic { .. }), "{err}");
    assert!(err.to_string().contains("not an mmukit migration stream"));
    let mut bytes = stream();
    bytes[8] = 1;
    let err = read(&bytes).unwrap_err();
    assert!(matches!(err, StreamError::Version { found: 1 }), "{err}");
    assert!(err.to_string().contains("version 1 is unknown"), "{err}");
}

#[test]
fn limits_hold_before_anything_is_allocated() {
    let mut bytes = Vec::new();
    Writer::new(&mut bytes)
        .header(&Header {
            streams: 0,
            session: 1,
            memory_bytes: 4096,
            config: "x".repeat(100),
        })
        .unwrap();
    let err = Reader::new(&bytes[..]).header(10).unwrap_err();
    assert!(
        matches!(
            err,
            StreamError::TooLarge {
                what: "configuration",
                size: 100,
                limit: 10
            }
        ),
        "{err}"
    );
    // A record past the end of memory is refused, not written.
    let mut bytes = Vec::new();
    let mut writer = Writer::new(&mut bytes);
    writer
        .header(&Header {
            streams: 0,
            session: 1,
            memory_bytes: 4096,
            config: String::new(),
        })
        .unwrap();
    writer.pages(1, &[1; 4096]).unwrap();
    let err = read(&bytes).unwrap_err();
    assert!(matches!(err, StreamError::OutsideMemory { .. }), "{err}");
}
