//! The source side: pre-copy over the dirty log, then the switch-over.
//!
//! [`Sender::connect`] sends the header and waits for the destination to
//! accept it. [`Sender::precopy`] starts the dirty log, sends all memory
//! once (skipping zero pages, which the destination's fresh memory already
//! holds), then the pages each pass dirtied, until what is left would take
//! less than the allowed downtime at the rate measured, or the pass limit
//! is reached, or the workload ended. The caller then stops its vCPUs and
//! calls [`Sender::switch_over`] with the device state: the last dirty
//! pages, the state, the end marker, and the destination's word that it
//! took over. Any error leaves the VM the caller's to resume.

use std::io::{BufWriter, Write as _};
use std::os::fd::AsFd as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mmukit_sys::splice::{PageSplicer, SpliceError};

use crate::dirty::{DirtyLog, count};
use crate::error::MigrateError;
use crate::format::{CHUNK_PAGES, Header, PAGE_SIZE, Reader, Reply, Writer};
use crate::memory::GuestMemoryMap;
use crate::transport::{Address, Connection};

/// How a migration runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SendOptions {
    /// Switch over once what is left would take less than this to send.
    pub max_downtime: Duration,
    /// Switch over after this many passes after the full copy, converged
    /// or not.
    pub max_iterations: u32,
    /// Bytes per second at most (`None`: as fast as the connection goes).
    pub bandwidth: Option<u64>,
    /// Connections that carry memory; with one, memory travels on the main
    /// connection.
    pub streams: u32,
    /// How long to wait for the destination to listen and to answer.
    pub patience: Duration,
    /// Splice pages from guest memory into the connections, so that the
    /// source copies nothing (the destination's read is the one copy);
    /// memory the kernel will not splice is written instead. `false`
    /// always writes (the kernel copies the pages into the socket).
    pub zero_copy: bool,
}

impl Default for SendOptions {
    fn default() -> Self {
        Self {
            max_downtime: Duration::from_millis(300),
            max_iterations: 30,
            bandwidth: None,
            streams: 1,
            patience: Duration::from_secs(10),
            zero_copy: true,
        }
    }
}

/// One pass over memory.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PassReport {
    /// 0 for the full copy, then 1, 2, ... ; the last is the switch-over.
    pub pass: u32,
    /// Pages sent (zero runs included).
    pub pages: u64,
    /// Pages skipped or sent as zeros.
    pub zero_pages: u64,
    /// Bytes written on the connections.
    pub bytes: u64,
    /// Seconds the pass took.
    pub seconds: f64,
    /// Pages the guest dirtied per second while the pass ran.
    pub dirty_pages_per_s: f64,
}

/// What a migration did, for the source's report.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SendReport {
    /// Connecting and the header's answer (the destination prepares its
    /// memory before it answers).
    pub setup_s: f64,
    /// From connecting to the destination's word: the setup, every pass and
    /// the switch-over.
    pub total_s: f64,
    /// From the vCPUs' stop to the destination's word.
    pub downtime_s: f64,
    /// Every pass, the switch-over last.
    pub passes: Vec<PassReport>,
    /// Zero pages of the full copy that were not sent at all.
    pub zero_pages_skipped: u64,
    /// Bytes written on every connection.
    pub bytes: u64,
    /// Whether what was left fit the downtime before the pass limit.
    pub converged: bool,
}

impl SendReport {
    /// Bytes per second over the whole migration.
    pub fn throughput(&self) -> f64 {
        if self.total_s > 0.0 {
            self.bytes as f64 / self.total_s
        } else {
            0.0
        }
    }
}

/// The pre-copy's outcome: the pages dirtied but not yet sent.
#[derive(Debug)]
pub struct Precopy {
    pending: Vec<u64>,
    started: Instant,
    report: SendReport,
}

impl Precopy {
    /// The report so far.
    pub fn report(&self) -> &SendReport {
        &self.report
    }
}

