//! The handshake between a workload's host loop and the migration thread:
//! the migration may start once the workload is ready, owns the dirty log
//! while it sends, asks for the vCPUs to stop, and gets them stopped at a
//! point where the workload's state is whole; the workload then learns
//! whether the destination took over.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

use migrate::SendReport;

/// Named state sections, for the stream.
pub type StateSections = Vec<(String, Vec<u8>)>;

/// Where a migration stands.
#[derive(Debug)]
enum Phase {
    /// Not started: waiting for `after_ms`, or for the workload.
    Waiting,
    /// Memory is being sent; the dirty log is the migration's.
    Precopy,
    /// The migration asks the workload to stop its vCPUs.
    Requested,
    /// The vCPUs stopped at `at`; the workload's state.
    Stopped { at: Instant, state: StateSections },
    /// Over: the destination took over, or why not.
    Done(Result<SendReport, String>),
}

/// What the workload does after handing its vCPUs over.
#[derive(Debug)]
pub enum Handover {
    /// The destination runs the VM: the workload ends here.
    Migrated(SendReport),
    /// The migration failed: the workload resumes and runs to its end.
    Resume(String),
}

/// Shared by the workload's host loop and the migration thread.
#[derive(Debug)]
pub struct Switch {
    phase: Mutex<Phase>,
    changed: Condvar,
    ready: Mutex<bool>,
    finished: Mutex<bool>,
    /// The workload ended without handing its vCPUs over (it failed).
    gone: Mutex<bool>,
    /// Bumped at every change of phase: a pass that saw the same epoch at
    /// its start and end, outside a migration, had the dirty log to itself.
    epoch: AtomicU64,
    /// Wakes vCPUs that run guest code, so that they see a stop request.
    waker: Option<fn()>,
}

impl Default for Switch {
    fn default() -> Self {
        Self {
            phase: Mutex::new(Phase::Waiting),
            changed: Condvar::new(),
            ready: Mutex::new(false),
            finished: Mutex::new(false),
            gone: Mutex::new(false),
            epoch: AtomicU64::new(0),
            waker: None,
        }
    }
}

impl Switch {
    /// A switch whose stop requests call `waker` (to kick vCPUs out of
    /// the guest).
    pub fn with_waker(waker: fn()) -> Self {
        Self {
            waker: Some(waker),
            ..Self::default()
        }
    }

    fn phase(&self) -> MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn flag(flag: &Mutex<bool>) -> MutexGuard<'_, bool> {
        flag.lock().unwrap_or_else(|p| p.into_inner())
    }

    // ----- the workload's side ----------------------------------------------

    /// The workload is running and its dirty log (if any) is on: the
    /// migration may start.
    pub fn ready(&self) {
        *Self::flag(&self.ready) = true;
        self.changed.notify_all();
    }

    /// The phase's epoch (see [`migrating`](Self::migrating)).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Whether the migration owns the dirty log now (the workload must not
    /// read it). A pass may check its log only if this was false at its
    /// start and end and the [`epoch`](Self::epoch) did not move.
    pub fn migrating(&self) -> bool {
        matches!(
            *self.phase(),
            Phase::Precopy | Phase::Requested | Phase::Stopped { .. }
        )
    }

    /// Runs `read_log` with the dirty log the workload's own: unless a
    /// migration owns it now or took it since `epoch` (then `None`). A
    /// migration cannot start while `read_log` runs.
    pub fn unless_migrating<T>(&self, epoch: u64, read_log: impl FnOnce() -> T) -> Option<T> {
        let phase = self.phase();
        let owned = matches!(
            *phase,
            Phase::Precopy | Phase::Requested | Phase::Stopped { .. }
        );
        if owned || self.epoch() != epoch {
            return None;
        }
        let result = read_log();
        drop(phase);
        Some(result)
    }

    /// Whether the migration asks for the vCPUs to stop.
    pub fn wants_stop(&self) -> bool {
        matches!(*self.phase(), Phase::Requested)
    }

    /// Whether the migration is over.
    pub fn over(&self) -> bool {
        matches!(*self.phase(), Phase::Done(_))
    }

    /// With the vCPUs stopped: hands `state` to the migration and waits
    /// for its outcome. At the workload's end, call it whatever the phase:
    /// it makes a migration that has not asked yet switch over at once.
    pub fn hand_over(&self, state: StateSections) -> Handover {
        *Self::flag(&self.finished) = true;
        self.changed.notify_all();
        let mut phase = self.phase();
        loop {
            match &*phase {
                Phase::Requested => {
                    *phase = Phase::Stopped {
                        at: Instant::now(),
                        state,
                    };
                    self.changed.notify_all();
                    break;
                }
                Phase::Done(_) => break,
                _ => phase = self.changed.wait(phase).unwrap_or_else(|p| p.into_inner()),
            }
        }
        loop {
            if let Phase::Done(outcome) = &*phase {
                return match outcome {
                    Ok(report) => Handover::Migrated(report.clone()),
                    Err(why) => Handover::Resume(why.clone()),
                };
            }
            phase = self.changed.wait(phase).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The workload ended without handing over (it failed): a migration
    /// that waits for it stops waiting.
    pub fn abandon(&self) {
        *Self::flag(&self.finished) = true;
        *Self::flag(&self.gone) = true;
        let _phase = self.phase();
        self.changed.notify_all();
    }

    /// The outcome of a migration that is over (`None` while it runs or
    /// never started).
    pub fn outcome(&self) -> Option<Result<SendReport, String>> {
        match &*self.phase() {
            Phase::Done(outcome) => Some(outcome.clone()),
            _ => None,
        }
    }

    // ----- the migration's side ---------------------------------------------

    /// Waits until the workload is ready and `deadline` has passed, or the
    /// workload finished (then at once).
    pub fn wait_to_start(&self, deadline: Instant) {
        loop {
            if *Self::flag(&self.finished) {
                return;
            }
            let ready = Self::flag(&self.ready);
            let now = Instant::now();
            if *ready && now >= deadline {
                return;
            }
            let wait = if *ready {
                deadline - now
            } else {
                std::time::Duration::from_millis(50)
            };
            let _ = self
                .changed
                .wait_timeout(ready, wait)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Whether the workload ended without handing over.
    pub fn is_gone(&self) -> bool {
        *Self::flag(&self.gone)
    }

    /// Whether the workload finished (pre-copy then switches over at once).
    pub fn workload_finished(&self) -> bool {
        *Self::flag(&self.finished)
    }

    /// The migration starts sending (and owns the dirty log).
    pub fn start_precopy(&self) {
        let mut phase = self.phase();
        *phase = Phase::Precopy;
        self.epoch.fetch_add(1, Ordering::SeqCst);
        drop(phase);
        self.changed.notify_all();
    }

    /// Asks for the vCPUs to stop and waits until they did: when, and the
    /// workload's state; `None` when the workload ended without them.
    pub fn request_stop(&self) -> Option<(Instant, StateSections)> {
        let mut phase = self.phase();
        *phase = Phase::Requested;
        self.changed.notify_all();
        if let Some(wake) = self.waker {
            wake();
        }
        loop {
            if let Phase::Stopped { at, state } = &mut *phase {
                return Some((*at, std::mem::take(state)));
            }
            if *Self::flag(&self.gone) {
                return None;
            }
            phase = self
                .changed
                .wait_timeout(phase, std::time::Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// The migration is over.
    pub fn finish(&self, outcome: Result<SendReport, String>) {
        let mut phase = self.phase();
        *phase = Phase::Done(outcome);
        self.epoch.fetch_add(1, Ordering::SeqCst);
        drop(phase);
        self.changed.notify_all();
    }
}
