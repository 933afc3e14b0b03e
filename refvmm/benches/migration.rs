//! Live migration against QEMU, side by side in one run: an idle guest
//! with 1 GiB of non-zero memory moved over a unix socket with the
//! bandwidth unlimited (refvmm's `idle` workload on `kvm` with a random
//! fill; QEMU's `-M microvm` over a `memory-backend-file` holding random
//! bytes, copied as its source starts so that each source takes fresh
//! memory as it starts; its guest a 64 KiB BIOS of `cli; hlt`), refvmm and
//! QEMU runs alternating, from two states of the host: warm (3 GiB touched
//! and freed just before the source starts, so that the destination takes
//! memory the host below backs) and as found (3 s of quiet between the
//! source's start and the migration, when a host with free page reporting
//! has handed its free memory back and each page the destination takes may
//! be backed anew on first touch, whichever VMM takes it). Then, on a warm
//! host: all-zero memory, refvmm with two connections against a memcpy of
//! the same bytes, the unix socket alone (1 GiB through a socket pair into
//! fresh and into touched memory) and a memcpy into fresh memory (what no
//! destination that copies can beat), destinations that prefault, that use
//! memfd (4 KiB pages) and that use a reserved HugeTLB pool, a guest
//! dirtying memory against `max_downtime_ms`, and a soft `dirty_log` guest
//! on HugeTLB with eager splitting on and off.
//!
//! QEMU runs only where `qemu-system-x86_64` is installed
//! (`scripts/install-qemu`); the refvmm rows need `/dev/kvm`, the HugeTLB
//! rows 2 MiB pages (`scripts/setup`). Run with
//! `cargo bench -p refvmm --bench migration`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const GIB: u64 = 1 << 30;
const RUNS: usize = 3;

/// What one migration took, as its source reported it.
#[derive(Clone, Copy, Debug)]
struct Moved {
    total: Duration,
    downtime: Duration,
    bytes: u64,
}

impl Moved {
    fn mib_s(&self) -> f64 {
        self.bytes as f64 / (1 << 20) as f64 / self.total.as_secs_f64()
    }
}

/// The run with the least total time, and the median total.
fn best_and_median(mut runs: Vec<Moved>) -> (Moved, Duration) {
    runs.sort_by_key(|run| run.total);
    let median = runs[runs.len() / 2].total;
    (runs[0], median)
}

fn ms(time: Duration) -> f64 {
    time.as_secs_f64() * 1e3
}

/// A scratch directory for one row.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "refvmm-bench-migration-{}-{name}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir
}

/// Waits for a unix socket to appear at `path` (at most 10 s).
fn wait_for(path: &Path) {
    let start = Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Stops `child` (SIGTERM, then waits).
fn stop(mut child: Child) {
    // SAFETY: kill(2) of our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
}

/// Moves one refvmm VM of `config` between two refvmm processes over a
/// unix socket and returns the source's JSON report.
fn refvmm_move(name: &str, config: &Value, destination_config: Option<&Value>) -> Value {
    let dir = scratch(name);
    let vm = dir.join("vm.json");
    std::fs::write(&vm, config.to_string()).expect("config written");
    let socket = dir.join("m.sock");
    let address = format!("unix:{}", socket.display());
    let mut destination = Command::new(env!("CARGO_BIN_EXE_refvmm"));
    destination.args(["--incoming", &address, "--report", "json"]);
    if let Some(changes) = destination_config {
        let path = dir.join("dest.json");
        std::fs::write(&path, changes.to_string()).expect("config written");
        destination.arg("--config").arg(path);
    }
    let destination = destination
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the destination starts");
    wait_for(&socket);
    let source = Command::new(env!("CARGO_BIN_EXE_refvmm"))
        .args(["--config", vm.to_str().expect("utf-8"), "--report", "json"])
        .args(["--migrate-to", &address])
        .output()
        .expect("the source runs");
    stop(destination);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        source.status.success(),
        "{name}: the source failed: {}",
        String::from_utf8_lossy(&source.stderr)
    );
    let report: Value = serde_json::from_slice(&source.stdout).expect("a JSON report");
    assert_eq!(
        report["migration"]["outcome"], "completed",
        "{name}: {report}"
    );
    report
}

