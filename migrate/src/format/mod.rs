//! The migration stream, version 2 (specified in `STREAM.md` at the crate
//! root): a header, then records, each with its own CRC-32, and replies
//! from the destination. [`Writer`] writes it; [`Reader`] reads it and
//! refuses anything malformed, truncated, of an unknown version or with a
//! checksum that does not match, saying what and at which byte.
//!
//! Each page carries its own checksum (XXH3-64), announced in the
//! record's checked head before the contents. A sender may send pages straight
//! from the memory of a running guest, which can change a page between
//! its checksum and its copy; so contents that do not match their checksum
//! are not yet an error: the reader writes them and marks the pages
//! *owed*. A later record of the same pages settles the debt (the dirty
//! log sends every page written after its checksum again), and a
//! connection that ends while it owes pages is refused as damaged.
//!
//! ```
//! use migrate::format::{Header, Reader, Record, VecPages, Writer};
//!
//! let mut bytes = Vec::new();
//! let mut writer = Writer::new(&mut bytes);
//! writer.header(&Header { streams: 0, session: 7, memory_bytes: 8192, config: "{}".into() })?;
//! writer.pages(1, &[0xab; 4096])?;
//! writer.done(1, 1)?;
//!
//! let mut reader = Reader::new(&bytes[..]);
//! let header = reader.header(1 << 20)?;
//! let mut memory = VecPages::new(header.memory_bytes);
//! assert!(matches!(reader.record(&mut memory)?, Record::Pages { first_page: 1, count: 1 }));
//! assert!(matches!(reader.record(&mut memory)?, Record::Done { passes: 1, pages: 1 }));
//! assert_eq!(memory.bytes()[4096], 0xab);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod error;

use std::collections::BTreeMap;
use std::io::{Read, Write};

pub use error::StreamError;

/// The first bytes of a migration stream.
pub const MAGIC: [u8; 8] = *b"MMUKITMG";
/// The first bytes of each extra memory connection.
pub const STREAM_MAGIC: [u8; 8] = *b"MMUKITMS";
/// The format version this crate writes and reads.
pub const VERSION: u32 = 2;
/// The page size of the stream.
pub const PAGE_SIZE: u64 = mmukit_sys::size::PAGE_4K;
/// Pages in one chunk: a record never crosses a chunk, and with several
/// memory connections chunk `c` always travels on connection
/// `c % streams`, so the writes to a page arrive in the order they were
/// made.
pub const CHUNK_PAGES: u64 = 256;
/// The most extra memory connections a stream may announce.
pub const MAX_STREAMS: u32 = 64;
/// The longest configuration a header may carry.
pub const MAX_CONFIG_BYTES: u32 = 1 << 20;
/// The longest state section.
pub const MAX_STATE_BYTES: u32 = 64 << 20;
/// The longest state section name.
pub const MAX_NAME_BYTES: u16 = 64;
/// The longest refusal message.
pub const MAX_MESSAGE_BYTES: u32 = 64 << 10;

const TAG_PAGES: u8 = b'P';
const TAG_ZEROS: u8 = b'Z';
const TAG_PASS_END: u8 = b'E';
const TAG_STREAM_END: u8 = b'F';
const TAG_STATE: u8 = b'S';
const TAG_DONE: u8 = b'D';
const REPLY_ACCEPT: u8 = b'A';
const REPLY_TAKEN_OVER: u8 = b'T';
const REPLY_REFUSED: u8 = b'R';

/// What the stream carries before any memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Extra connections that carry memory (0: memory travels on this one).
    pub streams: u32,
    /// Ties the extra connections to this stream.
    pub session: u64,
    /// Guest memory size in bytes, a multiple of [`PAGE_SIZE`].
    pub memory_bytes: u64,
    /// The VM's configuration (the sender's own format; refvmm: JSON).
    pub config: String,
}

impl Header {
    /// Guest memory in pages.
    pub fn pages(&self) -> u64 {
        self.memory_bytes / PAGE_SIZE
    }
}

