//! Start-up cost of refvmm: time from process start to the guest's first
//! serial byte for the `hello` example (median of several runs), against
//! `kvm-floor`, a plain kvm-ioctls program doing the least; and the peak
//! RSS of each (the hello guest touches only a few pages of its memory, so
//! refvmm's peak RSS beyond the floor's is its overhead).
//! Run with `cargo bench -p refvmm --bench startup`.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const RUNS: usize = 9;

/// Spawns `command`, returns the time to its first stdout byte and its peak
/// RSS in KiB. The child is reaped by `wait4`, which also gives its rusage.
#[expect(
    clippy::zombie_processes,
    reason = "the child is reaped by wait4, which clippy does not see"
)]
fn first_byte(mut command: Command) -> (Duration, i64) {
    let start = Instant::now();
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut byte = [0u8; 1];
    child
        .stdout
        .as_mut()
        .expect("piped")
        .read_exact(&mut byte)
        .expect("a first byte");
    let elapsed = start.elapsed();
    let mut rest = Vec::new();
    child
        .stdout
        .as_mut()
        .expect("piped")
        .read_to_end(&mut rest)
        .ok();
    let mut status = 0;
    // SAFETY: waits for our own child; `usage` is a valid out-pointer.
    let (pid, rss) = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        let pid = libc::wait4(child.id() as i32, &mut status, 0, &mut usage);
        (pid, usage.ru_maxrss)
    };
    assert_eq!(pid, child.id() as i32);
    (elapsed, rss)
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn main() {
    if std::env::args().any(|arg| arg == "--list") {
        return;
    }
    if !std::path::Path::new("/dev/kvm").exists() {
        println!("refvmm start-up: skipped (no /dev/kvm)");
        return;
    }
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/hello.json");
    let mut refvmm = Vec::new();
    let mut floor = Vec::new();
    let (mut refvmm_rss, mut floor_rss) = (0, 0);
    for _ in 0..RUNS {
        let mut command = Command::new(env!("CARGO_BIN_EXE_refvmm"));
        command.args(["--config", example]);
        let (time, rss) = first_byte(command);
        refvmm.push(time);
        refvmm_rss = refvmm_rss.max(rss);
        let (time, rss) = first_byte(Command::new(env!("CARGO_BIN_EXE_kvm-floor")));
        floor.push(time);
        floor_rss = floor_rss.max(rss);
    }
    let (refvmm, floor) = (median(refvmm), median(floor));
    println!(
        "refvmm hello: first serial byte after {refvmm:.2?} (median of {RUNS}); kvm-floor {floor:.2?}; ratio {:.2}",
        refvmm.as_secs_f64() / floor.as_secs_f64()
    );
    println!(
        "peak RSS: refvmm {} KiB, kvm-floor {} KiB, overhead {} KiB",
        refvmm_rss,
        floor_rss,
        refvmm_rss - floor_rss
    );
}
