//! The destination side: accept a stream, let the caller judge its header
//! (and make memory for it), receive memory and state, and say so.
//!
//! Nothing received is trusted before its checksum matched, and a stream
//! that fails in any way is answered with a refusal (so a source that is
//! still there resumes its VM at once) and reported: the caller runs
//! nothing of it.

use std::io::BufReader;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::error::MigrateError;
use crate::format::{self, Header, PageSink, Reader, Record, Reply, Writer};
use crate::memory::GuestMemoryMap;
use crate::transport::{Connection, Listener};

/// The read buffer of a connection: a record's head and the start of its
/// contents in one read; longer contents go straight into guest memory.
const READ_BUFFER_BYTES: usize = 8 << 10;

/// The most threads [`Limits::default`] populates memory on. It takes
/// half the cores, the rest being the receivers' and the sender's: on two
/// cores a second populating thread only takes time from them.
const MAX_POPULATE_THREADS: usize = 4;

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
    /// Threads that populate guest memory a little ahead of the pages
    /// received, so that the receiving threads do not wait for the kernel
    /// to clear each new page (0: the receivers take each first touch
    /// themselves). Where the host backs fresh memory lazily (a guest
    /// whose hypervisor takes back free pages), first touches run faster
    /// on more threads.
    pub populate_threads: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_memory_bytes: u64::MAX,
            max_config_bytes: format::MAX_CONFIG_BYTES,
            timeout: Duration::from_secs(10),
            wait_for_sender: None,
            populate_threads: std::thread::available_parallelism()
                .map_or(1, |n| n.get() / 2)
                .clamp(1, MAX_POPULATE_THREADS),
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
        let progress = Progress::default();
        let outcomes: Vec<Result<StreamRead, MigrateError>> = std::thread::scope(|scope| {
            for _ in 0..self.limits.populate_threads {
                scope.spawn(|| populate_ahead(memory, &progress));
            }
            let outcomes = if streams.is_empty() {
                // SAFETY: the caller's guarantee; one sink, every chunk.
                let sink = unsafe { memory.sink(0, 1) };
                let mut sink = Tracked(sink, &progress);
                let read = read_memory(&mut control, &mut sink).map(|mut read| {
                    read.changed = control.mismatched_pages();
                    read
                });
                vec![read]
            } else {
                let parts = streams.len() as u32;
                let progress = &progress;
                let handles: Vec<_> = streams
                    .into_iter()
                    .enumerate()
                    .map(|(part, mut connection)| {
                        scope.spawn(move || {
                            // SAFETY: the caller's guarantee; each sink its
                            // own part of the chunks.
                            let sink = unsafe { memory.sink(part as u32, parts) };
                            let mut sink = Tracked(sink, progress);
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
            };
            progress.received.store(true, Ordering::Relaxed);
            outcomes
        });
        for outcome in outcomes {
            let read = outcome?;
            report.pages += read.pages;
            report.passes = report.passes.max(read.passes);
            report.bytes += read.bytes;
            report.pages_changed_in_flight += read.changed;
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

/// How far the receivers and the populating threads have come.
#[derive(Debug, Default)]
struct Progress {
    /// The end of the highest run of pages written (0: none yet).
    frontier: AtomicU64,
    /// Pages written (zero runs included).
    written: AtomicU64,
    /// Where the next step to populate starts: steps before it are claimed.
    claimed: AtomicU64,
    /// Pages populated.
    populated: AtomicU64,
    /// Every memory record is in: populating stops.
    received: AtomicBool,
}

/// A sink that keeps [`Progress`]'s `frontier` and `written`, for
/// [`populate_ahead`].
struct Tracked<'a, S>(S, &'a Progress);

impl<S: PageSink> PageSink for Tracked<'_, S> {
    fn pages_mut(&mut self, first_page: u64, count: u32) -> Option<&mut [u8]> {
        let pages = self.0.pages_mut(first_page, count)?;
        let progress = self.1;
        progress
            .frontier
            .fetch_max(first_page + u64::from(count), Ordering::Relaxed);
        progress
            .written
            .fetch_add(u64::from(count), Ordering::Relaxed);
        Some(pages)
    }
}

/// Pages [`populate_ahead`] populates at a time: one 2 MiB huge page.
const POPULATE_STEP_PAGES: u64 = 512;
/// How far ahead of the highest page received it populates, and how far
/// the pages it populated may outnumber those written: far enough that the
/// receivers find their pages ready, near enough that memory the source
/// skips (zero pages) costs little, however sparse the guest's.
const POPULATE_LEAD_PAGES: u64 = 16 * POPULATE_STEP_PAGES;

/// Takes the first touch of guest memory (the kernel clearing each new
/// page) off the receiving threads: populates memory in order, a step at a
/// time, a little ahead of the frontier, until every record is in or the
/// end of memory. Several threads may run it on one [`Progress`]; each
/// claims the next step and populates it. It waits while it has populated
/// [`POPULATE_LEAD_PAGES`] more than were written, so that a sparse guest
/// (runs of pages far apart, zero pages skipped between) does not become
/// wholly resident on the destination. Populating changes no contents, so
/// it may meet the receivers' writes anywhere. Memory that cannot be
/// populated this way is left to the receivers.
fn populate_ahead(memory: &GuestMemoryMap, progress: &Progress) {
    let end = memory.pages();
    while !progress.received.load(Ordering::Relaxed) {
        let next = progress.claimed.load(Ordering::Relaxed);
        if next >= end {
            return;
        }
        let front = progress.frontier.load(Ordering::Relaxed);
        if next < front {
            // The receivers passed it: their pages are in.
            let past = front.div_ceil(POPULATE_STEP_PAGES) * POPULATE_STEP_PAGES;
            let _ =
                progress
                    .claimed
                    .compare_exchange(next, past, Ordering::Relaxed, Ordering::Relaxed);
            continue;
        }
        let populated = progress.populated.load(Ordering::Relaxed);
        if next >= front + POPULATE_LEAD_PAGES
            || populated >= progress.written.load(Ordering::Relaxed) + POPULATE_LEAD_PAGES
        {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        let count = POPULATE_STEP_PAGES.min(end - next);
        if progress
            .claimed
            .compare_exchange(next, next + count, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            // Another thread claimed it first.
            continue;
        }
        progress.populated.fetch_add(count, Ordering::Relaxed);
        if let Err(err) = memory.populate(next, count) {
            tracing::debug!(%err, "guest memory does not populate: the receivers take its first touch");
            // Let every thread stop: what is left is the receivers'.
            progress.claimed.store(end, Ordering::Relaxed);
            return;
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use gmem::consts::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
    use gmem::{Backend, GmemConfig, GuestMemFile, View};

    use super::*;
    use crate::format::PAGE_SIZE;

    const BYTES: u64 = 128 << 20;

    fn memory() -> (GuestMemFile, Arc<View>) {
        let file = GuestMemFile::create(
            &Backend::Anonymous,
            GmemConfig {
                size: BYTES,
                flags: GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
                huge_page_size_log2: 0,
            },
        )
        .unwrap();
        let view = Arc::new(file.map(0, BYTES).unwrap());
        (file, view)
    }

    /// Pages of `view` that are resident.
    fn resident(view: &View) -> u64 {
        let mut vec = vec![0u8; (BYTES / PAGE_SIZE) as usize];
        // SAFETY: the view is mapped for BYTES; `vec` has a byte per page.
        let rc = unsafe { libc::mincore(view.as_ptr().cast(), BYTES as usize, vec.as_mut_ptr()) };
        assert_eq!(rc, 0);
        vec.iter().filter(|&&b| b & 1 != 0).count() as u64
    }

    /// Waits (up to 30 s) until at least `pages` of `view` are resident.
    fn wait_for_resident(view: &View, pages: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let now = resident(view);
            if now >= pages || Instant::now() > deadline {
                assert!(now >= pages, "{now} pages resident, waited for {pages}");
                return now;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Tells the populating threads to stop if a check fails (the thread
    /// unwinds), so that the test fails rather than hangs.
    struct StopOnPanic<'a>(&'a Progress);

    impl Drop for StopOnPanic<'_> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                self.0.received.store(true, Ordering::Relaxed);
            }
        }
    }

    /// Runs `threads` populating threads over `map` while `receivers`
    /// plays the receivers' part, then joins them: they must have ended by
    /// themselves or been told to by `receivers`.
    fn populating(
        map: &GuestMemoryMap,
        progress: &Progress,
        threads: u64,
        receivers: impl FnOnce(),
    ) {
        std::thread::scope(|scope| {
            let helpers: Vec<_> = (0..threads)
                .map(|_| scope.spawn(|| populate_ahead(map, progress)))
                .collect();
            {
                let _stop = StopOnPanic(progress);
                receivers();
            }
            for helper in helpers {
                helper.join().unwrap();
            }
        });
    }

    /// The receivers wrote `pages` pages ending at `frontier`.
    fn wrote(progress: &Progress, frontier: u64, pages: u64) {
        progress.written.fetch_add(pages, Ordering::Relaxed);
        progress.frontier.fetch_max(frontier, Ordering::Relaxed);
    }

    #[test]
    fn population_keeps_a_lead_on_the_frontier_and_stops_when_told() {
        const THREADS: u64 = 2;
        // Steps claimed at once may each end a step past the lead.
        const SLACK: u64 = THREADS * POPULATE_STEP_PAGES;
        let (_file, view) = memory();
        let map = GuestMemoryMap::new(vec![view.clone()]);
        let progress = Progress::default();
        populating(&map, &progress, THREADS, || {
            // Nothing received yet: they populate the lead and wait there.
            let first = wait_for_resident(&view, POPULATE_LEAD_PAGES);
            std::thread::sleep(Duration::from_millis(50));
            let waiting = resident(&view);
            assert!(
                waiting <= POPULATE_LEAD_PAGES + SLACK,
                "{waiting} pages populated before anything arrived ({first} a moment before)"
            );
            // The receivers wrote the lead: they follow, past it.
            wrote(&progress, POPULATE_LEAD_PAGES, POPULATE_LEAD_PAGES);
            let second = wait_for_resident(&view, 2 * POPULATE_LEAD_PAGES);
            std::thread::sleep(Duration::from_millis(50));
            let second = resident(&view).max(second);
            assert!(
                second <= 2 * POPULATE_LEAD_PAGES + SLACK,
                "{second} pages populated"
            );
            // Everything arrived: they stop waiting at the lead (the joins
            // return) without populating the rest of memory.
            progress.received.store(true, Ordering::Relaxed);
        });
        let last = resident(&view);
        assert!(
            last <= 2 * POPULATE_LEAD_PAGES + SLACK,
            "{last} pages populated"
        );
        assert_eq!(
            progress.claimed.load(Ordering::Relaxed) % POPULATE_STEP_PAGES,
            0,
            "steps are claimed whole"
        );
    }

    #[test]
    fn population_of_a_sparse_guest_stays_near_what_was_written() {
        let (_file, view) = memory();
        let map = GuestMemoryMap::new(vec![view.clone()]);
        let progress = Progress::default();
        let pages = BYTES / PAGE_SIZE;
        populating(&map, &progress, 2, || {
            // One page written in every lead's worth of memory, the rest
            // zero pages the source skips: the frontier walks through all
            // of memory with next to nothing written.
            let mut front = 0;
            while front < pages {
                front = (front + POPULATE_LEAD_PAGES).min(pages);
                wrote(&progress, front, 1);
                std::thread::sleep(Duration::from_millis(5));
            }
            progress.received.store(true, Ordering::Relaxed);
        });
        let written = progress.written.load(Ordering::Relaxed);
        let populated = resident(&view);
        assert!(
            populated <= written + POPULATE_LEAD_PAGES + 2 * POPULATE_STEP_PAGES,
            "{populated} pages populated for {written} written, of {pages}"
        );
    }

    #[test]
    fn population_ends_by_itself_at_the_end_of_memory() {
        let (_file, view) = memory();
        let map = GuestMemoryMap::new(vec![view.clone()]);
        let progress = Progress::default();
        let pages = BYTES / PAGE_SIZE;
        // A dense guest: the frontier walks through memory as the
        // receivers write every page; nothing tells the threads to stop,
        // so the joins return only because they reached the end.
        populating(&map, &progress, 3, || {
            let mut front = 0;
            while front < pages {
                let next = (front + POPULATE_STEP_PAGES).min(pages);
                wrote(&progress, next, next - front);
                front = next;
                std::thread::sleep(Duration::from_micros(300));
            }
        });
        assert!(progress.claimed.load(Ordering::Relaxed) >= pages);
    }
}
