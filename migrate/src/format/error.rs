//! What a reader refuses, each naming what was wrong and where.

use std::io;

/// A malformed, truncated, foreign or damaged stream.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The stream ended inside a field: the sender stopped.
    #[error("the stream stopped in {what} at byte {at}")]
    Truncated {
        /// The field.
        what: &'static str,
        /// Where it started.
        at: u64,
    },
    /// Reading failed (a broken connection, a timeout).
    #[error("reading {what} at byte {at}: {source}")]
    Io {
        /// The field.
        what: &'static str,
        /// Where it started.
        at: u64,
        /// The system's error.
        source: io::Error,
    },
    /// Not a migration stream.
    #[error("not an mmukit migration stream (magic {})", String::from_utf8_lossy(found).escape_default())]
    Magic {
        /// The bytes found.
        found: [u8; 8],
    },
    /// A format version this reader does not know.
    #[error(
        "format version {found} is unknown (this reader reads version {})",
        super::VERSION
    )]
    Version {
        /// The version found.
        found: u32,
    },
    /// A checksum that does not match: the stream is damaged.
    #[error("the checksum of {what} ending at byte {at} does not match: the stream is damaged")]
    Checksum {
        /// The unit it covers.
        what: &'static str,
        /// Where the checksum starts.
        at: u64,
    },
    /// A connection ended while pages whose contents did not match their
    /// checksum had not come again.
    #[error(
        "{what}: {pages} page(s) did not match their contents checksum and never came again, the first page {page} (checksum at byte {at}): the stream is damaged"
    )]
    Owed {
        /// The unit that ended the connection.
        what: &'static str,
        /// The first page owed.
        page: u64,
        /// Where its record's contents checksum starts.
        at: u64,
        /// Pages owed.
        pages: u64,
    },
    /// A record tag this reader does not know.
    #[error("unknown record tag {tag:#04x} at byte {at}")]
    Tag {
        /// The tag.
        tag: u8,
        /// Where it is.
        at: u64,
    },
    /// A length over its limit.
    #[error("{what} of {size} is over the limit of {limit}")]
    TooLarge {
        /// What is too large.
        what: &'static str,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// A memory size that is zero or not whole pages.
    #[error("guest memory of {bytes} bytes is not a non-zero number of 4 KiB pages")]
    MemorySize {
        /// The size announced.
        bytes: u64,
    },
    /// Text that is not UTF-8.
    #[error("the {what} is not UTF-8 text")]
    NotText {
        /// Which text.
        what: &'static str,
    },
    /// Pages outside guest memory.
    #[error("pages {first_page}..+{count} of the record at byte {at} lie outside guest memory")]
    OutsideMemory {
        /// The first page.
        first_page: u64,
        /// How many.
        count: u32,
        /// Where the record starts.
        at: u64,
    },
}

impl StreamError {
    /// A read of `what` at byte `at` failed with `err`: the end of the
    /// input is a truncation, anything else an I/O error.
    pub(super) fn read(what: &'static str, at: u64, err: io::Error) -> Self {
        if err.kind() == io::ErrorKind::UnexpectedEof {
            Self::Truncated { what, at }
        } else {
            Self::Io {
                what,
                at,
                source: err,
            }
        }
    }
}