/// The source's side of one migration.
#[derive(Debug)]
pub struct Sender {
    control: Connection,
    /// The connections that carry memory (the main one when alone).
    memory: Vec<Connection>,
    options: SendOptions,
    setup_s: f64,
    /// Page records each memory connection carried so far.
    stream_pages: Vec<u64>,
}

/// Bytes written, shared by the connections' threads to keep to the
/// bandwidth.
struct Budget {
    start: Instant,
    bytes: AtomicU64,
    limit: Option<u64>,
}

impl Budget {
    fn spend(&self, bytes: u64) {
        let total = self.bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if let Some(limit) = self.limit {
            let due = Duration::from_secs_f64(total as f64 / limit as f64);
            let elapsed = self.start.elapsed();
            if due > elapsed {
                std::thread::sleep(due - elapsed);
            }
        }
    }
}

impl Sender {
    /// Connects to `address`, sends `header` (its `streams` and `session`
    /// are set here) and waits for the destination to accept it.
    pub fn connect(
        address: &Address,
        mut header: Header,
        options: SendOptions,
    ) -> Result<Self, MigrateError> {
        let start = Instant::now();
        let streams = options.streams.clamp(1, crate::format::MAX_STREAMS);
        header.streams = if streams > 1 { streams } else { 0 };
        header.session = session_id();
        let connect = |what| {
            Connection::connect(address, options.patience).map_err(|source| MigrateError::Connect {
                address: address.to_string(),
                what,
                source,
            })
        };
        let mut control = connect("the main connection")?;
        control
            .set_read_timeout(Some(options.patience))
            .map_err(MigrateError::send("setting a timeout"))?;
        Writer::new(&mut control)
            .header(&header)
            .map_err(MigrateError::send("the header"))?;
        let mut memory = Vec::new();
        for index in 0..header.streams {
            let mut connection = connect("a memory connection")?;
            Writer::new(&mut connection)
                .hello(header.session, index)
                .map_err(MigrateError::send("a memory connection's hello"))?;
            memory.push(connection);
        }
        match Reader::new(&mut control).reply()? {
            Reply::Accept => {}
            Reply::Refused(why) => return Err(MigrateError::Refused(why)),
            Reply::TakenOver => {
                return Err(MigrateError::Protocol(
                    "the destination took over before any memory was sent",
                ));
            }
        }
        if memory.is_empty() {
            memory.push(
                control
                    .try_clone()
                    .map_err(MigrateError::send("the main connection"))?,
            );
        }
        Ok(Self {
            stream_pages: vec![0; memory.len()],
            control,
            memory,
            options,
            setup_s: start.elapsed().as_secs_f64(),
        })
    }

    /// Sends all of `memory` and then what `log` says was dirtied, pass
    /// after pass, until the rest fits the downtime, the pass limit is
    /// reached, or `finished()` says the workload ended. `progress` sees
    /// each pass as it ends.
    pub fn precopy(
        &mut self,
        memory: &GuestMemoryMap,
        log: &mut dyn DirtyLog,
        finished: &dyn Fn() -> bool,
        progress: &dyn Fn(&PassReport),
    ) -> Result<Precopy, MigrateError> {
        let outcome = self.precopy_passes(memory, log, finished, progress);
        outcome.map_err(|err| self.why(err))
    }

    /// A write that failed because the destination refused the stream
    /// (and closed it) is reported with the destination's reason.
    fn why(&mut self, err: MigrateError) -> MigrateError {
        if !matches!(err, MigrateError::Send { .. }) {
            return err;
        }
        let _ = self.control.set_read_timeout(Some(Duration::from_secs(1)));
        match Reader::new(&mut self.control).reply() {
            Ok(Reply::Refused(why)) => MigrateError::Refused(why),
            _ => err,
        }
    }

