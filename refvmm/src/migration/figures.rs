//! What a migration reports, on either side.

use std::fmt::Write;

use serde::Serialize;

use crate::report::Seconds;

/// One pass over memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct PassFigures {
    /// Pages sent (zero runs included).
    pub pages: u64,
    /// Bytes sent.
    pub bytes: u64,
    /// Seconds the pass took.
    pub seconds: f64,
    /// Pages the guest dirtied per second while it ran.
    pub dirty_pages_per_s: f64,
}

/// A migration, as the source or the destination saw it.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct MigrationFigures {
    /// `source` or `destination`.
    pub role: String,
    /// The other side's address.
    pub address: String,
    /// `completed`, or `failed` with `why`.
    pub outcome: String,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
    /// Connecting and the header's answer (source).
    pub setup_s: f64,
    /// From connecting to the take-over, the setup included (source); from
    /// the connection to the end of the stream (destination).
    pub total_s: f64,
    /// From the vCPUs' stop to the take-over (source).
    pub downtime_s: f64,
    /// The downtime allowed.
    pub max_downtime_ms: u64,
    /// Whether what was left fit the downtime before the pass limit.
    pub converged: bool,
    /// Every pass, the switch-over last (source).
    pub passes: Vec<PassFigures>,
    /// Zero pages of the full copy that were not sent.
    pub zero_pages_skipped: u64,
    /// Pages sent or received.
    pub pages: u64,
    /// Bytes sent or received.
    pub bytes: u64,
    /// MiB per second over the migration.
    pub throughput_mib_s: f64,
    /// Connections that carried memory.
    pub streams: u32,
    /// Pages that arrived changed after the source took their checksum
    /// and came again in a later pass (destination).
    pub pages_changed_in_flight: u64,
}

impl MigrationFigures {
    /// The figures as text, for the human report.
    pub fn write_human(&self, out: &mut String) {
        let why = self
            .why
            .as_ref()
            .map_or_else(String::new, |why| format!(": {why}"));
        let _ = writeln!(
            out,
            "  migration ({} of {}): {}{why}",
            self.role, self.address, self.outcome
        );
        if self.outcome != "completed" && self.passes.is_empty() && self.pages == 0 {
            return;
        }
        if self.role == "destination" {
            let _ = writeln!(
                out,
                "  migration: received {} pages ({} MiB) in {} at {:.0} MiB/s, {} changed in flight \
                 and came again",
                self.pages,
                self.bytes >> 20,
                Seconds(self.total_s),
                self.throughput_mib_s,
                self.pages_changed_in_flight
            );
            return;
        }
        let _ = writeln!(
            out,
            "  migration: total {}, downtime {} (max {} ms), setup {}, {} pages ({} MiB) at {:.0} \
             MiB/s over {} connection{}, {} zero pages skipped, {}",
            Seconds(self.total_s),
            Seconds(self.downtime_s),
            self.max_downtime_ms,
            Seconds(self.setup_s),
            self.pages,
            self.bytes >> 20,
            self.throughput_mib_s,
            self.streams,
            if self.streams == 1 { "" } else { "s" },
            self.zero_pages_skipped,
            if self.converged {
                "converged"
            } else {
                "did not converge"
            }
        );
        for (i, pass) in self.passes.iter().enumerate() {
            let name = if i == 0 {
                "full copy".to_string()
            } else if i + 1 == self.passes.len() {
                "switch-over".to_string()
            } else {
                format!("pass {i}")
            };
            let _ = writeln!(
                out,
                "    {name}: {} pages, {} KiB in {}, guest dirtied {:.0} pages/s",
                pass.pages,
                pass.bytes >> 10,
                Seconds(pass.seconds),
                pass.dirty_pages_per_s
            );
        }
    }
}