/// One record, as read. Page contents go straight to the reader's
/// [`PageSink`]; the record says where they went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// `count` pages from `first_page`, now in the sink.
    Pages {
        /// The first page.
        first_page: u64,
        /// How many.
        count: u32,
    },
    /// `count` pages from `first_page` that hold zeros, zeroed in the sink.
    Zeros {
        /// The first page.
        first_page: u64,
        /// How many.
        count: u32,
    },
    /// The end of a pass over memory on this connection.
    PassEnd {
        /// The pass that ended (0 is the full copy).
        pass: u32,
    },
    /// The end of memory on this connection.
    StreamEnd {
        /// Page records this connection carried, zero runs included.
        pages: u64,
    },
    /// A named section of device or workload state.
    State {
        /// The section's name.
        name: String,
        /// Its bytes.
        data: Vec<u8>,
    },
    /// The end of the stream: every connection's memory and all state sent.
    Done {
        /// Passes over memory, the full copy and the switch-over included.
        passes: u32,
        /// Pages sent on every connection, zero runs included.
        pages: u64,
    },
}

/// What the destination answers on the main connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// The header is accepted: send memory.
    Accept,
    /// Everything arrived and checked: the destination runs the VM now.
    TakenOver,
    /// The destination will not run the VM, and why.
    Refused(String),
}

/// Where a reader puts page contents: guest memory, checked by page.
pub trait PageSink {
    /// The bytes of pages `[first_page, first_page + count)`, to be
    /// overwritten; `None` when they are not all inside memory.
    fn pages_mut(&mut self, first_page: u64, count: u32) -> Option<&mut [u8]>;
}

/// Guest memory as one vector: a [`PageSink`] for tests and fuzzing.
#[derive(Clone, Debug)]
pub struct VecPages(Vec<u8>);

impl VecPages {
    /// `bytes` of zeros.
    pub fn new(bytes: u64) -> Self {
        Self(vec![0; bytes as usize])
    }

    /// The memory.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl PageSink for VecPages {
    fn pages_mut(&mut self, first_page: u64, count: u32) -> Option<&mut [u8]> {
        let start = first_page.checked_mul(PAGE_SIZE)?;
        let end = start.checked_add(u64::from(count) * PAGE_SIZE)?;
        self.0.get_mut(start as usize..end as usize)
    }
}

/// Writes a migration stream.
#[derive(Debug)]
pub struct Writer<W> {
    out: W,
    written: u64,
}

impl<W: Write> Writer<W> {
    /// A writer over `out`.
    pub fn new(out: W) -> Self {
        Self { out, written: 0 }
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// The output.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.out
    }

    /// Writes `parts` and their CRC-32.
    fn checked(&mut self, parts: &[&[u8]]) -> std::io::Result<()> {
        let mut crc = crc32fast::Hasher::new();
        for part in parts {
            crc.update(part);
            self.out.write_all(part)?;
        }
        self.out.write_all(&crc.finalize().to_le_bytes())?;
        self.written += parts.iter().map(|p| p.len() as u64).sum::<u64>() + 4;
        Ok(())
    }

    /// The stream's header.
    pub fn header(&mut self, header: &Header) -> std::io::Result<()> {
        let config = header.config.as_bytes();
        let mut fixed = Vec::with_capacity(36);
        fixed.extend_from_slice(&MAGIC);
        fixed.extend_from_slice(&VERSION.to_le_bytes());
        fixed.extend_from_slice(&header.streams.to_le_bytes());
        fixed.extend_from_slice(&header.session.to_le_bytes());
        fixed.extend_from_slice(&header.memory_bytes.to_le_bytes());
        fixed.extend_from_slice(&(config.len() as u32).to_le_bytes());
        self.checked(&[&fixed, config])
    }

    /// The first bytes of extra memory connection `index`.
    pub fn hello(&mut self, session: u64, index: u32) -> std::io::Result<()> {
        let mut fixed = Vec::with_capacity(24);
        fixed.extend_from_slice(&STREAM_MAGIC);
        fixed.extend_from_slice(&VERSION.to_le_bytes());
        fixed.extend_from_slice(&session.to_le_bytes());
        fixed.extend_from_slice(&index.to_le_bytes());
        self.checked(&[&fixed])
    }

