//! The main thread's event loop (event-manager): the end of the run's work,
//! SIGINT/SIGTERM, and a stats timer that publishes live metrics through an
//! arc-swap snapshot.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use vmm_sys_util::signal;
use vmm_sys_util::timerfd::TimerFd;

/// Set by SIGINT/SIGTERM: every vCPU loop stops at its next exit, and a
/// software run at its next pass.
pub static STOP: AtomicBool = AtomicBool::new(false);

/// Set when the run passes `workload.timeout_ms`: every vCPU loop stops
/// at its next exit (kicked out of KVM_RUN) and reports where it stood.
pub static TIMED_OUT: AtomicBool = AtomicBool::new(false);

/// Counters the vCPU threads bump.
#[derive(Debug, Default)]
pub struct Metrics {
    /// vCPU exits handled.
    pub vcpu_exits: AtomicU64,
    /// Bytes written to the serial port.
    pub serial_bytes: AtomicU64,
    /// Dirty-log passes finished (all vCPUs), or convert vCPUs done.
    pub passes: AtomicU64,
    /// Faults the software MMU handled.
    pub faults: AtomicU64,
    /// Huge pages the software MMU split (eagerly and lazily).
    pub splits: AtomicU64,
    /// Conversions between private and shared memory.
    pub conversions: AtomicU64,
    /// Migration passes over memory finished.
    pub migration_passes: AtomicU64,
    /// Pages a migration sent (or received).
    pub migration_pages: AtomicU64,
    /// Bytes a migration sent (or received).
    pub migration_bytes: AtomicU64,
}

/// A point-in-time copy of [`Metrics`]: one line of `--metrics-file`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct MetricsSnapshot {
    /// vCPU exits handled.
    pub vcpu_exits: u64,
    /// Bytes written to the serial port.
    pub serial_bytes: u64,
    /// Dirty-log passes finished.
    pub passes: u64,
    /// Faults the software MMU handled.
    pub faults: u64,
    /// Huge pages the software MMU split.
    pub splits: u64,
    /// Conversions between private and shared memory.
    pub conversions: u64,
    /// Migration passes over memory finished.
    pub migration_passes: u64,
    /// Pages a migration sent (or received).
    pub migration_pages: u64,
    /// Bytes a migration sent (or received).
    pub migration_bytes: u64,
}

/// One line of the metrics file: the time since the run started, and the
/// counters.
#[derive(serde::Serialize)]
struct MetricsLine {
    elapsed_s: f64,
    #[serde(flatten)]
    metrics: MetricsSnapshot,
}

/// Where the live metrics go, one JSON object per line, as Firecracker's
/// metrics file: every second and at the end of the run.
struct MetricsFile {
    file: std::io::BufWriter<std::fs::File>,
    started: std::time::Instant,
}

impl MetricsFile {
    fn write(&mut self, metrics: MetricsSnapshot) {
        use std::io::Write;
        let line = MetricsLine {
            elapsed_s: self.started.elapsed().as_secs_f64(),
            metrics,
        };
        let written = serde_json::to_writer(&mut self.file, &line)
            .map_err(std::io::Error::other)
            .and_then(|()| writeln!(self.file))
            .and_then(|()| self.file.flush());
        if let Err(err) = written {
            tracing::warn!(%err, "writing the metrics file");
        }
    }
}

impl Metrics {
    /// A copy of the counters.
    pub fn snapshot(&self) -> MetricsSnapshot {
        MetricsSnapshot {
            vcpu_exits: self.vcpu_exits.load(Ordering::Relaxed),
            serial_bytes: self.serial_bytes.load(Ordering::Relaxed),
            passes: self.passes.load(Ordering::Relaxed),
            faults: self.faults.load(Ordering::Relaxed),
            splits: self.splits.load(Ordering::Relaxed),
            conversions: self.conversions.load(Ordering::Relaxed),
            migration_passes: self.migration_passes.load(Ordering::Relaxed),
            migration_pages: self.migration_pages.load(Ordering::Relaxed),
            migration_bytes: self.migration_bytes.load(Ordering::Relaxed),
        }
    }
}

