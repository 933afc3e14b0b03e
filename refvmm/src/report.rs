//! The run report: human text, or one JSON object.

use std::fmt::Write as _;

use serde::Serialize;

/// Leaf counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Pages {
    /// 4K leaves.
    #[serde(rename = "4k")]
    pub pages_4k: u64,
    /// 2M leaves.
    #[serde(rename = "2m")]
    pub pages_2m: u64,
    /// 1G leaves.
    #[serde(rename = "1g")]
    pub pages_1g: u64,
}

impl From<split::PageStats> for Pages {
    fn from(stats: split::PageStats) -> Self {
        Self {
            pages_4k: stats.pages_4k,
            pages_2m: stats.pages_2m,
            pages_1g: stats.pages_1g,
        }
    }
}

/// One dirty-log iteration.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Iteration {
    /// Time for every vCPU to finish its pass.
    pub dirty_s: f64,
    /// Time to get the dirty log.
    pub get_dirty_log_s: f64,
    /// Time to clear it (manual protect), else 0.
    pub clear_dirty_log_s: f64,
    /// Pages in the log.
    pub dirty_pages: u64,
}

/// The dirty_log figures.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct DirtyLog {
    /// The populating pass.
    pub populate_s: f64,
    /// Enabling dirty logging.
    pub enable_dirty_log_s: f64,
    /// Each iteration.
    pub iterations: Vec<Iteration>,
    /// Leaf counts before enabling, where the accelerator knows them.
    pub pages_before_enable: Option<Pages>,
    /// Leaf counts after enabling.
    pub pages_after_enable: Option<Pages>,
    /// Huge-page splits of the software MMU, where the accelerator knows them.
    pub splits: Option<SplitFigures>,
}

/// Huge-page splits of the software MMU over the run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SplitFigures {
    /// Huge leaves split by a splitter (eager splitting, boundaries).
    pub eager: u64,
    /// Huge leaves split by a write fault (lazy mode, or after a fallback).
    pub lazy: u64,
    /// Huge leaves an eager split could not split (memory ran out, or the
    /// hooks refused), write-protected whole instead, per protect pass.
    pub fallbacks: u64,
}

/// Memory-cache figures (soft accelerator).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CacheFigures {
    /// Topups that filled.
    pub topups: u64,
    /// Pages taken from the allocator by topups.
    pub pages_taken: u64,
    /// Allocations that found a cache empty and fell back.
    pub fallback_allocations: u64,
}

/// TDX figures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TdxFigures {
    /// SEAMCALLs made.
    pub seamcalls: u64,
    /// PAMT pages in use at the end of the run.
    pub pamt_pages: u64,
}

/// The convert workload's figures.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ConvertFigures {
    /// `td` or `software_protected`.
    pub vm_type: String,
    /// The private memory's backend.
    pub private_backend: String,
    /// Conversions made (each way, 4 KiB and whole 2 MiB pages).
    pub conversions: u64,
    /// Of which 4 KiB pages inside a 2 MiB page.
    pub conversions_4k: u64,
    /// Guest accesses that exited to the VMM with a memory fault (a private
    /// access to a page the guest had made shared), each converted back.
    pub memory_fault_exits: u64,
    /// Private huge leaves split at a conversion's edge (a TD's DEMOTEs).
    pub demotes: u64,
    /// Leaves zapped by conversions.
    pub zapped: u64,
    /// Leaf counts after the first private pass.
    pub pages_before: Pages,
    /// Leaf counts at the end.
    pub pages_after: Pages,
    /// Split steps of the private HugeTLB file (`FileMetrics::splits`): a
    /// 2 MiB page onto 4 KiB pages counts one; a 1 GiB page counts one for
    /// its 2 MiB pieces and one more for each piece that goes on to 4 KiB.
    pub hugetlb_splits: u64,
    /// Merge steps, the reverse of each split step, counted the same way.
    pub hugetlb_merges: u64,
    /// PAMT pages in use at the end (a TD).
    pub pamt_pages: Option<u64>,
    /// Pages whose data was checked, on both sides.
    pub pages_checked: u64,
    /// Time the vCPUs ran.
    pub run_s: f64,
}