    /// Pages from `first_page`: `data` is whole pages.
    pub fn pages(&mut self, first_page: u64, data: &[u8]) -> std::io::Result<()> {
        self.pages_with(first_page, data, |out, data| out.write_all(data))
    }

    /// Pages from `first_page`, whose contents `send_contents` puts on the
    /// output itself after the record's head (a sender that splices them
    /// from guest memory flushes its buffer first). `data` is whole pages,
    /// checksummed here; it may change before `send_contents` sends it:
    /// the reader then owes the pages until they come again.
    pub fn pages_with(
        &mut self,
        first_page: u64,
        data: &[u8],
        send_contents: impl FnOnce(&mut W, &[u8]) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        debug_assert!((data.len() as u64).is_multiple_of(PAGE_SIZE));
        let count = (data.len() as u64 / PAGE_SIZE) as u32;
        let mut fixed = Vec::with_capacity(13 + 8 * count as usize);
        fixed.push(TAG_PAGES);
        fixed.extend_from_slice(&first_page.to_le_bytes());
        fixed.extend_from_slice(&count.to_le_bytes());
        for page in data.chunks_exact(PAGE_SIZE as usize) {
            fixed.extend_from_slice(&contents_checksum(page).to_le_bytes());
        }
        self.checked(&[&fixed])?;
        send_contents(&mut self.out, data)?;
        self.written += data.len() as u64;
        Ok(())
    }

    /// `count` pages of zeros from `first_page`.
    pub fn zeros(&mut self, first_page: u64, count: u32) -> std::io::Result<()> {
        let mut fixed = [0u8; 13];
        fixed[0] = TAG_ZEROS;
        fixed[1..9].copy_from_slice(&first_page.to_le_bytes());
        fixed[9..13].copy_from_slice(&count.to_le_bytes());
        self.checked(&[&fixed])
    }

    /// The end of pass `pass` on this connection.
    pub fn pass_end(&mut self, pass: u32) -> std::io::Result<()> {
        let mut fixed = [0u8; 5];
        fixed[0] = TAG_PASS_END;
        fixed[1..5].copy_from_slice(&pass.to_le_bytes());
        self.checked(&[&fixed])
    }

    /// The end of memory on this connection, which carried `pages` pages.
    pub fn stream_end(&mut self, pages: u64) -> std::io::Result<()> {
        let mut fixed = [0u8; 9];
        fixed[0] = TAG_STREAM_END;
        fixed[1..9].copy_from_slice(&pages.to_le_bytes());
        self.checked(&[&fixed])
    }

    /// A state section.
    pub fn state(&mut self, name: &str, data: &[u8]) -> std::io::Result<()> {
        let name = name.as_bytes();
        let mut fixed = Vec::with_capacity(7 + name.len());
        fixed.push(TAG_STATE);
        fixed.extend_from_slice(&(name.len() as u16).to_le_bytes());
        fixed.extend_from_slice(name);
        fixed.extend_from_slice(&(data.len() as u32).to_le_bytes());
        self.checked(&[&fixed, data])
    }

    /// The end of the stream.
    pub fn done(&mut self, passes: u32, pages: u64) -> std::io::Result<()> {
        let mut fixed = [0u8; 13];
        fixed[0] = TAG_DONE;
        fixed[1..5].copy_from_slice(&passes.to_le_bytes());
        fixed[5..13].copy_from_slice(&pages.to_le_bytes());
        self.checked(&[&fixed])
    }

    /// A reply of the destination.
    pub fn reply(&mut self, reply: &Reply) -> std::io::Result<()> {
        let (tag, message) = match reply {
            Reply::Accept => (REPLY_ACCEPT, &[][..]),
            Reply::TakenOver => (REPLY_TAKEN_OVER, &[][..]),
            Reply::Refused(message) => (REPLY_REFUSED, message.as_bytes()),
        };
        let message = &message[..message.len().min(MAX_MESSAGE_BYTES as usize)];
        let mut fixed = [0u8; 5];
        fixed[0] = tag;
        fixed[1..5].copy_from_slice(&(message.len() as u32).to_le_bytes());
        self.checked(&[&fixed, message])?;
        self.out.flush()
    }