fn moved(report: &Value) -> Moved {
    let figure = |key: &str| report["migration"][key].as_f64().expect("a figure");
    Moved {
        total: Duration::from_secs_f64(figure("total_s")),
        downtime: Duration::from_secs_f64(figure("downtime_s")),
        bytes: report["migration"]["bytes"].as_u64().expect("bytes"),
    }
}

/// The idle guest of 1 GiB: `fill` before it starts, `streams`
/// connections.
fn refvmm_idle(host: Host, fill: &str, streams: u32) -> Moved {
    refvmm_idle_to(host, fill, streams, None)
}

/// [`refvmm_idle`] to a destination that changes `destination_config`.
fn refvmm_idle_to(
    host: Host,
    fill: &str,
    streams: u32,
    destination_config: Option<&Value>,
) -> Moved {
    let config = json!({
        "vcpus": 1,
        "accel": "kvm",
        "memory": {"size_mib": 1024},
        "workload": {"kind": "idle", "duration_ms": 600_000, "fill": fill},
        "migration": {"after_ms": host.quiet().as_millis() as u64, "streams": streams},
    });
    moved(&refvmm_move(
        &format!("idle-{fill}-{streams}"),
        &config,
        destination_config,
    ))
}

/// A single-threaded memcpy of `bytes` between two touched buffers: the
/// machine's copy bound for one core (the best of three).
fn memcpy(bytes: usize) -> Duration {
    let from = vec![0x5au8; bytes];
    let mut to = vec![0xa5u8; bytes];
    (0..3)
        .map(|_| {
            let start = Instant::now();
            to.copy_from_slice(&from);
            std::hint::black_box(&mut to);
            start.elapsed()
        })
        .min()
        .expect("three runs")
}

/// Memory the kernel gives fresh on first touch: private anonymous with
/// `MADV_HUGEPAGE`, refvmm's default guest memory; unmapped on drop.
struct FreshMemory {
    raw: *mut libc::c_void,
    len: usize,
    align: usize,
}

impl FreshMemory {
    fn new(len: usize) -> Self {
        let align = 2usize << 20;
        // SAFETY: a new private anonymous mapping nothing else knows of.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len + align,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(raw, libc::MAP_FAILED, "mmap");
        let memory = Self { raw, len, align };
        // SAFETY: inside the mapping; the advice changes no contents.
        unsafe { libc::madvise(memory.start().cast(), len, libc::MADV_HUGEPAGE) };
        memory
    }

    fn start(&self) -> *mut u8 {
        (self.raw as usize).next_multiple_of(self.align) as *mut u8
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: `len` bytes of the mapping, borrowed from `self` alone.
        unsafe { std::slice::from_raw_parts_mut(self.start(), self.len) }
    }
}

impl Drop for FreshMemory {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unused from here on.
        unsafe { libc::munmap(self.raw, self.len + self.align) };
    }
}

/// The least any destination does: the bytes copied into fresh memory in
/// one pass (a 1-thread memcpy from touched memory). The best of three.
fn memcpy_into_fresh(random: &[u8]) -> Duration {
    (0..RUNS)
        .map(|_| {
            let mut memory = FreshMemory::new(random.len());
            let start = Instant::now();
            memory.bytes().copy_from_slice(random);
            let elapsed = start.elapsed();
            std::hint::black_box(memory.bytes());
            elapsed
        })
        .min()
        .expect("runs")
}

