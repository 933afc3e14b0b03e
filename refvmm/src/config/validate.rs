//! The range and combination checks, one function per section, each error
//! naming its field.

use super::layout;
use super::{Accel, BackendName, Config, ConfigError, Workload, invalid};

impl Config {
    /// Checks ranges and combinations, section by section, naming the
    /// field of the first problem.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check_vcpus()?;
        self.check_memory()?;
        self.check_mmu()?;
        self.check_tdx()?;
        match &self.workload.kind {
            Workload::DirtyLog {
                bytes_per_vcpu_mib,
                iterations,
                write_percent,
            } => self.check_dirty_log(*iterations, *bytes_per_vcpu_mib, *write_percent)?,
            Workload::Binary {
                path,
                load_gpa,
                entry_gpa,
                ..
            } => self.check_binary(path, *load_gpa, *entry_gpa)?,
            Workload::Convert {
                rounds,
                huge_pages_per_vcpu,
            } => self.check_convert(*rounds, *huge_pages_per_vcpu)?,
            Workload::Idle { duration_ms, .. } => {
                if !(1..=86_400_000).contains(duration_ms) {
                    return Err(invalid(
                        "workload.duration_ms",
                        "must be between 1 and 86400000 (a day)",
                    ));
                }
            }
            Workload::Hello | Workload::Counter => {}
        }
        self.check_migration()?;
        self.check_private_memory()?;
        self.check_accelerator()
    }

    /// `vcpus`.
    fn check_vcpus(&self) -> Result<(), ConfigError> {
        if !(1..=64).contains(&self.vcpus) {
            return Err(invalid("vcpus", "must be between 1 and 64"));
        }
        Ok(())
    }

    /// The `memory` section, and memory the accelerator cannot use.
    fn check_memory(&self) -> Result<(), ConfigError> {
        if self.memory.size_mib == 0 {
            return Err(invalid("memory.size_mib", "must be at least 1"));
        }
        if self.memory.size_mib > 1 << 20 {
            return Err(invalid(
                "memory.size_mib",
                "must be at most 1 TiB (1048576)",
            ));
        }
        if self.memory.backend == BackendName::Hugetlb {
            let huge_mib = (1u64 << self.memory.huge_page_size.log2()) >> 20;
            if !self.memory.size_mib.is_multiple_of(huge_mib) {
                return Err(invalid(
                    "memory.size_mib",
                    format!(
                        "{} MiB is not a multiple of the {} MiB huge page size",
                        self.memory.size_mib, huge_mib
                    ),
                ));
            }
        }
        if self.memory.prefault_threads == 0 || self.memory.prefault_threads > 256 {
            return Err(invalid(
                "memory.prefault_threads",
                "must be between 1 and 256",
            ));
        }
        if self.accel == Accel::Kvm && self.memory.backend == BackendName::Secret {
            return Err(invalid(
                "memory.backend",
                "memfd_secret memory has no kernel direct map, and KVM can only map guest memory \
                 it reaches through the direct map; use another backend",
            ));
        }
        Ok(())
    }

    /// The `mmu` section.
    fn check_mmu(&self) -> Result<(), ConfigError> {
        if self.mmu.cache_capacity < 5 || self.mmu.cache_capacity > 4096 {
            return Err(invalid(
                "mmu.cache_capacity",
                "must be between 5 (one 5-level walk) and 4096",
            ));
        }
        Ok(())
    }

    /// The `migration` section.
    fn check_migration(&self) -> Result<(), ConfigError> {
        let migration = &self.migration;
        if !(1..=migrate::format::MAX_STREAMS).contains(&migration.streams) {
            return Err(invalid(
                "migration.streams",
                format!("must be between 1 and {}", migrate::format::MAX_STREAMS),
            ));
        }
        if migration.max_downtime_ms == 0 {
            return Err(invalid("migration.max_downtime_ms", "must be at least 1"));
        }
        if migration.after_ms > 86_400_000 {
            return Err(invalid(
                "migration.after_ms",
                "must be at most 86400000 (a day)",
            ));
        }
        Ok(())
    }

    /// Whether the VM can migrate: not a TD (TD migration needs the TDX
    /// module's migration interface), not the convert workload. The
    /// field at fault, and why.
    pub fn check_migratable(&self) -> Result<(), ConfigError> {
        if self.tdx.enabled {
            return Err(invalid(
                "tdx.enabled",
                "a TD does not migrate: that needs the TDX module's migration interface",
            ));
        }
        if matches!(self.workload.kind, Workload::Convert { .. }) {
            return Err(invalid(
                "workload.kind",
                "convert does not migrate (its private memory is not readable through the \
                 host mapping); run dirty_log, counter, binary or idle",
            ));
        }
        if self.accel == Accel::Soft
            && !matches!(
                self.workload.kind,
                Workload::DirtyLog { .. } | Workload::Idle { .. }
            )
        {
            return Err(invalid(
                "workload.kind",
                "on the soft accelerator dirty_log and idle migrate",
            ));
        }
        Ok(())
    }

    /// The `tdx` section.
    fn check_tdx(&self) -> Result<(), ConfigError> {
        if self.tdx.enabled && self.accel == Accel::Kvm {
            return Err(invalid(
                "tdx.enabled",
                "TDX needs TDX hardware, which this host does not have; use \"accel\": \"soft\" \
                 to run the TD over the software TDX module",
            ));
        }
        Ok(())
    }

    /// A `dirty_log` workload and the memory it needs.
    fn check_dirty_log(
        &self,
        iterations: u32,
        bytes_per_vcpu_mib: u64,
        write_percent: u32,
    ) -> Result<(), ConfigError> {
        if iterations == 0 || iterations > 1000 {
            return Err(invalid("workload.iterations", "must be between 1 and 1000"));
        }
        if bytes_per_vcpu_mib == 0 {
            return Err(invalid("workload.bytes_per_vcpu_mib", "must be at least 1"));
        }
        if write_percent > 100 {
            return Err(invalid("workload.write_percent", "must be at most 100"));
        }
        let needed = (layout::SHARES >> 20) + u64::from(self.vcpus) * bytes_per_vcpu_mib;
        if needed > self.memory.size_mib {
            return Err(invalid(
                "memory.size_mib",
                format!(
                    "{} MiB is too small: the dirty_log shares start at 1 MiB and need \
                     {} vCPUs x {} MiB, so at least {needed} MiB",
                    self.memory.size_mib, self.vcpus, bytes_per_vcpu_mib
                ),
            ));
        }
        if self.accel == Accel::Kvm && self.memory.size_mib > layout::MAX_MAPPED_GIB << 10 {
            return Err(invalid(
                "memory.size_mib",
                format!(
                    "the KVM dirty_log guest maps at most {} GiB with its page tables",
                    layout::MAX_MAPPED_GIB
                ),
            ));
        }
        if self.accel == Accel::Kvm && self.memory.backend == BackendName::GuestMemfd {
            return Err(invalid(
                "memory.backend",
                "KVM does not log dirty pages of guest_memfd slots; use anonymous, memfd \
                 or hugetlb memory for dirty_log",
            ));
        }

        Ok(())
    }

    /// A `binary` workload: its file and where it loads and starts.
    fn check_binary(
        &self,
        path: &std::path::Path,
        load_gpa: u64,
        entry_gpa: u64,
    ) -> Result<(), ConfigError> {
        if !path.is_file() {
            return Err(invalid(
                "workload.path",
                format!("{} is not a readable file", path.display()),
            ));
        }
        let length = std::fs::metadata(path).map_or(0, |m| m.len());
        if length == 0 {
            return Err(invalid(
                "workload.path",
                format!("{} is empty: there is nothing to run", path.display()),
            ));
        }
        if self.vcpus > 1 && (load_gpa..load_gpa + length).contains(&layout::PARK) {
            return Err(invalid(
                "workload.load_gpa",
                format!(
                    "with {} vCPUs the others park on a `hlt` at {:#x}, which the \
                     binary ({length} bytes at {load_gpa:#x}) would cover: load it \
                     elsewhere, or run one vCPU",
                    self.vcpus,
                    layout::PARK
                ),
            ));
        }
        let outside_memory = |field, gpa: u64| {
            (gpa >= self.memory_bytes()).then(|| {
                invalid(
                    field,
                    format!(
                        "{gpa:#x} is outside the {} MiB of guest memory",
                        self.memory.size_mib
                    ),
                )
            })
        };
        if let Some(err) = outside_memory("workload.load_gpa", load_gpa) {
            return Err(err);
        }
        if self.accel == Accel::Kvm && load_gpa >= layout::MMIO_HOLE_START {
            return Err(invalid(
                "workload.load_gpa",
                "binaries load into the memory below the 3 GiB MMIO hole",
            ));
        }
        if let Some(err) = outside_memory("workload.entry_gpa", entry_gpa) {
            return Err(err);
        }

        Ok(())
    }

    /// A `convert` workload and the memory it needs.
    fn check_convert(&self, rounds: u32, huge_pages_per_vcpu: u64) -> Result<(), ConfigError> {
        if rounds == 0 || rounds > 10_000 {
            return Err(invalid("workload.rounds", "must be between 1 and 10000"));
        }
        if huge_pages_per_vcpu < 2 {
            return Err(invalid(
                "workload.huge_pages_per_vcpu",
                "must be at least 2 (one for 4 KiB conversions, one converted whole)",
            ));
        }
        let needed = 2 * u64::from(self.vcpus) * huge_pages_per_vcpu;
        if needed > self.memory.size_mib {
            return Err(invalid(
                "memory.size_mib",
                format!(
                    "{} MiB is too small: convert gives each of {} vCPUs {} pages of \
                     2 MiB, so at least {needed} MiB",
                    self.memory.size_mib, self.vcpus, huge_pages_per_vcpu
                ),
            ));
        }
        if self.memory.private_backend.is_none() {
            return Err(invalid(
                "memory.private_backend",
                "convert needs private memory: name its backend (memfd, hugetlb, secret \
                 or anonymous)",
            ));
        }

        Ok(())
    }

    /// `memory.private_backend` against the accelerator and workload.
    fn check_private_memory(&self) -> Result<(), ConfigError> {
        if let Some(private) = self.memory.private_backend {
            if self.accel != Accel::Soft {
                return Err(invalid(
                    "memory.private_backend",
                    "private memory runs on the soft accelerator (this host's KVM has no \
                     SW-protected VMs or TDX); use \"accel\": \"soft\"",
                ));
            }
            if private == BackendName::GuestMemfd {
                return Err(invalid(
                    "memory.private_backend",
                    "the soft accelerator has no KVM VM to make a guest_memfd on; use memfd, \
                     hugetlb, secret or anonymous",
                ));
            }
            if private == BackendName::Hugetlb {
                let huge_mib = (1u64 << self.memory.huge_page_size.log2()) >> 20;
                if !self.memory.size_mib.is_multiple_of(huge_mib) {
                    return Err(invalid(
                        "memory.size_mib",
                        format!(
                            "{} MiB is not a multiple of the {} MiB huge page size of the \
                             private memory",
                            self.memory.size_mib, huge_mib
                        ),
                    ));
                }
            }
            if matches!(self.workload.kind, Workload::DirtyLog { .. }) {
                return Err(invalid(
                    "memory.private_backend",
                    "dirty logging covers shared memory only; run dirty_log without \
                     private_backend, or the convert workload",
                ));
            }
        }
        Ok(())
    }

    /// What the accelerator can run.
    fn check_accelerator(&self) -> Result<(), ConfigError> {
        if self.accel == Accel::Soft
            && !matches!(
                self.workload.kind,
                Workload::DirtyLog { .. } | Workload::Convert { .. } | Workload::Idle { .. }
            )
        {
            return Err(invalid(
                "workload.kind",
                "the soft accelerator runs no guest code: only \"dirty_log\" and \"convert\" \
                 run on it",
            ));
        }
        if self.accel == Accel::Kvm && matches!(self.workload.kind, Workload::Convert { .. }) {
            return Err(invalid(
                "workload.kind",
                "convert runs on the soft accelerator; use \"accel\": \"soft\"",
            ));
        }
        if self.accel == Accel::Kvm && self.memory.size_mib < 2 {
            return Err(invalid("memory.size_mib", "guests need at least 2 MiB"));
        }
        Ok(())
    }
}
