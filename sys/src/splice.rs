//! Sending memory to a socket without copying it on the way:
//! `vmsplice(2)` puts references to the pages into a pipe, and `splice(2)`
//! moves them on into the socket, whose buffers then hold the pages
//! themselves until the peer reads them (unix stream sockets and TCP both
//! take spliced pages, `MSG_SPLICE_PAGES`). The one copy left is the
//! reader's.
//!
//! The peer reads the pages as they are when it reads them, not as they
//! were when [`PageSplicer::send`] returned: a sender whose memory may
//! change in between (a running guest's) must tell the reader how to judge
//! what it got, as a checksum taken before the send does.
//!
//! Memory the kernel cannot take references to (`memfd_secret(2)`, a
//! mapping with `VM_PFNMAP`) is refused by `vmsplice` before anything is
//! sent; [`SpliceError::Refused`] says how much went before it, so the
//! caller can write the rest itself.
//!
//! ```
//! use std::io::Read;
//! use std::os::fd::AsFd;
//! use std::os::unix::net::UnixStream;
//! use mmukit_sys::splice::PageSplicer;
//!
//! let (mut reader, writer) = UnixStream::pair()?;
//! // The socket holds references to these pages, not copies: they must
//! // stay as they are until the reader has read them.
//! let data = vec![0x5au8; 64 << 10];
//! let mut got = vec![0u8; 64 << 10];
//! std::thread::scope(|scope| -> Result<(), Box<dyn std::error::Error>> {
//!     let sending = scope.spawn(|| {
//!         let mut splicer = PageSplicer::new().map_err(|err| err.to_string())?;
//!         splicer.send(writer.as_fd(), &data).map_err(|err| err.to_string())
//!     });
//!     reader.read_exact(&mut got)?;
//!     sending.join().unwrap()?;
//!     Ok(())
//! })?;
//! assert_eq!(got, data);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};

use rustix::io::Errno;
use rustix::pipe::{IoSliceRaw, PipeFlags, SpliceFlags};

/// The pipe size asked for: 1 MiB, the default `fs.pipe-max-size`. A
/// smaller pipe (a lower limit) only means more calls.
const PIPE_BYTES: usize = 1 << 20;

/// Why a send stopped.
#[derive(Debug, thiserror::Error)]
pub enum SpliceError {
    /// `vmsplice` refused the memory: the first `sent` bytes went to the
    /// socket, the rest did not, and the socket is as it was after them.
    #[error("the kernel would not splice this memory after {sent} bytes: {source}")]
    Refused {
        /// Bytes sent before the refusal.
        sent: usize,
        /// The kernel's answer.
        source: io::Error,
    },
    /// Moving the pages into the socket failed (a closed or broken
    /// connection): some of them may have gone.
    #[error("splicing into the socket: {0}")]
    Socket(io::Error),
}

/// A pipe that carries pages from memory into sockets.
#[derive(Debug)]
pub struct PageSplicer {
    read: OwnedFd,
    write: OwnedFd,
}

impl PageSplicer {
    /// A pipe of up to 1 MiB.
    pub fn new() -> io::Result<Self> {
        let (read, write) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC)?;
        // Over `fs.pipe-max-size` (or the user's pipe quota) the pipe
        // keeps its default size, which only means more calls.
        let _ = rustix::pipe::fcntl_setpipe_size(&write, PIPE_BYTES);
        Ok(Self { read, write })
    }

    /// Sends `data` to `socket`: every byte, in order, or an error. The
    /// pipe is empty again when this returns `Ok`.
    pub fn send(&mut self, socket: BorrowedFd<'_>, data: &[u8]) -> Result<(), SpliceError> {
        let mut sent = 0;
        while sent < data.len() {
            let piece = [IoSliceRaw::from_slice(&data[sent..])];
            // SAFETY: `write` is the pipe's write end, so the kernel only
            // reads the pages of `piece` (it takes references to them);
            // the slice is valid for the call.
            let taken = match retry(|| unsafe {
                rustix::pipe::vmsplice(&self.write, &piece, SpliceFlags::empty())
            }) {
                Ok(0) => {
                    let source = io::Error::new(io::ErrorKind::WriteZero, "vmsplice took nothing");
                    return Err(SpliceError::Refused { sent, source });
                }
                Ok(taken) => taken,
                Err(errno) => {
                    let source = io::Error::from(errno);
                    return Err(SpliceError::Refused { sent, source });
                }
            };
            let mut left = taken;
            while left > 0 {
                let flags = if sent + taken < data.len() {
                    SpliceFlags::MORE
                } else {
                    SpliceFlags::empty()
                };
                let moved =
                    retry(|| rustix::pipe::splice(&self.read, None, socket, None, left, flags))
                        .map_err(|errno| SpliceError::Socket(errno.into()))?;
                if moved == 0 {
                    let err = io::Error::new(io::ErrorKind::WriteZero, "the socket took nothing");
                    return Err(SpliceError::Socket(err));
                }
                left -= moved;
            }
            sent += taken;
        }
        Ok(())
    }
}

/// Runs `call` again while it is interrupted.
fn retry<T>(mut call: impl FnMut() -> Result<T, Errno>) -> Result<T, Errno> {
    loop {
        match call() {
            Err(Errno::INTR) => {}
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    use super::*;

    /// `vmsplice` into a pipe takes references to the user pages, not
    /// copies (`iter_to_pipe` in `fs/splice.c`), so the bytes sent must
    /// stay as they are until the reader has them.
    #[test]
    fn pages_arrive_whole_and_in_order_past_the_pipe_size() {
        let (mut reader, writer) = UnixStream::pair().unwrap();
        let data: Vec<u8> = (0..3 * PIPE_BYTES + 12345)
            .map(|i| (i % 251) as u8)
            .collect();
        let mut got = vec![0u8; data.len() + 100];
        // The socket holds references to `data`'s pages: it outlives the read.
        std::thread::scope(|scope| {
            let sending = scope.spawn(|| {
                let mut splicer = PageSplicer::new().unwrap();
                splicer.send(writer.as_fd(), &data).unwrap();
                splicer.send(writer.as_fd(), &data[..100]).unwrap();
            });
            reader.read_exact(&mut got).unwrap();
            sending.join().unwrap();
        });
        let expected = data;
        assert!(got[..expected.len()] == expected[..], "the bytes arrived");
        assert_eq!(got[expected.len()..], expected[..100]);
    }

    #[test]
    fn a_closed_peer_is_a_socket_error() {
        let (reader, writer) = UnixStream::pair().unwrap();
        drop(reader);
        let mut splicer = PageSplicer::new().unwrap();
        let err = splicer.send(writer.as_fd(), &[1u8; 8192]).unwrap_err();
        assert!(matches!(err, SpliceError::Socket(_)), "{err}");
    }
}