/// The transport's own bound: 1 GiB of random bytes from touched memory
/// through a unix socket pair, one thread writing 1 MiB at a time and one
/// reading, with no format and no checksum, into fresh memory
/// ([`FreshMemory`]) or into memory touched before. The best of three each.
fn socket_floor(random: &[u8]) -> (Duration, Duration) {
    let once = |fresh: bool| {
        let mut memory = FreshMemory::new(random.len());
        let to = memory.bytes();
        if !fresh {
            to.fill(0x5a);
        }
        let (mut reader, mut writer) = UnixStream::pair().expect("a socket pair");
        let start = Instant::now();
        std::thread::scope(|scope| {
            scope.spawn(move || {
                for chunk in random.chunks(1 << 20) {
                    writer.write_all(chunk).expect("the reader reads");
                }
            });
            std::io::Read::read_exact(&mut reader, to).expect("the writer writes");
        });
        let elapsed = start.elapsed();
        assert!(to[..4096] == random[..4096], "the bytes arrived");
        elapsed
    };
    let best = |fresh: bool| (0..RUNS).map(|_| once(fresh)).min().expect("runs");
    (best(true), best(false))
}

/// A QMP connection to one QEMU.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> Self {
        wait_for(path);
        let writer = UnixStream::connect(path).expect("QMP connects");
        let mut qmp = Self {
            reader: BufReader::new(writer.try_clone().expect("a second handle")),
            writer,
        };
        qmp.line(); // the greeting
        qmp.execute("qmp_capabilities", json!({}));
        qmp
    }

    fn line(&mut self) -> Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("QMP answers");
        serde_json::from_str(&line).unwrap_or_else(|err| panic!("QMP said {line:?}: {err}"))
    }

    /// Runs `command` and returns its `return` (events in between are
    /// dropped).
    fn execute(&mut self, command: &str, arguments: Value) -> Value {
        let request = json!({"execute": command, "arguments": arguments});
        writeln!(self.writer, "{request}").expect("QMP takes the command");
        loop {
            let answer = self.line();
            if let Some(value) = answer.get("return") {
                return value.clone();
            }
            assert!(answer.get("error").is_none(), "QMP {command}: {answer}");
        }
    }
}

/// One QEMU process: `-M microvm` on KVM with 1 GiB from `memory`.
fn qemu(dir: &Path, name: &str, memory: &str, incoming: Option<&str>) -> (Child, Qmp) {
    let qmp = dir.join(format!("{name}.qmp"));
    let mut command = Command::new("qemu-system-x86_64");
    command
        .args(["-M", "microvm", "-accel", "kvm", "-m", "1G", "-smp", "1"])
        .args(["-nodefaults", "-display", "none", "-serial", "none"])
        .args(["-bios", dir.join("bios.bin").to_str().expect("utf-8")])
        .args(["-object", memory, "-machine", "memory-backend=mem"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()));
    if let Some(address) = incoming {
        command.args(["-incoming", address]);
    }
    let child = command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("QEMU starts");
    (child, Qmp::connect(&qmp))
}

/// A file a QEMU source's memory maps, copied from `from` to `to` right
/// before the source starts and removed after the move: the source takes
/// fresh memory when it starts, as refvmm's source does when it fills its
/// guest, so that both destinations find the host's free memory alike.
struct SourceFile<'a> {
    from: &'a Path,
    to: &'a Path,
}

/// Moves a QEMU guest whose memory is `memory` (a `-object` argument with
/// `id=mem`, mapping `file` where there is one) between two QEMU processes
/// over a unix socket.
fn qemu_move(dir: &Path, memory: &str, file: Option<SourceFile>, quiet: Duration) -> Moved {
    for _ in 0..3 {
        match qemu_move_once(dir, memory, file.as_ref(), quiet) {
            Ok(moved) => return moved,
            Err(status) => println!("  (QEMU reported no total time, run again: {status})"),
        }
    }
    panic!("QEMU reported no total time three times");
}