    /// Flushes the output.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Reads a migration stream, checking every byte it reads.
#[derive(Debug)]
pub struct Reader<R> {
    input: R,
    /// Bytes consumed: where the next field starts.
    at: u64,
    crc: crc32fast::Hasher,
    /// Pages whose last contents did not match their checksum, each with
    /// where its checksum starts.
    owed: BTreeMap<u64, u64>,
    /// The page checksums of the record being read.
    sums: Vec<u8>,
    /// Pages that arrived not matching their checksum, settled or not.
    mismatched: u64,
}

impl<R: Read> Reader<R> {
    /// A reader over `input`.
    pub fn new(input: R) -> Self {
        Self {
            input,
            at: 0,
            crc: crc32fast::Hasher::new(),
            owed: BTreeMap::new(),
            sums: Vec::new(),
            mismatched: 0,
        }
    }

    /// Pages that arrived not matching their checksum so far (each time
    /// one did), whether a later record settled them or not: on a live
    /// source, pages the guest changed while they were sent.
    pub fn mismatched_pages(&self) -> u64 {
        self.mismatched
    }

    /// Pages whose contents did not match their checksum and have not come
    /// again since.
    pub fn owed_pages(&self) -> u64 {
        self.owed.len() as u64
    }

    /// Refuses the end of a connection that still owes pages.
    fn settled(&self, what: &'static str) -> Result<(), StreamError> {
        match self.owed.iter().next() {
            None => Ok(()),
            Some((&page, &at)) => Err(StreamError::Owed {
                what,
                page,
                at,
                pages: self.owed.len() as u64,
            }),
        }
    }

    /// Settles the zeroed pages `[first_page, first_page + count)`.
    fn settle(&mut self, first_page: u64, count: u32) {
        if !self.owed.is_empty() {
            for page in first_page..first_page + u64::from(count) {
                self.owed.remove(&page);
            }
        }
    }

    /// Reads page contents into `pages` a piece at a time, and checks each
    /// page against its checksum in `self.sums` (read from byte
    /// `sums_at`) while it is still in the cache: a page that matches is
    /// settled, one that does not is owed.
    fn contents(
        &mut self,
        pages: &mut [u8],
        first_page: u64,
        sums_at: u64,
    ) -> Result<(), StreamError> {
        let page_bytes = PAGE_SIZE as usize;
        for (piece_index, piece) in pages.chunks_mut(CONTENTS_PIECE_BYTES).enumerate() {
            let at = self.at;
            read_all(&mut self.input, piece)
                .map_err(|err| StreamError::read("page contents", at, err))?;
            self.at += piece.len() as u64;
            let first = piece_index * (CONTENTS_PIECE_BYTES / page_bytes);
            for (i, page) in piece.chunks_exact(page_bytes).enumerate() {
                let index = first + i;
                let sum = &self.sums[8 * index..8 * index + 8];
                let expected = u64::from_le_bytes(sum.try_into().expect("8 bytes"));
                let number = first_page + index as u64;
                if contents_checksum(page) == expected {
                    if !self.owed.is_empty() {
                        self.owed.remove(&number);
                    }
                } else {
                    self.owed.insert(number, sums_at + 8 * index as u64);
                    self.mismatched += 1;
                }
            }
        }
        Ok(())
    }

    /// Bytes read so far.
    pub fn position(&self) -> u64 {
        self.at
    }

    /// The input.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.input
    }