    fn precopy_passes(
        &mut self,
        memory: &GuestMemoryMap,
        log: &mut dyn DirtyLog,
        finished: &dyn Fn() -> bool,
        progress: &dyn Fn(&PassReport),
    ) -> Result<Precopy, MigrateError> {
        let started = Instant::now();
        let mut report = SendReport {
            setup_s: self.setup_s,
            ..SendReport::default()
        };
        log.start()?;
        let everything = vec![u64::MAX; memory.pages().div_ceil(64) as usize];
        let mut pass_report = self.send_pass(memory, &everything, 0, true)?;
        report.zero_pages_skipped = pass_report.zero_pages;
        let mut pending = log.harvest()?;
        pass_report.dirty_pages_per_s = count(&pending) as f64 / pass_report.seconds.max(1e-9);
        progress(&pass_report);
        report.passes.push(pass_report);
        loop {
            let last = report.passes.last().expect("the full copy");
            let rate = if last.seconds > 0.0 {
                last.bytes as f64 / last.seconds
            } else {
                f64::INFINITY
            };
            let left = count(&pending) * PAGE_SIZE;
            let estimate = Duration::from_secs_f64((left as f64 / rate).min(1e9));
            if estimate <= self.options.max_downtime {
                report.converged = true;
                break;
            }
            if finished() {
                // The workload ended: its vCPUs stop now, whatever is left.
                break;
            }
            let pass = report.passes.len() as u32;
            if pass > self.options.max_iterations {
                tracing::debug!(pass, left, "pass limit reached without converging");
                break;
            }
            let mut pass_report = self.send_pass(memory, &pending, pass, false)?;
            pending = log.harvest()?;
            pass_report.dirty_pages_per_s = count(&pending) as f64 / pass_report.seconds.max(1e-9);
            progress(&pass_report);
            report.passes.push(pass_report);
        }
        Ok(Precopy {
            pending,
            started,
            report,
        })
    }

    /// With the vCPUs stopped at `stopped`: sends what is still dirty,
    /// then `state` (named sections), then the end, and waits for the
    /// destination to take over.
    pub fn switch_over(
        mut self,
        memory: &GuestMemoryMap,
        log: &mut dyn DirtyLog,
        precopy: Precopy,
        state: &[(String, Vec<u8>)],
        stopped: Instant,
    ) -> Result<SendReport, MigrateError> {
        let outcome = self.send_rest(memory, log, precopy, state, stopped);
        outcome.map_err(|err| self.why(err))
    }

    fn send_rest(
        &mut self,
        memory: &GuestMemoryMap,
        log: &mut dyn DirtyLog,
        precopy: Precopy,
        state: &[(String, Vec<u8>)],
        stopped: Instant,
    ) -> Result<SendReport, MigrateError> {
        let Precopy {
            mut pending,
            started,
            mut report,
        } = precopy;
        let last = log.harvest()?;
        for (word, more) in pending.iter_mut().zip(&last) {
            *word |= more;
        }
        if let Err(err) = log.stop() {
            tracing::debug!(%err, "stopping the dirty log at the switch-over");
        }
        let pass = report.passes.len() as u32;
        let pass_report = self.send_pass(memory, &pending, pass, false)?;
        report.passes.push(pass_report);
        for (connection, pages) in self.memory.iter_mut().zip(&self.stream_pages) {
            Writer::new(connection)
                .stream_end(*pages)
                .map_err(MigrateError::send("a connection's end"))?;
        }
        let pages: u64 = self.stream_pages.iter().sum();
        let mut writer = Writer::new(std::io::BufWriter::new(&mut self.control));
        for (name, data) in state {
            writer
                .state(name, data)
                .map_err(MigrateError::send("a state section"))?;
        }
        writer
            .done(report.passes.len() as u32, pages)
            .map_err(MigrateError::send("the end"))?;
        writer.flush().map_err(MigrateError::send("the end"))?;
        drop(writer);
        let reply = Reader::new(&mut self.control).reply()?;
        report.downtime_s = stopped.elapsed().as_secs_f64();
        // From the connection on: the setup (header, the destination's
        // preparation, accept) counts, as QEMU's `total-time` counts it.
        report.total_s = self.setup_s + started.elapsed().as_secs_f64();
        report.bytes = report.passes.iter().map(|p| p.bytes).sum();
        match reply {
            Reply::TakenOver => Ok(report),
            Reply::Refused(why) => Err(MigrateError::Refused(why)),
            Reply::Accept => Err(MigrateError::Protocol(
                "the destination answered the end with an accept",
            )),
        }
    }