/// One QEMU migration, or its `query-migrate` status where that status
/// says it took no time (no measurement).
fn qemu_move_once(
    dir: &Path,
    memory: &str,
    file: Option<&SourceFile>,
    quiet: Duration,
) -> Result<Moved, Value> {
    let socket = dir.join("m.sock");
    let address = format!("unix:{}", socket.display());
    let (destination, _destination_qmp) = qemu(
        dir,
        "destination",
        "memory-backend-ram,id=mem,size=1G",
        Some(&address),
    );
    wait_for(&socket);
    if let Some(file) = file {
        std::fs::copy(file.from, file.to).expect("the source's memory file copied");
    }
    let (source, mut qmp) = qemu(dir, "source", memory, None);
    // The guest reaches its `hlt`; the host is quiet.
    std::thread::sleep(quiet);
    qmp.execute(
        "migrate-set-parameters",
        json!({"max-bandwidth": 1u64 << 40}),
    );
    qmp.execute("migrate", json!({"uri": address}));
    let status = loop {
        let status = qmp.execute("query-migrate", json!({}));
        match status["status"].as_str() {
            Some("completed") => break status,
            Some("failed" | "cancelled") => panic!("QEMU's migration failed: {status}"),
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    stop(source);
    stop(destination);
    let _ = std::fs::remove_file(&socket);
    if let Some(file) = file {
        let _ = std::fs::remove_file(file.to);
    }
    let total = status["total-time"].as_u64().expect("total-time");
    if total == 0 {
        return Err(status);
    }
    Ok(Moved {
        total: Duration::from_millis(total),
        downtime: Duration::from_millis(status["downtime"].as_u64().expect("downtime")),
        bytes: status["ram"]["transferred"]
            .as_u64()
            .expect("ram.transferred"),
    })
}

/// Writes `bytes` of pseudo-random data (no page is zero) to `path`.
fn random_file(path: &Path, bytes: u64) {
    let mut file =
        std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path).expect("file"));
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..bytes / block.len() as u64 {
        fill_random(&mut block, &mut state);
        file.write_all(&block).expect("written");
    }
    file.flush().expect("flushed");
}

/// `bytes` random bytes in memory.
fn random_bytes(bytes: usize) -> Vec<u8> {
    let mut data = vec![0u8; bytes];
    fill_random(&mut data, &mut 0x2545_f491_4f6c_dd1du64);
    data
}

/// Fills `block` (whole words) from the xorshift generator `state`.
fn fill_random(block: &mut [u8], state: &mut u64) {
    for word in block.chunks_exact_mut(8) {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        word.copy_from_slice(&state.to_ne_bytes());
    }
}

/// QEMU, ready to move its guests: the BIOS and the random memory file
/// in a scratch directory, removed on drop.
struct Qemu {
    dir: PathBuf,
    data: PathBuf,
}

impl Qemu {
    /// QEMU where it is installed, or why not.
    fn new() -> Result<Self, String> {
        let found = Command::new("qemu-system-x86_64")
            .arg("--version")
            .output()
            .map_err(|_| {
                "qemu-system-x86_64 is not installed (scripts/install-qemu)".to_string()
            })?;
        let version = String::from_utf8_lossy(&found.stdout);
        println!("{}", version.lines().next().unwrap_or("QEMU"));
        let dir = scratch("qemu");
        // The BIOS: `cli; hlt; jmp hlt` at the reset vector, `hlt` elsewhere.
        let mut bios = vec![0xf4u8; 64 << 10];
        bios[0xfff0..0xfff4].copy_from_slice(&[0xfa, 0xf4, 0xeb, 0xfd]);
        std::fs::write(dir.join("bios.bin"), &bios).expect("BIOS written");
        let data =
            Path::new("/dev/shm").join(format!("refvmm-bench-migration-{}", std::process::id()));
        random_file(&data, GIB);
        Ok(Self { dir, data })
    }

    /// Moves the guest with 1 GiB of random memory, from a copy of the
    /// random file made as the source starts.
    fn random(&self, host: Host) -> Moved {
        let copy = self.data.with_extension("source");
        let memory = format!(
            "memory-backend-file,id=mem,size=1G,share=off,mem-path={}",
            copy.display()
        );
        let file = SourceFile {
            from: &self.data,
            to: &copy,
        };
        qemu_move(&self.dir, &memory, Some(file), host.quiet())
    }

