//! The destination side: accept a stream, let the caller judge its header
//! (and make memory for it), receive memory and state, and say so.
//!
//! Nothing received is trusted before its checksum matched, and a stream
//! that fails in any way is answered with a refusal (so a source that is
//! still there resumes its VM at once) and reported: the caller runs
//! nothing of it.

use std::io::BufReader;
use std::time::{Duration, Instant};

use crate::error::MigrateError;
use crate::format::{self, Header, PageSink, Reader, Record, Reply, Writer};
use crate::memory::GuestMemoryMap;
use crate::transport::{Connection, Listener};

/// The read buffer of a connection: a record's head and the start of its
/// contents in one read; longer contents go straight into guest memory.
const READ_BUFFER_BYTES: usize = 8 << 10;

/// What a destination accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The most guest memory a stream may announce (what the host can
    /// give), checked before anything is allocated.
    pub max_memory_bytes: u64,
    /// The longest configuration.
    pub max_config_bytes: u32,
    /// How long a silent sender is waited for before the stream counts
    /// as stopped.
    pub timeout: Duration,
    /// How long to wait for the sender to connect (`None`: as long as it
    /// takes).
    pub wait_for_sender: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_memory_bytes: u64::MAX,
            max_config_bytes: format::MAX_CONFIG_BYTES,
            timeout: Duration::from_secs(10),
            wait_for_sender: None,
        }
    }
}

/// What a destination received.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReceiveReport {
    /// Pages written, zero runs included.
    pub pages: u64,
    /// Passes over memory the source made.
    pub passes: u32,
    /// Bytes read on every connection.
    pub bytes: u64,
    /// From the accept of the header to the end marker.
    pub seconds: f64,
    /// Pages that arrived changed after the source took their checksum
    /// (the guest wrote them while they were sent) and came again in a
    /// later pass.
    pub pages_changed_in_flight: u64,
}

/// An accepted stream whose header the caller may now judge.
#[derive(Debug)]
pub struct Incoming<'a> {
    listener: &'a Listener,
    control: Connection,
    header: Header,
    limits: Limits,
    header_bytes: u64,
}

/// A stream received whole: its state, for the caller to load before it
/// says [`taken_over`](Received::taken_over).
#[derive(Debug)]
pub struct Received {
    control: Connection,
    /// The named state sections, in the order sent.
    pub state: Vec<(String, Vec<u8>)>,
    /// What arrived.
    pub report: ReceiveReport,
}

impl<'a> Incoming<'a> {
    /// Accepts a sender on `listener` and reads its header; a header over
    /// `limits` is refused (and the sender told).
    pub fn accept(listener: &'a Listener, limits: Limits) -> Result<Self, MigrateError> {
        let mut control = listener
            .accept(limits.wait_for_sender)
            .map_err(MigrateError::listen("accepting the sender"))?;
        control
            .set_read_timeout(Some(limits.timeout))
            .map_err(MigrateError::listen("setting a timeout"))?;
        let mut reader = Reader::new(&mut control);
        let header = match reader.header(limits.max_config_bytes) {
            Ok(header) => header,
            Err(err) => {
                refuse(&mut control, &err.to_string());
                return Err(err.into());
            }
        };
        let header_bytes = reader.position();
        if header.memory_bytes > limits.max_memory_bytes {
            let err = MigrateError::TooMuchMemory {
                bytes: header.memory_bytes,
                limit: limits.max_memory_bytes,
            };
            refuse(&mut control, &err.to_string());
            return Err(err);
        }
        Ok(Self {
            listener,
            control,
            header,
            limits,
            header_bytes,
        })
    }

    /// The stream's header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Refuses the stream: the sender resumes its VM.
    pub fn refuse(mut self, why: &str) {
        refuse(&mut self.control, why);
    }

    /// Accepts the header and receives memory into `memory` and the state.
    ///
    /// # Safety
    ///
    /// Nothing else may read or write `memory` until this returns (no
    /// vCPU runs on it).
    pub unsafe fn receive(mut self, memory: &GuestMemoryMap) -> Result<Received, MigrateError> {
        let start = Instant::now();
        let outcome = (|| {
            if memory.bytes() != self.header.memory_bytes {
                return Err(MigrateError::MemorySize {
                    announced: self.header.memory_bytes,
                    local: memory.bytes(),
                });
            }
            Writer::new(&mut self.control)
                .reply(&Reply::Accept)
                .map_err(MigrateError::send("the accept"))?;
            let streams = self.accept_streams()?;
            // SAFETY: the caller gives us the memory alone; each memory
            // connection's sink writes only its own chunks.
            unsafe { self.read_all(memory, streams) }
        })();
        match outcome {
            Ok((state, mut report)) => {
                report.seconds = start.elapsed().as_secs_f64();
                Ok(Received {
                    control: self.control,
                    state,
                    report,
                })
            }
            Err(err) => {
                refuse(&mut self.control, &err.to_string());
                Err(err)
            }
        }
    }

    /// The extra memory connections the header announced, in index order.
    fn accept_streams(&self) -> Result<Vec<Connection>, MigrateError> {
        let count = self.header.streams;
        let mut streams: Vec<Option<Connection>> = (0..count).map(|_| None).collect();
        for _ in 0..count {
            let mut connection = self
                .listener
                .accept(Some(self.limits.timeout))
                .map_err(MigrateError::listen("accepting a memory connection"))?;
            connection
                .set_read_timeout(Some(self.limits.timeout))
                .map_err(MigrateError::listen("setting a timeout"))?;
            let (session, index) = Reader::new(&mut connection).hello()?;
            let why = if session != self.header.session {
                Some("its session is another stream's")
            } else if index >= count {
                Some("its index is past the announced count")
            } else if streams[index as usize].is_some() {
                Some("its index came twice")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(MigrateError::Connection {
                    index,
                    session,
                    why,
                });
            }
            streams[index as usize] = Some(connection);
        }
        Ok(streams
            .into_iter()
            .map(|s| s.expect("each index once"))
            .collect())
    }