    /// Reads exactly `buf`, counted in the running checksum.
    fn fill(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), StreamError> {
        let at = self.at;
        read_all(&mut self.input, buf).map_err(|err| StreamError::read(what, at, err))?;
        self.crc.update(buf);
        self.at += buf.len() as u64;
        Ok(())
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, StreamError> {
        let mut b = [0u8; 1];
        self.fill(&mut b, what)?;
        Ok(b[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, StreamError> {
        let mut b = [0u8; 2];
        self.fill(&mut b, what)?;
        Ok(u16::from_le_bytes(b))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, StreamError> {
        let mut b = [0u8; 4];
        self.fill(&mut b, what)?;
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, StreamError> {
        let mut b = [0u8; 8];
        self.fill(&mut b, what)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Starts a checksummed unit.
    fn begin(&mut self) {
        self.crc = crc32fast::Hasher::new();
    }

    /// Ends a checksummed unit: reads its CRC and compares.
    fn end(&mut self, what: &'static str) -> Result<(), StreamError> {
        let computed = std::mem::take(&mut self.crc).finalize();
        let at = self.at;
        let mut b = [0u8; 4];
        read_all(&mut self.input, &mut b).map_err(|err| StreamError::read(what, at, err))?;
        self.at += 4;
        let stored = u32::from_le_bytes(b);
        if stored != computed {
            return Err(StreamError::Checksum { what, at });
        }
        Ok(())
    }

    /// The stream's header. A configuration longer than `max_config`
    /// bytes (at most [`MAX_CONFIG_BYTES`]) is refused.
    pub fn header(&mut self, max_config: u32) -> Result<Header, StreamError> {
        self.begin();
        let mut magic = [0u8; 8];
        self.fill(&mut magic, "the stream's magic")?;
        if magic != MAGIC {
            return Err(StreamError::Magic { found: magic });
        }
        let version = self.u32("the format version")?;
        if version != VERSION {
            return Err(StreamError::Version { found: version });
        }
        let streams = self.u32("the header's stream count")?;
        if streams > MAX_STREAMS {
            return Err(StreamError::TooLarge {
                what: "memory connections",
                size: u64::from(streams),
                limit: u64::from(MAX_STREAMS),
            });
        }
        let session = self.u64("the header's session")?;
        let memory_bytes = self.u64("the header's memory size")?;
        if memory_bytes == 0 || !memory_bytes.is_multiple_of(PAGE_SIZE) {
            return Err(StreamError::MemorySize {
                bytes: memory_bytes,
            });
        }
        let config_len = self.u32("the header's configuration length")?;
        let limit = max_config.min(MAX_CONFIG_BYTES);
        if config_len > limit {
            return Err(StreamError::TooLarge {
                what: "configuration",
                size: u64::from(config_len),
                limit: u64::from(limit),
            });
        }
        let mut config = vec![0u8; config_len as usize];
        self.fill(&mut config, "the configuration")?;
        self.end("the header")?;
        let config = String::from_utf8(config).map_err(|_| StreamError::NotText {
            what: "configuration",
        })?;
        Ok(Header {
            streams,
            session,
            memory_bytes,
            config,
        })
    }

    /// The first bytes of an extra memory connection: its session and
    /// index.
    pub fn hello(&mut self) -> Result<(u64, u32), StreamError> {
        self.begin();
        let mut magic = [0u8; 8];
        self.fill(&mut magic, "a memory connection's magic")?;
        if magic != STREAM_MAGIC {
            return Err(StreamError::Magic { found: magic });
        }
        let version = self.u32("a memory connection's version")?;
        if version != VERSION {
            return Err(StreamError::Version { found: version });
        }
        let session = self.u64("a memory connection's session")?;
        let index = self.u32("a memory connection's index")?;
        self.end("a memory connection's hello")?;
        Ok((session, index))
    }

    /// The next record; page contents go to `sink`, and nothing is
    /// trusted before its checksum matched (a caller that finds an error
    /// must not run what it received).
    pub fn record(&mut self, sink: &mut dyn PageSink) -> Result<Record, StreamError> {
        self.begin();
        let at = self.at;
        let tag = self.u8("a record's tag")?;
        let record = match tag {
            TAG_PAGES | TAG_ZEROS => {
                let first_page = self.u64("a page record's first page")?;
                let count = self.u32("a page record's count")?;
                if count == 0 || u64::from(count) > CHUNK_PAGES {
                    return Err(StreamError::TooLarge {
                        what: "page record",
                        size: u64::from(count),
                        limit: CHUNK_PAGES,
                    });
                }
                if tag == TAG_PAGES {
                    let sums_at = self.at;
                    let mut sums = std::mem::take(&mut self.sums);
                    sums.resize(8 * count as usize, 0);
                    let head = self.fill(&mut sums, "a page record's checksums");
                    self.sums = sums;
                    head?;
                    self.end("a page record's head")?;
                    let Some(pages) = sink.pages_mut(first_page, count) else {
                        return Err(StreamError::OutsideMemory {
                            first_page,
                            count,
                            at,
                        });
                    };
                    self.contents(pages, first_page, sums_at)?;
                    Record::Pages { first_page, count }
                } else {
                    self.end("a zero record")?;
                    let Some(pages) = sink.pages_mut(first_page, count) else {
                        return Err(StreamError::OutsideMemory {
                            first_page,
                            count,
                            at,
                        });
                    };
                    pages.fill(0);
                    self.settle(first_page, count);
                    Record::Zeros { first_page, count }
                }
            }
            TAG_PASS_END => {
                let pass = self.u32("a pass end")?;
                self.end("a pass end")?;
                Record::PassEnd { pass }
            }
            TAG_STREAM_END => {
                let pages = self.u64("a connection's end")?;
                self.end("a connection's end")?;
                self.settled("a connection's end")?;
                Record::StreamEnd { pages }
            }
            TAG_STATE => {
                let name_len = self.u16("a state section's name length")?;
                if name_len == 0 || name_len > MAX_NAME_BYTES {
                    return Err(StreamError::TooLarge {
                        what: "state section name",
                        size: u64::from(name_len),
                        limit: u64::from(MAX_NAME_BYTES),
                    });
                }
                let mut name = vec![0u8; usize::from(name_len)];
                self.fill(&mut name, "a state section's name")?;
                let len = self.u32("a state section's length")?;
                if len > MAX_STATE_BYTES {
                    return Err(StreamError::TooLarge {
                        what: "state section",
                        size: u64::from(len),
                        limit: u64::from(MAX_STATE_BYTES),
                    });
                }
                let mut data = vec![0u8; len as usize];
                self.fill(&mut data, "a state section")?;
                self.end("a state section")?;
                let name = String::from_utf8(name).map_err(|_| StreamError::NotText {
                    what: "state section name",
                })?;
                Record::State { name, data }
            }
            TAG_DONE => {
                let passes = self.u32("the stream's end")?;
                let pages = self.u64("the stream's end")?;
                self.end("the stream's end")?;
                self.settled("the stream's end")?;
                Record::Done { passes, pages }
            }
            tag => return Err(StreamError::Tag { tag, at }),
        };
        Ok(record)
    }

    /// A reply of the destination.
    pub fn reply(&mut self) -> Result<Reply, StreamError> {
        self.begin();
        let at = self.at;
        let tag = self.u8("the destination's reply")?;
        let len = self.u32("the destination's reply")?;
        if len > MAX_MESSAGE_BYTES {
            return Err(StreamError::TooLarge {
                what: "reply",
                size: u64::from(len),
                limit: u64::from(MAX_MESSAGE_BYTES),
            });
        }
        let mut message = vec![0u8; len as usize];
        self.fill(&mut message, "the destination's reply")?;
        self.end("the destination's reply")?;
        let message = String::from_utf8_lossy(&message).into_owned();
        match tag {
            REPLY_ACCEPT => Ok(Reply::Accept),
            REPLY_TAKEN_OVER => Ok(Reply::TakenOver),
            REPLY_REFUSED => Ok(Reply::Refused(message)),
            tag => Err(StreamError::Tag { tag, at }),
        }
    }
}

/// Page contents are read and checked this much at a time, so that each
/// page is checked while it is still in the cache.
const CONTENTS_PIECE_BYTES: usize = 64 << 10;

/// The checksum of a page's contents: XXH3-64, seed 0.
pub fn contents_checksum(data: &[u8]) -> u64 {
    twox_hash::XxHash3_64::oneshot(data)
}

/// `read_exact` that retries an interrupted read and keeps the error.
fn read_all(input: &mut impl Read, mut buf: &mut [u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        match input.read(buf) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => buf = &mut buf[n..],
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}