    /// Moves the guest with all-zero memory.
    fn zero(&self, host: Host) -> Moved {
        qemu_move(
            &self.dir,
            "memory-backend-ram,id=mem,size=1G",
            None,
            host.quiet(),
        )
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.data);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The state of the host's free memory a migration starts from.
#[derive(Clone, Copy, PartialEq)]
enum Host {
    /// 3 GiB touched and freed just before the source starts: memory the
    /// host below backs.
    Warm,
    /// 3 s of quiet between the source's start and the migration: on a
    /// host that hands free memory back to the hypervisor below (free page
    /// reporting, which reports memory freed 2 s before), each page the
    /// destination takes may have to be backed anew there on first touch.
    AsFound,
}

impl Host {
    /// Brings the host to this state before a source starts.
    fn prepare(self) {
        if self == Self::Warm {
            let mut memory = FreshMemory::new(3 * GIB as usize);
            memory.bytes().fill(1);
            std::hint::black_box(memory.bytes());
        }
    }

    /// How long a source runs before it migrates.
    fn quiet(self) -> Duration {
        match self {
            Self::Warm => Duration::from_millis(200),
            Self::AsFound => Duration::from_secs(3),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Warm => "host warm",
            Self::AsFound => "host as found",
        }
    }
}

/// `RUNS` runs of `ours` and of `theirs` on `qemu` (where there is one),
/// each from `host`, alternating which goes first.
fn pairs(
    host: Host,
    ours: impl Fn(Host) -> Moved,
    qemu: Option<&Qemu>,
    theirs: fn(&Qemu, Host) -> Moved,
) -> (Vec<Moved>, Vec<Moved>) {
    let (mut our_runs, mut their_runs) = (Vec::new(), Vec::new());
    for run in 0..RUNS {
        let mut theirs_once = || {
            if let Some(qemu) = qemu {
                host.prepare();
                their_runs.push(theirs(qemu, host));
            }
        };
        if run % 2 == 0 {
            theirs_once();
        }
        host.prepare();
        our_runs.push(ours(host));
        if run % 2 == 1 {
            theirs_once();
        }
    }
    (our_runs, their_runs)
}

/// `RUNS` runs of `what` from `host`.
fn runs(host: Host, what: impl Fn(Host) -> Moved) -> Vec<Moved> {
    (0..RUNS)
        .map(|_| {
            host.prepare();
            what(host)
        })
        .collect()
}

fn row(name: &str, runs: Vec<Moved>) -> Moved {
    let (best, median) = best_and_median(runs);
    println!(
        "{name:<34} total {:>8.1} ms (median {:>8.1})  downtime {:>6.1} ms  {:>7.0} MiB/s",
        ms(best.total),
        ms(median),
        ms(best.downtime),
        best.mib_s()
    );
    best
}

/// A guest that keeps dirtying memory (`kvm` dirty_log, every page of
/// its share written each pass): downtime and convergence against
/// `max_downtime_ms`.
fn dirtying() {
    let config = json!({
        "vcpus": 2,
        "accel": "kvm",
        "memory": {"size_mib": 64},
        "workload": {"kind": "dirty_log", "iterations": 400, "bytes_per_vcpu_mib": 8, "write_percent": 25},
        "migration": {"after_ms": 200, "max_downtime_ms": 300},
    });
    let report = refvmm_move("dirtying", &config, None);
    let migration = &report["migration"];
    println!(
        "{:<34} total {:>8.1} ms  downtime {:>6.1} ms (max_downtime_ms 300)  {} passes  converged {}",
        "refvmm kvm dirty_log 64 MiB",
        migration["total_s"].as_f64().unwrap_or(0.0) * 1e3,
        migration["downtime_s"].as_f64().unwrap_or(0.0) * 1e3,
        migration["passes"].as_array().map_or(0, Vec::len),
        migration["converged"]
    );
}

/// Free 2 MiB HugeTLB pages.
fn free_huge_pages() -> u64 {
    std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok())
        .unwrap_or(0)
}