/// What backs guest memory, read back from the kernel (`/proc/self/smaps`).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct MemoryPages {
    /// The backend's form: `private anonymous` (a VM with no private
    /// pages), `shared anonymous`, or the backend's name.
    pub form: String,
    /// Bytes of guest memory resident.
    pub resident_bytes: u64,
    /// Of those, bytes in huge pages (transparent or HugeTLB).
    pub huge_page_bytes: u64,
}

impl MemoryPages {
    /// What backs `file` now; the sizes are left 0 where smaps cannot be
    /// read.
    pub fn of(file: &gmem::GuestMemFile) -> Self {
        let seen = file.residency().unwrap_or_default();
        Self {
            form: file.form().into(),
            resident_bytes: seen.resident,
            huge_page_bytes: seen.huge,
        }
    }
}

/// The report of one run.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Report {
    /// `kvm` or `soft`.
    pub accel: String,
    /// The memory backend.
    pub backend: String,
    /// vCPUs created, every one of which ran.
    pub vcpus: u32,
    /// Of those, the ones that ran only to park (halted) while the first
    /// ran the program (`hello`, `counter`, `binary`).
    #[serde(skip_serializing_if = "is_zero")]
    pub vcpus_parked: u32,
    /// Guest memory.
    pub memory_bytes: u64,
    /// Prefault throughput, when prefault was on.
    pub prefault_gib_s: Option<f64>,
    /// Whether guest memory asked for transparent huge pages where the
    /// host gives them (private anonymous memory under the host's anonymous
    /// THP mode, shared anonymous and memfd memory under its shmem mode).
    pub transparent_huge_pages: bool,
    /// What backs guest memory at the end of the run, as the kernel says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_pages: Option<MemoryPages>,
    /// The workload kind.
    pub workload: String,
    /// dirty_log figures.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub dirty_log: Option<DirtyLog>,
    /// convert figures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub convert: Option<ConvertFigures>,
    /// Cache figures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheFigures>,
    /// TDX figures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tdx: Option<TdxFigures>,
    /// Live migration figures (with `--migrate-to` or `--incoming`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migration: Option<crate::migration::MigrationFigures>,
    /// Bytes the guest wrote to the serial port.
    pub serial_bytes: u64,
    /// vCPU exits handled (KVM), from the live metrics.
    pub vcpu_exits: u64,
    /// Passes done (dirty_log iterations, convert vCPUs finished), from the
    /// live metrics.
    pub passes: u64,
    /// Whether a signal (SIGINT, SIGTERM) stopped the run before its end.
    pub interrupted: bool,
    /// Why the run ended.
    pub exit: String,
}

fn is_zero(value: &u32) -> bool {
    *value == 0
}

/// A duration in seconds, printed in the unit that keeps three
/// significant digits: `1.25 s`, `12.5 ms`, `840 us`, `0 us`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Seconds(pub f64);

impl std::fmt::Display for Seconds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.0;
        let (value, unit) = if s >= 1.0 {
            (s, "s")
        } else if s >= 1e-3 {
            (s * 1e3, "ms")
        } else {
            (s * 1e6, "us")
        };
        let decimals = if value >= 100.0 || value == 0.0 {
            0
        } else if value >= 10.0 {
            1
        } else {
            2
        };
        write!(f, "{value:.decimals$} {unit}")
    }
}