    /// Reads memory (on the main connection, or one thread per memory
    /// connection) and then the state and the end from the main one.
    ///
    /// # Safety
    ///
    /// As [`receive`](Self::receive).
    unsafe fn read_all(
        &mut self,
        memory: &GuestMemoryMap,
        streams: Vec<Connection>,
    ) -> Result<(StateSections, ReceiveReport), MigrateError> {
        let mut report = ReceiveReport::default();
        let mut control = Reader::new(BufReader::with_capacity(
            READ_BUFFER_BYTES,
            &mut self.control,
        ));
        if streams.is_empty() {
            // SAFETY: the caller's guarantee; one sink, every chunk.
            let mut sink = unsafe { memory.sink(0, 1) };
            let read = read_memory(&mut control, &mut sink)?;
            report.pages = read.pages;
            report.passes = read.passes;
            report.pages_changed_in_flight = control.mismatched_pages();
        } else {
            let parts = streams.len() as u32;
            let outcomes: Vec<Result<StreamRead, MigrateError>> = std::thread::scope(|scope| {
                let handles: Vec<_> = streams
                    .into_iter()
                    .enumerate()
                    .map(|(part, mut connection)| {
                        scope.spawn(move || {
                            // SAFETY: the caller's guarantee; each sink its
                            // own part of the chunks.
                            let mut sink = unsafe { memory.sink(part as u32, parts) };
                            let mut reader = Reader::new(BufReader::with_capacity(
                                READ_BUFFER_BYTES,
                                &mut connection,
                            ));
                            let mut read = read_memory(&mut reader, &mut sink)?;
                            read.bytes = reader.position();
                            read.changed = reader.mismatched_pages();
                            Ok(read)
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("receiver threads do not panic"))
                    .collect()
            });
            for outcome in outcomes {
                let read = outcome?;
                report.pages += read.pages;
                report.passes = report.passes.max(read.passes);
                report.bytes += read.bytes;
                report.pages_changed_in_flight += read.changed;
            }
        }
        let mut state = Vec::new();
        let mut no_memory = NoMemory;
        loop {
            match control.record(&mut no_memory)? {
                Record::State { name, data } => state.push((name, data)),
                Record::Done { passes, pages } => {
                    if pages != report.pages {
                        return Err(MigrateError::Incomplete {
                            announced: pages,
                            received: report.pages,
                        });
                    }
                    report.passes = passes;
                    break;
                }
                _ => {
                    return Err(MigrateError::Protocol(
                        "memory after the end of memory on the main connection",
                    ));
                }
            }
        }
        report.bytes += control.position() + self.header_bytes;
        Ok((state, report))
    }
}

impl Received {
    /// Tells the source that the destination runs the VM now: the source
    /// stops.
    pub fn taken_over(mut self) -> Result<(), MigrateError> {
        Writer::new(&mut self.control)
            .reply(&Reply::TakenOver)
            .map_err(MigrateError::send("the take-over"))
    }

    /// Refuses the VM after all (its state would not load): the source
    /// resumes it.
    pub fn refuse(mut self, why: &str) {
        refuse(&mut self.control, why);
    }
}

/// Named state sections, in the order sent.
type StateSections = Vec<(String, Vec<u8>)>;

/// What one connection carried.
struct StreamRead {
    pages: u64,
    passes: u32,
    bytes: u64,
    /// Pages that arrived changed (and came again).
    changed: u64,
}

/// Reads page records into `sink` until the connection's end, checking
/// that passes only go forward and that the end counts what came.
fn read_memory<R: std::io::Read>(
    reader: &mut Reader<R>,
    sink: &mut dyn PageSink,
) -> Result<StreamRead, MigrateError> {
    let mut read = StreamRead {
        pages: 0,
        passes: 0,
        bytes: 0,
        changed: 0,
    };
    loop {
        match reader.record(sink)? {
            Record::Pages { count, .. } | Record::Zeros { count, .. } => {
                read.pages += u64::from(count);
            }
            Record::PassEnd { pass } => {
                if pass != read.passes {
                    return Err(MigrateError::Protocol("passes out of order"));
                }
                read.passes += 1;
            }
            Record::StreamEnd { pages } => {
                if pages != read.pages {
                    return Err(MigrateError::Incomplete {
                        announced: pages,
                        received: read.pages,
                    });
                }
                return Ok(read);
            }
            Record::State { .. } | Record::Done { .. } => {
                return Err(MigrateError::Protocol(
                    "state or the end before the end of memory",
                ));
            }
        }
    }
}

/// A sink that takes no pages: memory records where none may come.
struct NoMemory;

impl PageSink for NoMemory {
    fn pages_mut(&mut self, _: u64, _: u32) -> Option<&mut [u8]> {
        None
    }
}

/// Tells the sender no, if it still listens.
fn refuse(control: &mut Connection, why: &str) {
    if let Err(err) = Writer::new(&mut *control).reply(&Reply::Refused(why.into())) {
        tracing::debug!(%err, "the sender did not hear the refusal");
    }
}