/// A soft dirty_log guest on 2 MiB HugeTLB pages with eager splitting on
/// and off: what it changes in the setup, the first pass and the total.
fn eager_split() {
    let free = free_huge_pages();
    if free < 2 * 512 + 16 {
        println!(
            "soft dirty_log on HugeTLB: skipped ({free} free 2 MiB pages of the 1040 both sides take; scripts/bench reserves them)"
        );
        return;
    }
    for eager in [true, false] {
        let config = json!({
            "vcpus": 2,
            "accel": "soft",
            "memory": {"size_mib": 1024, "backend": "hugetlb", "huge_page_size": "2M"},
            "mmu": {"eager_split": eager},
            "workload": {"kind": "dirty_log", "iterations": 20, "bytes_per_vcpu_mib": 256, "write_percent": 25},
            "migration": {"after_ms": 100},
        });
        let report = refvmm_move(&format!("eager-{eager}"), &config, None);
        let migration = &report["migration"];
        let first = &migration["passes"][0];
        println!(
            "soft dirty_log HugeTLB 1 GiB eager_split {:<5}: setup {:>6.1} ms  first pass {:>7.1} ms ({} pages)  total {:>7.1} ms  downtime {:>5.1} ms",
            eager,
            migration["setup_s"].as_f64().unwrap_or(0.0) * 1e3,
            first["seconds"].as_f64().unwrap_or(0.0) * 1e3,
            first["pages"],
            migration["total_s"].as_f64().unwrap_or(0.0) * 1e3,
            migration["downtime_s"].as_f64().unwrap_or(0.0) * 1e3,
        );
    }
}

