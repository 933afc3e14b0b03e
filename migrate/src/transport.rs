//! Where a migration goes: `unix:PATH` or `tcp:HOST:PORT` (QEMU's
//! `-incoming` convention), a listener on exactly that address, and the
//! connections between the two sides.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// An address given on the command line was not one.
#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    /// Neither `unix:` nor `tcp:`.
    #[error("{given:?}: a migration address is unix:PATH or tcp:HOST:PORT")]
    Scheme {
        /// The address given.
        given: String,
    },
    /// `unix:` without a path.
    #[error("{given:?}: unix: needs a path")]
    NoPath {
        /// The address given.
        given: String,
    },
    /// `tcp:` without a host and a port that is a number.
    #[error("{given:?}: tcp: needs HOST:PORT with a port from 0 (any, to listen) to 65535")]
    HostPort {
        /// The address given.
        given: String,
    },
}

/// A migration address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    /// A unix socket at this path.
    Unix(PathBuf),
    /// A TCP host and port.
    Tcp {
        /// The host: a name or an address (IPv6 in brackets).
        host: String,
        /// The port.
        port: u16,
    },
}

impl std::str::FromStr for Address {
    type Err = AddressError;

    fn from_str(given: &str) -> Result<Self, AddressError> {
        if let Some(path) = given.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(AddressError::NoPath {
                    given: given.into(),
                });
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = given.strip_prefix("tcp:") {
            let bad = || AddressError::HostPort {
                given: given.into(),
            };
            let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
            let port: u16 = port.parse().map_err(|_| bad())?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if host.is_empty() {
                return Err(bad());
            }
            return Ok(Self::Tcp {
                host: host.into(),
                port,
            });
        }
        Err(AddressError::Scheme {
            given: given.into(),
        })
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
            Self::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            Self::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
        }
    }
}

/// One connection between the two sides.
#[derive(Debug)]
pub enum Connection {
    /// Over a unix socket.
    Unix(UnixStream),
    /// Over TCP.
    Tcp(TcpStream),
}

impl Connection {
    /// Connects to `address`, retrying for up to `patience` while nothing
    /// listens there yet (the destination may start a moment later).
    pub fn connect(address: &Address, patience: Duration) -> io::Result<Self> {
        let deadline = Instant::now() + patience;
        loop {
            let attempt = match address {
                Address::Unix(path) => UnixStream::connect(path).map(|stream| {
                    widen_send_buffer(&stream);
                    Self::Unix(stream)
                }),
                Address::Tcp { host, port } => {
                    TcpStream::connect((host.as_str(), *port)).and_then(|stream| {
                        stream.set_nodelay(true)?;
                        Ok(Self::Tcp(stream))
                    })
                }
            };
            match attempt {
                Err(err)
                    if Instant::now() < deadline
                        && matches!(
                            err.kind(),
                            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                        ) =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => return other,
            }
        }
    }

    /// Reads time out after `timeout` (a silent peer is a stopped one).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Unix(stream) => stream.set_read_timeout(timeout),
            Self::Tcp(stream) => stream.set_read_timeout(timeout),
        }
    }

    /// A second handle on the same connection.
    pub fn try_clone(&self) -> io::Result<Self> {
        match self {
            Self::Unix(stream) => stream.try_clone().map(Self::Unix),
            Self::Tcp(stream) => stream.try_clone().map(Self::Tcp),
        }
    }

    /// Closes both directions: the peer's reads end.
    pub fn shutdown(&self) {
        let _ = match self {
            Self::Unix(stream) => stream.shutdown(std::net::Shutdown::Both),
            Self::Tcp(stream) => stream.shutdown(std::net::Shutdown::Both),
        };
    }
}

impl std::os::fd::AsFd for Connection {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Self::Unix(stream) => stream.as_fd(),
            Self::Tcp(stream) => stream.as_fd(),
        }
    }
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Unix(stream) => stream.read(buf),
            Self::Tcp(stream) => stream.read(buf),
        }
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Unix(stream) => stream.write(buf),
            Self::Tcp(stream) => stream.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Unix(stream) => stream.flush(),
            Self::Tcp(stream) => stream.flush(),
        }
    }
}

/// A listener on exactly one address. A unix socket's file is removed
/// when the listener is dropped.
#[derive(Debug)]
pub enum Listener {
    /// On a unix socket.
    Unix(UnixListener, PathBuf),
    /// On TCP.
    Tcp(TcpListener),
}

