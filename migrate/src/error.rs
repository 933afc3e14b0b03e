//! What can stop a migration, on either side.

use std::io;

use crate::dirty::DirtyLogError;
use crate::format::StreamError;

/// A migration that did not complete. On the source the VM is the
/// caller's to resume; on the destination nothing received may run.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The destination could not be reached.
    #[error("connecting {what} to {address}: {source}")]
    Connect {
        /// The address.
        address: String,
        /// Which connection.
        what: &'static str,
        /// The system's error.
        source: io::Error,
    },
    /// Writing to the destination failed: it stopped, or the connection
    /// broke.
    #[error("sending {what}: {source}")]
    Send {
        /// What was being sent.
        what: &'static str,
        /// The system's error.
        source: io::Error,
    },
    /// Listening or accepting a connection failed.
    #[error("{what}: {source}")]
    Listen {
        /// What was being done.
        what: &'static str,
        /// The system's error.
        source: io::Error,
    },
    /// The stream (or the destination's reply) is malformed, truncated,
    /// foreign or damaged.
    #[error("{0}")]
    Stream(#[from] StreamError),
    /// The destination refused the VM, and said why.
    #[error("the destination refused: {0}")]
    Refused(String),
    /// The other side broke the protocol.
    #[error("protocol: {0}")]
    Protocol(&'static str),
    /// A memory connection that belongs to no stream this side knows.
    #[error("memory connection {index} of session {session:#x}: {why}")]
    Connection {
        /// The connection's index.
        index: u32,
        /// Its session.
        session: u64,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The stream announces more memory than this host will give it.
    #[error("the stream announces {bytes} bytes of guest memory; this host gives at most {limit}")]
    TooMuchMemory {
        /// Bytes announced.
        bytes: u64,
        /// The limit.
        limit: u64,
    },
    /// The destination's memory is not the size the stream announced.
    #[error("the stream carries {announced} bytes of memory; the destination has {local}")]
    MemorySize {
        /// Bytes announced.
        announced: u64,
        /// Bytes of the destination's memory.
        local: u64,
    },
    /// The end marker disagrees with what arrived.
    #[error("the stream ended with {announced} pages announced and {received} received")]
    Incomplete {
        /// Pages the end marker announced.
        announced: u64,
        /// Pages received.
        received: u64,
    },
    /// The dirty log failed.
    #[error("{0}")]
    DirtyLog(#[from] DirtyLogError),
}

impl MigrateError {
    /// A write of `what` failed.
    pub(crate) fn send(what: &'static str) -> impl Fn(io::Error) -> Self {
        move |source| Self::Send { what, source }
    }

    /// A listen or accept step failed.
    pub(crate) fn listen(what: &'static str) -> impl Fn(io::Error) -> Self {
        move |source| Self::Listen { what, source }
    }
}