/// The eventfd the signal handler writes to (-1 before the loop starts).
static SIGNAL_EVENT: AtomicI32 = AtomicI32::new(-1);
/// Threads to kick out of KVM_RUN when a signal stops the run.
static VCPU_THREADS: Mutex<Vec<VcpuThread>> = Mutex::new(Vec::new());

extern "C" fn on_stop_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    STOP.store(true, Ordering::Relaxed);
    let fd = SIGNAL_EVENT.load(Ordering::Relaxed);
    if fd >= 0 {
        let one = 1u64.to_ne_bytes();
        // SAFETY: write(2) is async-signal-safe; the buffer is 8 valid bytes.
        unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) };
    }
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The signal that kicks a vCPU thread out of KVM_RUN: the first real-time
/// signal, as Firecracker and Cloud Hypervisor use.
fn kick_signal() -> libc::c_int {
    signal::SIGRTMIN()
}

/// Installs SIGINT/SIGTERM (stop the run) and the kick signal (out of
/// KVM_RUN: vmm-sys-util installs handlers without SA_RESTART, so the ioctl
/// returns EINTR).
pub fn install_signal_handlers() {
    let handlers: [(libc::c_int, signal::SignalHandler); 3] = [
        (libc::SIGINT, on_stop_signal),
        (libc::SIGTERM, on_stop_signal),
        (kick_signal(), on_kick),
    ];
    for (number, handler) in handlers {
        // The handlers only touch atomics and call write(2), both
        // async-signal-safe.
        if let Err(err) = signal::register_signal_handler(number, handler) {
            tracing::warn!(number, %err, "installing a signal handler");
        }
    }
}

/// A registered vCPU thread, which the kick signal can reach.
#[derive(Clone, Copy, PartialEq, Eq)]
struct VcpuThread(libc::pthread_t);

// SAFETY: the handle is a live thread's: threads unregister (under the
// registry's lock) before they exit, and kicks are sent under that lock.
unsafe impl signal::Killable for VcpuThread {
    fn pthread_handle(&self) -> libc::pthread_t {
        self.0
    }
}

/// Registers the calling thread as a vCPU thread to kick on a stop.
pub fn register_vcpu_thread() {
    // SAFETY: pthread_self has no preconditions.
    let me = VcpuThread(unsafe { libc::pthread_self() });
    VCPU_THREADS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(me);
}

/// Unregisters the calling thread.
pub fn unregister_vcpu_thread() {
    // SAFETY: pthread_self has no preconditions.
    let me = VcpuThread(unsafe { libc::pthread_self() });
    VCPU_THREADS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|&t| t != me);
}

/// Kicks every registered vCPU thread out of KVM_RUN (its loop then sees
/// why: a stop, a timeout, a migration's switch-over).
pub fn kick_vcpus() {
    kick_vcpu_threads();
}

fn kick_vcpu_threads() {
    use signal::Killable;
    for thread in VCPU_THREADS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
    {
        if let Err(err) = thread.kill(kick_signal()) {
            tracing::warn!(%err, "kicking a vCPU thread");
        }
    }
}

struct Controller {
    done: EventFd,
    signal: EventFd,
    timer: TimerFd,
    /// Fires once at `workload.timeout_ms`.
    deadline: Option<TimerFd>,
    metrics: Arc<Metrics>,
    live: Arc<ArcSwap<MetricsSnapshot>>,
    metrics_file: Option<MetricsFile>,
    finished: bool,
}