    /// Sends the pages set in `bitmap`, each connection its chunks, and
    /// ends the pass on every connection. With `skip_zeros` (the full
    /// copy) zero pages are not sent at all; later passes send them as
    /// zero runs, since the guest may have zeroed a page it wrote before.
    fn send_pass(
        &mut self,
        memory: &GuestMemoryMap,
        bitmap: &[u64],
        pass: u32,
        skip_zeros: bool,
    ) -> Result<PassReport, MigrateError> {
        let start = Instant::now();
        let budget = Budget {
            start,
            bytes: AtomicU64::new(0),
            limit: self.options.bandwidth,
        };
        let parts = self.memory.len() as u64;
        let zero_copy = self.options.zero_copy;
        let outcomes: Vec<Result<StreamPass, MigrateError>> = if parts == 1 {
            vec![send_chunks(
                &mut self.memory[0],
                memory,
                bitmap,
                (0, 1),
                (pass, skip_zeros, zero_copy),
                &budget,
            )]
        } else {
            std::thread::scope(|scope| {
                let handles: Vec<_> = self
                    .memory
                    .iter_mut()
                    .enumerate()
                    .map(|(part, connection)| {
                        let budget = &budget;
                        scope.spawn(move || {
                            send_chunks(
                                connection,
                                memory,
                                bitmap,
                                (part as u64, parts),
                                (pass, skip_zeros, zero_copy),
                                budget,
                            )
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("sender threads do not panic"))
                    .collect()
            })
        };
        let mut report = PassReport {
            pass,
            ..PassReport::default()
        };
        for (index, outcome) in outcomes.into_iter().enumerate() {
            let sent = outcome?;
            report.pages += sent.pages;
            report.zero_pages += sent.zero_pages;
            report.bytes += sent.bytes;
            self.stream_pages[index] += sent.pages;
        }
        report.seconds = start.elapsed().as_secs_f64();
        Ok(report)
    }
}

/// What one connection sent in a pass.
struct StreamPass {
    pages: u64,
    zero_pages: u64,
    bytes: u64,
}

/// Sends the chunks of `bitmap` that fall to `(part, parts)` on
/// `connection`, then the pass's end. Pages go straight from guest memory:
/// each record's checksum is taken from memory the guest may be writing,
/// and the contents are spliced (or written) after it; a page the guest
/// changed in between no longer matches, and the destination owes it until
/// the next pass sends it again, as the dirty log makes it.
fn send_chunks(
    connection: &mut Connection,
    memory: &GuestMemoryMap,
    bitmap: &[u64],
    (part, parts): (u64, u64),
    (pass, skip_zeros, zero_copy): (u32, bool, bool),
    budget: &Budget,
) -> Result<StreamPass, MigrateError> {
    let mut writer = Writer::new(BufWriter::with_capacity(64 << 10, connection));
    let mut sent = StreamPass {
        pages: 0,
        zero_pages: 0,
        bytes: 0,
    };
    let mut splicer = if zero_copy {
        PageSplicer::new()
            .inspect_err(|err| tracing::debug!(%err, "no pipe to splice through: writing pages"))
            .ok()
    } else {
        None
    };
    let chunks = memory.pages().div_ceil(CHUNK_PAGES);
    let send = |what| MigrateError::send(what);
    for chunk in (part..chunks).step_by(parts as usize) {
        if chunk_bits(bitmap, chunk) == 0 {
            continue;
        }
        let end = ((chunk + 1) * CHUNK_PAGES).min(memory.pages());
        let mut page = chunk * CHUNK_PAGES;
        while page < end {
            if !is_set(bitmap, page) {
                page += 1;
                continue;
            }
            let mut run = 1;
            while page + run < end && is_set(bitmap, page + run) {
                run += 1;
            }
            let run = memory.run_from(page, run);
            // SAFETY: the run lies in one range and the map keeps its
            // mapping alive. The guest may write these pages while the
            // slice lives: it is only read, to find zero pages, to take
            // the checksum and to send it, and whatever a read sees is
            // judged by the destination against that checksum.
            let bytes = unsafe { memory.racy_pages(page, run) };
            let before = writer.written();
            let mut at = 0;
            while at < run {
                let zero = is_zero(page_of(bytes, at));
                let mut len = 1;
                while at + len < run && is_zero(page_of(bytes, at + len)) == zero {
                    len += 1;
                }
                if zero {
                    sent.zero_pages += len;
                    if !skip_zeros {
                        writer
                            .zeros(page + at, len as u32)
                            .map_err(send("a zero record"))?;
                        sent.pages += len;
                    }
                } else {
                    let data = &bytes[(at * PAGE_SIZE) as usize..((at + len) * PAGE_SIZE) as usize];
                    writer
                        .pages_with(page + at, data, |out, data| {
                            send_contents(out, data, &mut splicer)
                        })
                        .map_err(send("a page record"))?;
                    sent.pages += len;
                }
                at += len;
            }
            budget.spend(writer.written() - before);
            page += run;
        }
    }
    writer.pass_end(pass).map_err(send("a pass end"))?;
    writer.flush().map_err(send("a pass end"))?;
    sent.bytes = writer.written();
    Ok(sent)
}

/// Puts a page record's contents on the connection after its head:
/// spliced, or written where there is no splicer or the kernel refuses
/// this memory (then the connection writes from here on).
fn send_contents(
    out: &mut BufWriter<&mut Connection>,
    data: &[u8],
    splicer: &mut Option<PageSplicer>,
) -> std::io::Result<()> {
    let Some(pipe) = splicer else {
        return out.write_all(data);
    };
    // The head, still in the buffer, goes first.
    out.flush()?;
    match pipe.send(out.get_ref().as_fd(), data) {
        Ok(()) => Ok(()),
        Err(SpliceError::Refused { sent, source }) => {
            tracing::debug!(%source, "the kernel will not splice guest memory: writing pages");
            *splicer = None;
            out.write_all(&data[sent..])
        }
        Err(SpliceError::Socket(err)) => Err(err),
    }
}

fn is_set(bitmap: &[u64], page: u64) -> bool {
    bitmap
        .get((page / 64) as usize)
        .is_some_and(|word| word & (1 << (page % 64)) != 0)
}

fn page_of(bytes: &[u8], page: u64) -> &[u8] {
    &bytes[(page * PAGE_SIZE) as usize..((page + 1) * PAGE_SIZE) as usize]
}

/// Whether a page holds only zeros.
fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(64).all(|line| {
        line.chunks_exact(8).fold(0u64, |acc, word| {
            acc | u64::from_ne_bytes(word.try_into().expect("8 bytes"))
        }) == 0
    })
}

/// A session id no other migration on this host is likely to share.
fn session_id() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 32)
}

/// Pages of `bitmap` in chunk `chunk` (at most [`CHUNK_PAGES`]).
fn chunk_bits(bitmap: &[u64], chunk: u64) -> u64 {
    // Chunks are 256 pages: four words.
    let first = (chunk * CHUNK_PAGES / 64) as usize;
    bitmap
        .get(first..(first + 4).min(bitmap.len()))
        .map_or(0, |words| {
            words.iter().map(|w| u64::from(w.count_ones())).sum()
        })
}
