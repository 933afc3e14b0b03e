//! Whole migrations between two threads: memory written during pre-copy
//! arrives, on unix and TCP, over one connection and several; refusals and
//! broken connections lose nothing and run nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use gmem::consts::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
use gmem::{Backend, GmemConfig, GuestMemFile, View};
use migrate::{
    Address, GuestMemoryMap, Header, Incoming, Limits, Listener, MigrateError, Quiescent,
    SendOptions, Sender, SoftDirtyLog,
};
use mmu_cache::PagePool;
use mmu_cache::alloc::ChunkAllocator;
use split::{Gfn, Gpa, Memslot, MmuConfig, Pfn, TdpMmu};

const MIB: u64 = 1 << 20;

/// A view of fresh anonymous guest memory.
fn memory(bytes: u64) -> Arc<View> {
    let file = GuestMemFile::create(
        &Backend::Anonymous,
        GmemConfig {
            size: bytes,
            flags: GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
            huge_page_size_log2: 0,
        },
    )
    .unwrap();
    Arc::new(file.map_guest(0, bytes).unwrap())
}

fn map(view: &Arc<View>) -> GuestMemoryMap {
    GuestMemoryMap::new(vec![view.clone()])
}

/// A unix address of this test's own.
fn unix(name: &str) -> Address {
    let path =
        std::env::temp_dir().join(format!("mmukit-migrate-{}-{name}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    Address::Unix(path)
}

fn header(bytes: u64) -> Header {
    Header {
        streams: 0,
        session: 0,
        memory_bytes: bytes,
        config: r#"{"test": true}"#.into(),
    }
}

fn same(a: &GuestMemoryMap, b: &GuestMemoryMap) -> bool {
    let (mut x, mut y) = (vec![0u8; 4096], vec![0u8; 4096]);
    (0..a.pages()).all(|page| {
        a.read(page, &mut x);
        b.read(page, &mut y);
        x == y
    })
}

/// Migrates `bytes` of memory whose guest (software vCPU threads over the
/// software MMU) keeps writing during pre-copy; checks the destination
/// holds exactly the source's memory once the writers stopped. Pages the
/// guest changed between their checksum and their copy arrive owed and
/// are settled by a later pass. The destination populates its memory on
/// `populate_threads` threads of its own.
fn live_migration(address: Address, streams: u32, zero_copy: bool, populate_threads: usize) {
    let bytes = 16 * MIB;
    let view = memory(bytes);
    let source = map(&view);
    // The guest touches every page once, with some left zero.
    for page in (0..bytes / 4096).step_by(3) {
        view.fill(page * 4096, 8, (page % 251) as u8 + 1).unwrap();
    }
    let mmu = TdpMmu::new(
        PagePool::new(ChunkAllocator::anonymous()),
        MmuConfig::default(),
    )
    .unwrap();
    mmu.add_memslot(
        Memslot::new(0, Gfn(0), bytes / 4096, Pfn(view.as_ptr() as u64 >> 12)).unwrap(),
    )
    .unwrap();
    let listener = Listener::bind(&address).unwrap();
    let stop = AtomicBool::new(false);
    let written = AtomicU64::new(0);
    let destination = map(&memory(bytes));
    std::thread::scope(|scope| {
        let sender = scope.spawn(|| {
            let options = SendOptions {
                streams,
                max_downtime: Duration::from_millis(50),
                max_iterations: 10,
                zero_copy,
                ..SendOptions::default()
            };
            let mut sender = Sender::connect(&address, header(bytes), options)?;
            let mut log = SoftDirtyLog::new(&mmu, vec![0]);
            let precopy = sender.precopy(&source, &mut log, &|| false, &|_| {})?;
            // Stop the guest: the switch-over.
            stop.store(true, Ordering::Relaxed);
            let stopped = Instant::now();
            while written.load(Ordering::Relaxed) & 1 == 0 {
                std::thread::yield_now();
            }
            let state = [("workload".to_string(), b"{\"pass\": 3}".to_vec())];
            sender.switch_over(&source, &mut log, precopy, &state, stopped)
        });
        // The guest: writes pages all over memory until stopped.
        scope.spawn(|| {
            let mut vcpu = mmu.new_vcpu_caches();
            let mut value = 1u64;
            while !stop.load(Ordering::Relaxed) {
                for page in (0..bytes / 4096).step_by(7) {
                    let gpa = Gpa(page * 4096 + 8);
                    let hpa = mmu.write(&mut vcpu, gpa).unwrap();
                    // SAFETY: the MMU translated into the source view,
                    // which outlives this thread.
                    unsafe { std::ptr::write_volatile(hpa.0 as *mut u64, value) };
                    // A CPU sets the dirty bit with the store; a software
                    // vCPU marks the page again after it, so a harvest
                    // between the translation and the store misses nothing.
                    mmu.write(&mut vcpu, gpa).unwrap();
                }
                value += 1;
            }
            written.store(1, Ordering::Relaxed);
        });
        let limits = Limits {
            populate_threads,
            ..Limits::default()
        };
        let incoming = Incoming::accept(&listener, limits).unwrap();
        assert_eq!(incoming.header().config, r#"{"test": true}"#);
        // SAFETY: nothing runs on the destination's memory.
        let received = unsafe { incoming.receive(&destination) }.unwrap();
        assert_eq!(received.state[0].0, "workload");
        received.taken_over().unwrap();
        let report = sender.join().unwrap().unwrap();
        assert!(report.passes.len() >= 2, "{report:?}");
        assert!(report.zero_pages_skipped > 0, "{report:?}");
        assert!(report.downtime_s > 0.0 && report.total_s >= report.downtime_s);
        assert!(
            report.total_s >= report.setup_s,
            "the total counts the setup"
        );
    });
    assert!(
        same(&source, &destination),
        "the destination holds the source's memory"
    );
}

#[test]
fn memory_written_during_precopy_arrives_over_one_unix_connection() {
    live_migration(unix("one"), 1, true, 1);
}

#[test]
fn memory_written_during_precopy_arrives_with_the_receiver_taking_each_first_touch() {
    live_migration(unix("unpopulated"), 1, true, 0);
}

#[test]
fn memory_written_during_precopy_arrives_written_rather_than_spliced() {
    live_migration(unix("written"), 2, false, 2);
}

#[test]
fn memory_written_during_precopy_arrives_over_three_tcp_connections() {
    let listener = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let address = listener.address().unwrap();
    drop(listener);
    live_migration(address, 3, true, 3);
}

#[test]
fn a_refusal_reaches_the_sender_with_its_reason() {
    let address = unix("refused");
    let listener = Listener::bind(&address).unwrap();
    std::thread::scope(|scope| {
        let sender = scope.spawn(|| Sender::connect(&address, header(MIB), SendOptions::default()));
        let incoming = Incoming::accept(&listener, Limits::default()).unwrap();
        incoming.refuse("vcpus: a destination may change only where memory comes from");
        let err = sender.join().unwrap().unwrap_err();
        assert!(
            matches!(&err, MigrateError::Refused(why) if why.starts_with("vcpus:")),
            "{err}"
        );
    });
}

#[test]
fn a_stream_announcing_more_memory_than_the_host_gives_is_refused_before_allocation() {
    let address = unix("too-much");
    let listener = Listener::bind(&address).unwrap();
    std::thread::scope(|scope| {
        let sender =
            scope.spawn(|| Sender::connect(&address, header(1 << 40), SendOptions::default()));
        let limits = Limits {
            max_memory_bytes: 64 * MIB,
            ..Limits::default()
        };
        let err = Incoming::accept(&listener, limits).unwrap_err();
        assert!(matches!(err, MigrateError::TooMuchMemory { .. }), "{err}");
        let err = sender.join().unwrap().unwrap_err();
        assert!(matches!(err, MigrateError::Refused(_)), "{err}");
    });
}

#[test]
fn a_destination_that_stops_mid_stream_fails_the_sender() {
    let address = unix("destination-dies");
    let listener = Listener::bind(&address).unwrap();
    let view = memory(32 * MIB);
    view.fill(0, 32 * MIB, 0x77).unwrap();
    let source = map(&view);
    std::thread::scope(|scope| {
        let sender = scope.spawn(|| {
            let mut sender = Sender::connect(&address, header(32 * MIB), SendOptions::default())?;
            let mut log = Quiescent {
                pages: source.pages(),
            };
            let precopy = sender.precopy(&source, &mut log, &|| false, &|_| {})?;
            sender.switch_over(&source, &mut log, precopy, &[], Instant::now())
        });
        let incoming = Incoming::accept(&listener, Limits::default()).unwrap();
        // The destination dies after the header: its end of the
        // connection closes.
        drop(incoming);
        let err = sender.join().unwrap().unwrap_err();
        assert!(
            matches!(err, MigrateError::Send { .. } | MigrateError::Stream(_)),
            "{err}"
        );
    });
}

#[test]
fn a_source_that_stops_mid_stream_fails_the_destination_quickly_and_names_where() {
    let address = unix("source-dies");
    let listener = Listener::bind(&address).unwrap();
    let destination = map(&memory(8 * MIB));
    std::thread::scope(|scope| {
        scope.spawn(|| {
            use migrate::format::Writer;
            let mut connection =
                migrate::Connection::connect(&address, Duration::from_secs(5)).unwrap();
            let mut writer = Writer::new(&mut connection);
            writer.header(&header(8 * MIB)).unwrap();
            let mut reader = migrate::format::Reader::new(connection.try_clone().unwrap());
            assert_eq!(reader.reply().unwrap(), migrate::format::Reply::Accept);
            let mut writer = Writer::new(&mut connection);
            writer.pages(0, &[1; 4096]).unwrap();
            // Half a record, then the source is gone.
            writer.get_mut().write_all_prefix();
        });
        let incoming = Incoming::accept(&listener, Limits::default()).unwrap();
        let start = Instant::now();
        // SAFETY: nothing runs on the destination's memory.
        let err = unsafe { incoming.receive(&destination) }.unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(err.to_string().contains("the stream stopped in"), "{err}");
    });
}

/// Writes half a page record and closes.
trait HalfRecord {
    fn write_all_prefix(&mut self);
}

impl HalfRecord for &mut migrate::Connection {
    fn write_all_prefix(&mut self) {
        use std::io::Write;
        let _ = self.write_all(&[b'P', 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 9, 9]);
        self.shutdown();
    }
}

#[test]
fn a_guest_that_keeps_dirtying_more_than_the_link_carries_does_not_converge_and_says_so() {
    let address = unix("no-convergence");
    let listener = Listener::bind(&address).unwrap();
    let bytes = 8 * MIB;
    let view = memory(bytes);
    view.fill(0, bytes, 1).unwrap();
    let source = map(&view);
    let destination = map(&memory(bytes));
    /// Every page dirty at every harvest.
    struct AlwaysDirty(u64);
    impl migrate::DirtyLog for AlwaysDirty {
        fn start(&mut self) -> Result<(), migrate::DirtyLogError> {
            Ok(())
        }
        fn harvest(&mut self) -> Result<Vec<u64>, migrate::DirtyLogError> {
            Ok(vec![u64::MAX; self.0.div_ceil(64) as usize])
        }
        fn stop(&mut self) -> Result<(), migrate::DirtyLogError> {
            Ok(())
        }
    }
    std::thread::scope(|scope| {
        let sender = scope.spawn(|| {
            let options = SendOptions {
                max_downtime: Duration::from_nanos(1),
                max_iterations: 3,
                ..SendOptions::default()
            };
            let mut sender = Sender::connect(&address, header(bytes), options)?;
            let mut log = AlwaysDirty(source.pages());
            let precopy = sender.precopy(&source, &mut log, &|| false, &|_| {})?;
            sender.switch_over(&source, &mut log, precopy, &[], Instant::now())
        });
        let incoming = Incoming::accept(&listener, Limits::default()).unwrap();
        // SAFETY: nothing runs on the destination's memory.
        let received = unsafe { incoming.receive(&destination) }.unwrap();
        received.taken_over().unwrap();
        let report = sender.join().unwrap().unwrap();
        assert!(!report.converged, "{report:?}");
        // The full copy, three passes, and the switch-over.
        assert_eq!(report.passes.len(), 5, "{report:?}");
    });
    assert!(same(&source, &destination));
}
