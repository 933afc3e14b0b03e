//! The stream's own cost: 1 GiB of random guest memory moved in-process
//! over a unix socket by the [`Sender`] and [`Incoming`], against the same
//! bytes through a bare socket pair (one thread writing 1 MiB at a time,
//! one reading, no format and no checksum), both between memory touched
//! before, so that what the host does on first touch stays out of it.
//! The stream runs with one connection and with two, and the bare socket
//! with the kernel's default send buffer and with the 4 MiB the stream's
//! connections ask for; the runs alternate their order; the medians are
//! printed, with their ratio, and a 1-thread memcpy of 1 GiB.
//!
//! Run with `cargo bench -p mmukit-migrate --bench stream`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gmem::consts::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
use gmem::{Backend, GmemConfig, GuestMemFile, View};
use migrate::{
    Address, GuestMemoryMap, Header, Incoming, Limits, Listener, Quiescent, SendOptions, Sender,
};

const BYTES: u64 = 1 << 30;
const PAIRS: usize = 5;

/// 1 GiB of private anonymous guest memory, touched, with its one view.
fn memory(random: bool) -> (GuestMemFile, View) {
    let file = GuestMemFile::create(
        &Backend::PrivateAnonymous,
        GmemConfig {
            size: BYTES,
            flags: GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
            huge_page_size_log2: 0,
        },
    )
    .expect("guest memory");
    let view = file.map(0, BYTES).expect("a view");
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut block = vec![0x5au8; 1 << 20];
    for offset in (0..BYTES).step_by(block.len()) {
        if random {
            for word in block.chunks_exact_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                word.copy_from_slice(&state.to_ne_bytes());
            }
        }
        view.write_at(offset, &block).expect("filled");
    }
    (file, view)
}

/// One migration of `source` into `destination` over a unix socket, memory
/// on `streams` connections.
fn stream(source: &GuestMemoryMap, destination: &GuestMemoryMap, streams: u32) -> Duration {
    let path =
        std::env::temp_dir().join(format!("mmukit-bench-stream-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let address = Address::Unix(path.clone());
    let listener = Listener::bind(&address).expect("listening");
    let start = Instant::now();
    std::thread::scope(|scope| {
        let sender = scope.spawn(|| {
            let header = Header {
                streams: 0,
                session: 1,
                memory_bytes: source.bytes(),
                config: "{}".into(),
            };
            let options = SendOptions {
                streams,
                ..SendOptions::default()
            };
            let mut sender = Sender::connect(&address, header, options).expect("connected");
            let mut log = Quiescent {
                pages: source.pages(),
            };
            let precopy = sender
                .precopy(source, &mut log, &|| false, &|_| {})
                .expect("pre-copy");
            sender
                .switch_over(source, &mut log, precopy, &[], Instant::now())
                .expect("switch-over");
        });
        let incoming = Incoming::accept(&listener, Limits::default()).expect("a sender");
        // SAFETY: nothing else uses the destination memory while it runs.
        let received = unsafe { incoming.receive(destination) }.expect("received");
        received.taken_over().expect("taken over");
        sender.join().expect("the sender does not panic");
    });
    let elapsed = start.elapsed();
    drop(listener);
    let _ = std::fs::remove_file(&path);
    elapsed
}

/// The send buffer the stream's unix connections ask for.
const WIDE_SEND_BUFFER: usize = 4 << 20;

/// The same bytes through a bare socket pair, its writer's send buffer
/// `send_buffer` bytes (`None`: the kernel's default).
fn bare_socket(source: &View, destination: &View, send_buffer: Option<usize>) -> Duration {
    let (mut reader, mut writer) = UnixStream::pair().expect("a socket pair");
    if let Some(bytes) = send_buffer {
        mmukit_sys::set_send_buffer_size(&writer, bytes).expect("SO_SNDBUF");
    }
    // SAFETY: both views are ours, of `BYTES` bytes, and nothing else
    // touches them while this runs; the source is only read.
    let (from, to) = unsafe {
        (
            std::slice::from_raw_parts(source.as_ptr(), BYTES as usize),
            std::slice::from_raw_parts_mut(destination.as_ptr(), BYTES as usize),
        )
    };
    let start = Instant::now();
    std::thread::scope(|scope| {
        scope.spawn(move || {
            for chunk in from.chunks(1 << 20) {
                writer.write_all(chunk).expect("the reader reads");
            }
        });
        reader.read_exact(to).expect("the writer writes");
    });
    start.elapsed()
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn main() {
    if std::env::args().any(|arg| arg == "--list") {
        return;
    }
    let (_source_file, source_view) = memory(true);
    let (_destination_file, destination_view) = memory(false);
    let (source_view, destination_view) = (Arc::new(source_view), Arc::new(destination_view));
    let source = GuestMemoryMap::new(vec![source_view.clone()]);
    let destination = GuestMemoryMap::new(vec![destination_view.clone()]);
    let (mut ours, mut two) = (Vec::new(), Vec::new());
    let (mut bare, mut bare_wide) = (Vec::new(), Vec::new());
    for pair in 0..PAIRS {
        if pair % 2 == 0 {
            ours.push(stream(&source, &destination, 1));
            two.push(stream(&source, &destination, 2));
            bare.push(bare_socket(&source_view, &destination_view, None));
            bare_wide.push(bare_socket(
                &source_view,
                &destination_view,
                Some(WIDE_SEND_BUFFER),
            ));
        } else {
            bare_wide.push(bare_socket(
                &source_view,
                &destination_view,
                Some(WIDE_SEND_BUFFER),
            ));
            bare.push(bare_socket(&source_view, &destination_view, None));
            two.push(stream(&source, &destination, 2));
            ours.push(stream(&source, &destination, 1));
        }
    }
    let mut page = vec![0u8; 4096];
    let mut expected = vec![0u8; 4096];
    destination.read(12345, &mut page);
    source.read(12345, &mut expected);
    assert_eq!(page, expected, "the memory arrived");
    let from = vec![1u8; BYTES as usize];
    let mut to = vec![2u8; BYTES as usize];
    let copy = (0..3)
        .map(|_| {
            let start = Instant::now();
            to.copy_from_slice(std::hint::black_box(&from));
            std::hint::black_box(&mut to);
            start.elapsed()
        })
        .min()
        .expect("three runs");
    let (ours, two) = (median(ours), median(two));
    let (bare, bare_wide) = (median(bare), median(bare_wide));
    let mib_s = |time: Duration| 1024.0 / time.as_secs_f64();
    println!("1 GiB of random memory between touched memory, in-process, median of {PAIRS} pairs:");
    println!(
        "  stream (format, XXH3, 1 connection)   {ours:>10.1?}  {:>6.0} MiB/s",
        mib_s(ours)
    );
    println!(
        "  stream, 2 connections                 {two:>10.1?}  {:>6.0} MiB/s",
        mib_s(two)
    );
    println!(
        "  bare unix socket, default buffer      {bare:>10.1?}  {:>6.0} MiB/s",
        mib_s(bare)
    );
    println!(
        "  bare unix socket, 4 MiB send buffer   {bare_wide:>10.1?}  {:>6.0} MiB/s",
        mib_s(bare_wide)
    );
    println!(
        "  memcpy (1 thread)                     {copy:>10.1?}  {:>6.0} MiB/s",
        mib_s(copy)
    );
    println!(
        "  stream / bare socket (4 MiB buffer) {:.2}x; stream / memcpy {:.2}x",
        ours.as_secs_f64() / bare_wide.as_secs_f64(),
        ours.as_secs_f64() / copy.as_secs_f64()
    );
}
