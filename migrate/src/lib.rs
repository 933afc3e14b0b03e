//! # mmukit-migrate
//!
//! Live migration of a VM's memory over the dirty log, for a Rust VMM:
//!
//! - [`mod@format`]: the stream (version 2, specified in `STREAM.md`): a
//!   header with the configuration, page records (a CRC-32 over each head,
//!   an XXH3 checksum per page), state sections, an end marker, and the
//!   destination's replies. The reader refuses anything malformed,
//!   truncated, foreign or damaged, and owes a page that arrived changed
//!   until a later record settles it.
//! - [`dirty`]: where dirtied pages come from: [`KvmDirtyLog`] (KVM's log,
//!   manual protect where offered) and [`SoftDirtyLog`] (mmukit's software
//!   MMU), behind the [`DirtyLog`] trait.
//! - [`Sender`]: pre-copy until what is left fits the allowed downtime,
//!   then the switch-over with the caller's device state; [`Incoming`] and
//!   [`Received`] the destination's side.
//! - [`GuestMemoryMap`]: guest memory in memslot order, over gmem regions
//!   or views; [`Address`], [`Listener`] and [`Connection`]: `unix:PATH`
//!   and `tcp:HOST:PORT`, with several connections for memory.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Instant;
//! use gmem::consts::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
//! use gmem::{Backend, GmemConfig, GuestMemFile};
//! use migrate::{Address, GuestMemoryMap, Header, Incoming, Limits, Listener, Quiescent,
//!               SendOptions, Sender};
//!
//! let memory = |byte: u8| -> Result<GuestMemoryMap, gmem::GmemError> {
//!     let file = GuestMemFile::create(&Backend::Anonymous, GmemConfig {
//!         size: 4 << 20, flags: GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
//!         huge_page_size_log2: 0,
//!     })?;
//!     let view = file.map(0, 4 << 20)?;
//!     view.fill(0x1000, 0x1000, byte)?;
//!     Ok(GuestMemoryMap::new(vec![Arc::new(view)]))
//! };
//! let path = std::env::temp_dir().join(format!("mmukit-doc-{}.sock", std::process::id()));
//! let address = Address::Unix(path);
//! let listener = Listener::bind(&address)?;
//! let source = memory(0x5a)?;
//! let sender = std::thread::spawn(move || -> Result<(), migrate::MigrateError> {
//!     let header = Header { streams: 0, session: 0, memory_bytes: source.bytes(), config: "{}".into() };
//!     let mut sender = Sender::connect(&address, header, SendOptions::default())?;
//!     let mut log = Quiescent { pages: source.pages() };
//!     let precopy = sender.precopy(&source, &mut log, &|| false, &|_| {})?;
//!     let state = [("cpu".to_string(), vec![1, 2, 3])];
//!     sender.switch_over(&source, &mut log, precopy, &state, Instant::now())?;
//!     Ok(())
//! });
//! let incoming = Incoming::accept(&listener, Limits::default())?;
//! let destination = memory(0)?;
//! // SAFETY: no vCPU runs on the destination's memory yet.
//! let received = unsafe { incoming.receive(&destination)? };
//! assert_eq!(received.state[0].1, [1, 2, 3]);
//! received.taken_over()?;
//! sender.join().unwrap()?;
//! let mut page = vec![0; 4096];
//! destination.read(1, &mut page);
//! assert!(page.iter().all(|&b| b == 0x5a));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod dirty;
mod error;
pub mod format;
mod memory;
mod receive;
mod send;
mod transport;

pub use dirty::{DirtyLog, DirtyLogError, KvmDirtyLog, Quiescent, SoftDirtyLog};
pub use error::MigrateError;
pub use format::{Header, StreamError};
pub use memory::{GuestMemoryMap, HostMemory, MemorySink};
pub use receive::{Incoming, Limits, ReceiveReport, Received};
pub use send::{PassReport, Precopy, SendOptions, SendReport, Sender};
pub use transport::{Address, AddressError, Connection, Listener};