impl MutEventSubscriber for Controller {
    fn init(&mut self, ops: &mut EventOps) {
        for fd in [
            self.done.as_raw_fd(),
            self.signal.as_raw_fd(),
            self.timer.as_raw_fd(),
        ] {
            ops.add(Events::new_raw(fd, EventSet::IN))
                .expect("registering a fresh fd");
        }
        if let Some(deadline) = &self.deadline {
            ops.add(Events::new_raw(deadline.as_raw_fd(), EventSet::IN))
                .expect("registering a fresh fd");
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd: RawFd = events.fd();
        if fd == self.done.as_raw_fd() {
            let _ = self.done.read();
            self.finished = true;
        } else if fd == self.signal.as_raw_fd() {
            let _ = self.signal.read();
            tracing::warn!("signal: stopping the run");
            kick_vcpu_threads();
        } else if let Some(deadline) = self.deadline.as_mut().filter(|d| d.as_raw_fd() == fd) {
            let _ = deadline.wait();
            tracing::warn!("workload.timeout_ms passed: stopping the vCPUs");
            TIMED_OUT.store(true, Ordering::Relaxed);
            kick_vcpu_threads();
        } else if fd == self.timer.as_raw_fd() {
            let _ = self.timer.wait();
            let snapshot = self.metrics.snapshot();
            self.live.store(Arc::new(snapshot));
            if let Some(file) = &mut self.metrics_file {
                file.write(snapshot);
            }
            tracing::info!(
                exits = snapshot.vcpu_exits,
                serial = snapshot.serial_bytes,
                passes = snapshot.passes,
                "stats"
            );
        }
    }
}

/// Runs `work` on a thread while the main thread runs the event loop; the
/// loop ends when the work does. Returns the work's result and the last
/// metrics snapshot. With `metrics_file`, the live metrics are written to
/// it as JSON lines every second and once more at the end. At `timeout`
/// (`workload.timeout_ms`), [`TIMED_OUT`] is set and the vCPU threads are
/// kicked.
pub fn run_with_event_loop<T: Send>(
    metrics: Arc<Metrics>,
    metrics_file: Option<std::fs::File>,
    timeout: Option<Duration>,
    work: impl FnOnce() -> T + Send,
) -> std::io::Result<(T, MetricsSnapshot)> {
    let live = Arc::new(ArcSwap::from_pointee(MetricsSnapshot::default()));
    let done = EventFd::new(EFD_NONBLOCK)?;
    let signal = EventFd::new(EFD_NONBLOCK)?;
    let mut timer = TimerFd::new()?;
    timer.reset(Duration::from_secs(1), Some(Duration::from_secs(1)))?;
    let deadline = match timeout {
        Some(timeout) => {
            let mut deadline = TimerFd::new()?;
            deadline.reset(timeout, None)?;
            Some(deadline)
        }
        None => None,
    };
    SIGNAL_EVENT.store(signal.as_raw_fd(), Ordering::Relaxed);
    if STOP.load(Ordering::Relaxed) {
        signal.write(1)?;
    }
    let done_writer = done.try_clone()?;
    let controller = Arc::new(Mutex::new(Controller {
        done,
        signal,
        timer,
        deadline,
        metrics: metrics.clone(),
        live: live.clone(),
        metrics_file: metrics_file.map(|file| MetricsFile {
            file: std::io::BufWriter::new(file),
            started: std::time::Instant::now(),
        }),
        finished: false,
    }));
    let mut manager: EventManager<Arc<Mutex<Controller>>> =
        EventManager::new().map_err(|e| std::io::Error::other(format!("{e:?}")))?;
    manager.add_subscriber(controller.clone());
    let result = std::thread::scope(|scope| {
        let worker = scope.spawn(move || {
            let result = work();
            let _ = done_writer.write(1);
            result
        });
        while !controller
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .finished
        {
            if let Err(err) = manager.run_with_timeout(500) {
                tracing::warn!(?err, "event loop");
            }
        }
        worker.join().expect("the run's thread does not panic")
    });
    SIGNAL_EVENT.store(-1, Ordering::Relaxed);
    let last = metrics.snapshot();
    live.store(Arc::new(last));
    if let Some(file) = &mut controller
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .metrics_file
    {
        file.write(last);
    }
    Ok((result, **live.load()))
}