impl Report {
    /// The report as one JSON object.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("reports serialize")
    }

    /// The report as text for people.
    pub fn to_human(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "refvmm: {} on {} memory, {} vCPU{}, {} MiB, workload {}: {}",
            self.accel,
            self.backend,
            self.vcpus,
            if self.vcpus == 1 { "" } else { "s" },
            self.memory_bytes >> 20,
            self.workload,
            self.exit
        );
        if self.vcpus_parked > 0 {
            let _ = writeln!(
                out,
                "  vCPU 0 ran the program; {} more ran to a halt and stayed parked",
                self.vcpus_parked
            );
        }
        if let Some(pages) = &self.memory_pages {
            let _ = writeln!(
                out,
                "  memory: {}{}, {} MiB resident, {} MiB of it in huge pages",
                pages.form,
                if self.transparent_huge_pages {
                    " (asked for transparent huge pages)"
                } else {
                    ""
                },
                pages.resident_bytes >> 20,
                pages.huge_page_bytes >> 20
            );
        } else if self.transparent_huge_pages {
            let _ = writeln!(out, "  memory asked for transparent huge pages");
        }
        if let Some(rate) = self.prefault_gib_s {
            let _ = writeln!(out, "  prefault: {rate:.2} GiB/s");
        }
        if let Some(log) = &self.dirty_log {
            let _ = writeln!(
                out,
                "  populate {}, enable dirty logging {}",
                Seconds(log.populate_s),
                Seconds(log.enable_dirty_log_s)
            );
            for (i, it) in log.iterations.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "  iteration {}: dirty {}, get {}, clear {}, {} dirty pages",
                    i + 1,
                    Seconds(it.dirty_s),
                    Seconds(it.get_dirty_log_s),
                    Seconds(it.clear_dirty_log_s),
                    it.dirty_pages
                );
            }
            if let (Some(before), Some(after)) = (log.pages_before_enable, log.pages_after_enable) {
                let _ = writeln!(
                    out,
                    "  pages before enable 4k/2m/1g {}/{}/{}, after {}/{}/{}",
                    before.pages_4k,
                    before.pages_2m,
                    before.pages_1g,
                    after.pages_4k,
                    after.pages_2m,
                    after.pages_1g
                );
            }
            if let Some(splits) = log.splits {
                let _ = writeln!(
                    out,
                    "  splits: {} eager, {} lazy, {} fell back to write protection",
                    splits.eager, splits.lazy, splits.fallbacks
                );
            }
        }
        if let Some(c) = &self.convert {
            let _ = writeln!(
                out,
                "  {} with {} private memory: {} conversions ({} of 4 KiB pages), {} memory-fault \
                 exits, {} demotes, {} leaves zapped, {}",
                c.vm_type,
                c.private_backend,
                c.conversions,
                c.conversions_4k,
                c.memory_fault_exits,
                c.demotes,
                c.zapped,
                Seconds(c.run_s)
            );
            let _ = writeln!(
                out,
                "  leaves 4k/2m/1g after the first pass {}/{}/{}, at the end {}/{}/{}",
                c.pages_before.pages_4k,
                c.pages_before.pages_2m,
                c.pages_before.pages_1g,
                c.pages_after.pages_4k,
                c.pages_after.pages_2m,
                c.pages_after.pages_1g
            );
            let pamt = c
                .pamt_pages
                .map_or_else(String::new, |p| format!(", {p} PAMT pages in use"));
            let _ = writeln!(
                out,
                "  HugeTLB split steps {}, merge steps {}; {} pages checked{pamt}",
                c.hugetlb_splits, c.hugetlb_merges, c.pages_checked
            );
        }
        if let Some(cache) = &self.cache {
            let _ = writeln!(
                out,
                "  caches: {} topups, {} pages taken, {} fallback allocations",
                cache.topups, cache.pages_taken, cache.fallback_allocations
            );
        }
        if let Some(tdx) = &self.tdx {
            let _ = writeln!(
                out,
                "  tdx: {} SEAMCALLs, {} PAMT pages in use",
                tdx.seamcalls, tdx.pamt_pages
            );
        }
        if let Some(migration) = &self.migration {
            migration.write_human(&mut out);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_keep_their_digits_in_a_fitting_unit() {
        assert_eq!(Seconds(1.25).to_string(), "1.25 s");
        assert_eq!(Seconds(0.0125).to_string(), "12.5 ms");
        assert_eq!(Seconds(0.000_84).to_string(), "840 us");
        assert_eq!(Seconds(0.000_000_4).to_string(), "0.40 us");
        assert_eq!(Seconds(0.0).to_string(), "0 us");
        assert_eq!(Seconds(125.0).to_string(), "125 s");
    }

    #[test]
    fn one_vcpu_is_not_plural() {
        let report = Report {
            vcpus: 1,
            ..Report::default()
        };
        assert!(report.to_human().contains(", 1 vCPU, "));
    }
}
