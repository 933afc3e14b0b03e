//! The library side of refvmm: its configuration, accelerators, guest
//! programs, reports and snapshots (the binary is a thin command line over
//! them; the fuzz targets use the parsers).

pub mod config;
pub mod convert;
pub mod engine;
pub mod events;
pub mod fill;
pub mod guest_error;
pub mod kvm_run;
pub mod migration;
pub mod programs;
pub mod report;
pub mod snapshot;
pub mod soft_run;

use config::Workload;

/// The workload's name in reports.
pub fn workload_name(workload: &Workload) -> &'static str {
    match workload {
        Workload::Hello => "hello",
        Workload::DirtyLog { .. } => "dirty_log",
        Workload::Counter => "counter",
        Workload::Binary { .. } => "binary",
        Workload::Convert { .. } => "convert",
        Workload::Idle { .. } => "idle",
    }
}