impl Listener {
    /// Listens on `address`. A unix path that exists is refused, not
    /// replaced (it may be another listener's).
    pub fn bind(address: &Address) -> io::Result<Self> {
        match address {
            Address::Unix(path) => Ok(Self::Unix(UnixListener::bind(path)?, path.clone())),
            Address::Tcp { host, port } => {
                let addrs: Vec<_> = (host.as_str(), *port).to_socket_addrs()?.collect();
                Ok(Self::Tcp(TcpListener::bind(&addrs[..])?))
            }
        }
    }

    /// The address a sender connects to (the bound port for `tcp:...:0`).
    pub fn address(&self) -> io::Result<Address> {
        match self {
            Self::Unix(_, path) => Ok(Address::Unix(path.clone())),
            Self::Tcp(listener) => {
                let local = listener.local_addr()?;
                Ok(Address::Tcp {
                    host: local.ip().to_string(),
                    port: local.port(),
                })
            }
        }
    }

    /// Accepts one connection, waiting at most `timeout` (forever when
    /// `None`).
    pub fn accept(&self, timeout: Option<Duration>) -> io::Result<Connection> {
        let fd = match self {
            Self::Unix(listener, _) => std::os::fd::AsRawFd::as_raw_fd(listener),
            Self::Tcp(listener) => std::os::fd::AsRawFd::as_raw_fd(listener),
        };
        if let Some(timeout) = timeout {
            let mut poll = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            let millis = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
            // SAFETY: one valid pollfd, for the call's duration.
            let ready = unsafe { libc::poll(&mut poll, 1, millis) };
            if ready < 0 {
                return Err(io::Error::last_os_error());
            }
            if ready == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no sender connected in time",
                ));
            }
        }
        match self {
            Self::Unix(listener, _) => listener.accept().map(|(s, _)| Connection::Unix(s)),
            Self::Tcp(listener) => listener.accept().and_then(|(s, _)| {
                s.set_nodelay(true)?;
                Ok(Connection::Tcp(s))
            }),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Self::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The send buffer a unix connection asks for: a few MiB in flight lets
/// the sender run ahead of the reader instead of waking it for each 200
/// KiB (the kernel's default). The kernel caps it at `net.core.wmem_max`.
const UNIX_SEND_BUFFER_BYTES: usize = 4 << 20;

/// Asks for [`UNIX_SEND_BUFFER_BYTES`] of send buffer on `stream`; a
/// smaller buffer only means more wake-ups, so a refusal is ignored.
fn widen_send_buffer(stream: &UnixStream) {
    if let Err(err) = mmukit_sys::set_send_buffer_size(stream, UNIX_SEND_BUFFER_BYTES) {
        tracing::debug!(%err, "the send buffer keeps its size");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_follow_qemus_incoming_convention() {
        assert_eq!(
            "unix:/tmp/m.sock".parse::<Address>().unwrap(),
            Address::Unix("/tmp/m.sock".into())
        );
        assert_eq!(
            "tcp:127.0.0.1:4444".parse::<Address>().unwrap(),
            Address::Tcp {
                host: "127.0.0.1".into(),
                port: 4444
            }
        );
        assert_eq!(
            "tcp:[::1]:4444".parse::<Address>().unwrap().to_string(),
            "tcp:[::1]:4444"
        );
        for bad in [
            "",
            "unix:",
            "tcp:host",
            "tcp::80",
            "tcp:h:-1",
            "tcp:h:99999",
            "file:/x",
        ] {
            assert!(bad.parse::<Address>().is_err(), "{bad}");
        }
    }

    /// The send buffer a unix connection ends up with follows the kernel's
    /// `SO_SNDBUF` rule (`sk_setsockopt` in `net/core/sock.c`): the request
    /// is capped at `sysctl_wmem_max`, then doubled.
    #[test]
    fn unix_connections_ask_for_a_wide_send_buffer() {
        let dir = std::env::temp_dir().join(format!("mmukit-transport-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let address = Address::Unix(dir.join("wide.sock"));
        let listener = Listener::bind(&address).unwrap();
        let connection = Connection::connect(&address, Duration::from_secs(5)).unwrap();
        let Connection::Unix(stream) = &connection else {
            panic!("a unix address gives a unix connection");
        };
        let bytes = mmukit_sys::send_buffer_size(stream).unwrap();
        let cap = std::fs::read_to_string("/proc/sys/net/core/wmem_max")
            .ok()
            .and_then(|text| text.trim().parse::<usize>().ok());
        if let Some(cap) = cap {
            assert_eq!(bytes, 2 * UNIX_SEND_BUFFER_BYTES.min(cap));
        }
        drop(connection);
        drop(listener);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