fn main() {
    if std::env::args().any(|arg| arg == "--list") {
        return;
    }
    if !Path::new("/dev/kvm").exists() {
        println!("migration: skipped (no /dev/kvm)");
        return;
    }
    println!(
        "live migration of an idle 1 GiB guest over a unix socket, bandwidth unlimited (best of {RUNS}; refvmm and QEMU runs alternate)"
    );
    let qemu = Qemu::new();
    if let Err(why) = &qemu {
        println!("QEMU: skipped ({why})");
    }
    let qemu = qemu.ok();
    let mut warm = None;
    for host in [Host::Warm, Host::AsFound] {
        let (ours, theirs) = pairs(
            host,
            |host| refvmm_idle(host, "random", 1),
            qemu.as_ref(),
            Qemu::random,
        );
        let ours = row(&format!("refvmm random 1 stream, {}", host.name()), ours);
        let theirs = (!theirs.is_empty())
            .then(|| row(&format!("QEMU random 1 stream, {}", host.name()), theirs));
        if let Some(theirs) = theirs {
            println!(
                "  refvmm/QEMU total, {}: {:.3}x (goal <= 0.25x)",
                host.name(),
                ours.total.as_secs_f64() / theirs.total.as_secs_f64()
            );
        }
        if host == Host::Warm {
            warm = Some((ours, theirs));
        }
    }
    let (ours_one, theirs_random) = warm.expect("the warm rows ran");
    let host = Host::Warm;
    let (ours_zero, theirs_zero) = pairs(
        host,
        |host| refvmm_idle(host, "zero", 1),
        qemu.as_ref(),
        Qemu::zero,
    );
    let ours_zero = row("refvmm zero 1 stream, host warm", ours_zero);
    if !theirs_zero.is_empty() {
        let theirs_zero = row("QEMU zero 1 stream, host warm", theirs_zero);
        println!(
            "  refvmm/QEMU total, zero: {:.3}x",
            ours_zero.total.as_secs_f64() / theirs_zero.total.as_secs_f64()
        );
    }
    let ours_two = row(
        "refvmm random 2 streams, host warm",
        runs(host, |host| refvmm_idle(host, "random", 2)),
    );
    // The destination populates its memory on its threads before it
    // accepts (its `memory.prefault`), instead of taking each page as the
    // stream writes it; the setup counts in the total.
    let prefault = json!({"memory": {"prefault": true}});
    row(
        "refvmm random 1 stream, dest prefault",
        runs(host, |host| {
            refvmm_idle_to(host, "random", 1, Some(&prefault))
        }),
    );
    // The destination on memfd: 4 KiB shmem pages, where the default takes
    // transparent huge pages.
    let memfd = json!({"memory": {"backend": "memfd"}});
    row(
        "refvmm random 1 stream, dest memfd",
        runs(host, |host| refvmm_idle_to(host, "random", 1, Some(&memfd))),
    );
    // The destination on a reserved HugeTLB pool: memory the host backed
    // when it was first used, whatever the host did with its free memory
    // since (the first run takes that first use).
    if free_huge_pages() >= 512 {
        let hugetlb = json!({"memory": {"backend": "hugetlb", "huge_page_size": "2M"}});
        row(
            "refvmm random 1 stream, dest HugeTLB, host as found",
            runs(Host::AsFound, |host| {
                refvmm_idle_to(host, "random", 1, Some(&hugetlb))
            }),
        );
    } else {
        println!(
            "refvmm dest HugeTLB: skipped (fewer than 512 free 2 MiB pages; scripts/setup reserves them)"
        );
    }
    let copy = memcpy(GIB as usize);
    let copy_mib_s = 1024.0 / copy.as_secs_f64();
    println!(
        "{:<34} {:>8.1} ms  {:>7.0} MiB/s",
        "memcpy 1 GiB (1 thread)",
        ms(copy),
        copy_mib_s
    );
    let random = random_bytes(GIB as usize);
    let (floor_fresh, floor_touched) = socket_floor(&random);
    let fresh_copy = memcpy_into_fresh(&random);
    drop(random);
    println!(
        "{:<34} {:>8.1} ms  {:>7.0} MiB/s",
        "memcpy 1 GiB into fresh memory",
        ms(fresh_copy),
        1024.0 / fresh_copy.as_secs_f64()
    );
    println!(
        "{:<34} {:>8.1} ms  {:>7.0} MiB/s",
        "unix socket 1 GiB, fresh memory",
        ms(floor_fresh),
        1024.0 / floor_fresh.as_secs_f64()
    );
    println!(
        "{:<34} {:>8.1} ms  {:>7.0} MiB/s",
        "unix socket 1 GiB, touched memory",
        ms(floor_touched),
        1024.0 / floor_touched.as_secs_f64()
    );
    println!(
        "refvmm random 1 stream / unix socket into fresh memory: {:.2}x (the transport alone, no format or checksum, 1 thread each side)",
        ours_one.total.as_secs_f64() / floor_fresh.as_secs_f64()
    );
    if let Some(theirs) = theirs_random {
        println!(
            "the unix socket alone / QEMU random, host warm: {:.3}x into fresh memory, {:.3}x into touched memory; a memcpy into fresh memory / QEMU random: {:.3}x (no destination that copies can go below it)",
            floor_fresh.as_secs_f64() / theirs.total.as_secs_f64(),
            floor_touched.as_secs_f64() / theirs.total.as_secs_f64(),
            fresh_copy.as_secs_f64() / theirs.total.as_secs_f64(),
        );
    }
    println!(
        "2 streams: {:.0} MiB/s = {:.2}x a 1-thread memcpy, {:.2}x a memcpy into fresh memory; idle downtime {:.1} ms (goal <= 50 ms)",
        ours_two.mib_s(),
        ours_two.mib_s() / copy_mib_s,
        ours_two.total.as_secs_f64().recip() * fresh_copy.as_secs_f64(),
        ms(ours_one.downtime),
    );
    dirtying();
    eager_split();
}
