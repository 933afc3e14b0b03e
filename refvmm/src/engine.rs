//! What both accelerators share: errors with their exit codes, guest
//! memory from gmem, prefault with a progress bar.

use std::io::IsTerminal;
use std::sync::Arc;

use gmem::consts::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
use gmem::{Backend, Capability, GmemConfig, GuestMemFile, KvmVm};

use crate::config::{BackendName, Config, layout};
use crate::guest_error::GuestError;
use crate::snapshot::SnapshotError;

/// Errors of a run; [`RunError::exit_code`] maps them to 1 (the guest or
/// the workload failed) or 2 (configuration or host).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The host lacks something the configuration needs.
    #[error("{what}: {fix}")]
    Host {
        /// What is missing.
        what: String,
        /// What to do.
        fix: String,
    },
    /// Guest memory could not be made.
    #[error("memory.backend: {0}")]
    Memory(#[from] gmem::GmemError),
    /// A KVM ioctl failed.
    #[error("KVM: {op}: {source}")]
    Ioctl {
        /// The ioctl.
        op: &'static str,
        /// The kernel's error.
        source: kvm_ioctls::Error,
    },
    /// gmem's KVM binding refused a step.
    #[error("KVM: {step}: {source}")]
    Kvm {
        /// The step.
        step: &'static str,
        /// The binding's error.
        source: gmem::KvmError,
    },
    /// A guest memory region could not be made.
    #[error("guest memory: {step}: {source}")]
    Region {
        /// The step.
        step: &'static str,
        /// The region's error.
        source: gmem::RegionError,
    },
    /// The software MMU refused a step.
    #[error("software MMU: {step}: {source}")]
    Mmu {
        /// The step.
        step: &'static str,
        /// The MMU's error.
        source: split::MmuError,
    },
    /// A memslot over guest memory could not be made.
    #[error("software MMU: memslot: {0}")]
    Memslot(#[source] split::MemslotError),
    /// The private-memory VM refused a step.
    #[error("private memory: {step}: {source}")]
    Private {
        /// The step.
        step: &'static str,
        /// Its error.
        source: mmukit_private::PrivateError,
    },
    /// The software TDX module refused a step.
    #[error("TDX module: {step}: {status}")]
    Tdx {
        /// The step.
        step: &'static str,
        /// The module's status.
        status: tdx_ext::TdxStatus,
    },
    /// The guest or the workload failed.
    #[error("guest: {0}")]
    Guest(#[from] GuestError),
    /// A vCPU stopped in a way no workload expects (a triple fault, an
    /// emulation failure, a failed entry, memory with no slot) or ran past
    /// `workload.timeout_ms`: its exit and registers.
    #[error("guest: {0}")]
    GuestFault(Box<GuestFault>),
    /// A snapshot could not be saved or restored.
    #[error("snapshot: {0}")]
    Snapshot(#[from] SnapshotError),
}

impl RunError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Guest(_) | Self::GuestFault(_) => 1,
            _ => 2,
        }
    }

    /// The configuration field at fault, when there is one: a host error's
    /// message starts with it (`memory.backend: needs ...`).
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::Host { what, .. } => {
                let (head, _) = what.split_once(": ")?;
                let is_field = !head.is_empty()
                    && head.chars().all(|c| {
                        c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | '-')
                    });
                is_field.then_some(head)
            }
            Self::Memory(_) => Some("memory.backend"),
            _ => None,
        }
    }
}

/// Where a vCPU stood when it failed: what a VMM developer reads first.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct GuestFault {
    /// The vCPU.
    pub vcpu: u64,
    /// Why it stopped: the KVM exit (`KVM_EXIT_SHUTDOWN: triple fault`,
    /// `KVM_EXIT_INTERNAL_ERROR`, ...) or the timeout.
    pub exit: String,
    /// `kvm_run.internal.suberror` of `KVM_EXIT_INTERNAL_ERROR`
    /// (1: emulation failure, 2: simultaneous exceptions, 3: delivery event).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suberror: Option<u32>,
    /// The registers, when KVM could read them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registers: Option<Registers>,
}

/// A vCPU's registers at a fault.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[expect(missing_docs, reason = "the x86 register names say what each is")]
pub struct Registers {
    pub rip: u64,
    pub rsp: u64,
    pub rflags: u64,
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub cs_selector: u16,
    pub cs_base: u64,
}

impl Registers {
    /// Reads them from `vcpu`.
    pub fn read(vcpu: &kvm_ioctls::VcpuFd) -> Option<Self> {
        let regs = vcpu.get_regs().ok()?;
        let sregs = vcpu.get_sregs().ok()?;
        Some(Self {
            rip: regs.rip,
            rsp: regs.rsp,
            rflags: regs.rflags,
            rax: regs.rax,
            rbx: regs.rbx,
            rcx: regs.rcx,
            rdx: regs.rdx,
            rsi: regs.rsi,
            rdi: regs.rdi,
            rbp: regs.rbp,
            cr0: sregs.cr0,
            cr2: sregs.cr2,
            cr3: sregs.cr3,
            cr4: sregs.cr4,
            efer: sregs.efer,
            cs_selector: sregs.cs.selector,
            cs_base: sregs.cs.base,
        })
    }

    /// The processor mode the registers say.
    pub fn mode(&self) -> &'static str {
        if self.efer & (1 << 10) != 0 {
            "long"
        } else if self.cr0 & 1 != 0 {
            "protected"
        } else {
            "real"
        }
    }
}

impl GuestFault {
    /// The fault of `vcpu` (number `id`) stopped by `exit`, with its
    /// registers.
    pub fn of(vcpu: &kvm_ioctls::VcpuFd, id: u64, exit: impl Into<String>) -> RunError {
        RunError::GuestFault(Box::new(Self {
            vcpu: id,
            exit: exit.into(),
            suberror: None,
            registers: Registers::read(vcpu),
        }))
    }
}

impl std::fmt::Display for GuestFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "vCPU {} stopped: {}", self.vcpu, self.exit)?;
        if let Some(suberror) = self.suberror {
            write!(f, " (suberror {suberror})")?;
        }
        if let Some(r) = &self.registers {
            write!(
                f,
                "; {} mode, rip={:#x} cs={:#x} (base {:#x}) rsp={:#x} rflags={:#x} \
                 rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} rbp={:#x} \
                 cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
                r.mode(),
                r.rip,
                r.cs_selector,
                r.cs_base,
                r.rsp,
                r.rflags,
                r.rax,
                r.rbx,
                r.rcx,
                r.rdx,
                r.rsi,
                r.rdi,
                r.rbp,
                r.cr0,
                r.cr2,
                r.cr3,
                r.cr4,
                r.efer
            )?;
        }
        Ok(())
    }
}

/// What each dirty-log pass does: how many passes, the bytes each vCPU
/// walks, and the share of its pages it writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PassPlan {
    /// Passes after the populate pass.
    pub iterations: u32,
    /// Bytes of each vCPU's share.
    pub share_bytes: u64,
    /// Percent of each share's pages written (the rest are read).
    pub write_percent: u32,
}

impl PassPlan {
    /// The bytes all `vcpus` shares take.
    pub fn total_share_bytes(&self, vcpus: usize) -> u64 {
        vcpus as u64 * self.share_bytes
    }
}

/// Maps a kvm-ioctls error into a run error naming the call.
pub fn kvm_err(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> RunError {
    move |source| RunError::Ioctl { op, source }
}

impl RunError {
    /// Wraps an MMU error of `step`.
    pub fn mmu(step: &'static str) -> impl Fn(split::MmuError) -> Self {
        move |source| Self::Mmu { step, source }
    }

    /// Wraps a KVM binding error of `step`.
    pub fn kvm(step: &'static str) -> impl Fn(gmem::KvmError) -> Self {
        move |source| Self::Kvm { step, source }
    }

    /// Wraps a TDX module status of `step`.
    pub fn tdx(step: &'static str) -> impl Fn(tdx_ext::TdxStatus) -> Self {
        move |status| Self::Tdx { step, status }
    }

    /// Wraps a private-memory error of `step`.
    pub fn private(step: &'static str) -> impl Fn(mmukit_private::PrivateError) -> Self {
        move |source| Self::Private { step, source }
    }
}

/// One thing a configuration needs of the host: the capability, the field
/// that asks for it, and what to do without it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostNeed {
    /// The capability.
    pub capability: Capability,
    /// The configuration field that needs it.
    pub field: &'static str,
    /// What to do on a host without it.
    pub fix: &'static str,
}

/// The memory backends `config` uses, with the field naming each.
fn memory_backends(config: &Config) -> impl Iterator<Item = (&'static str, BackendName)> {
    [
        ("memory.backend", Some(config.memory.backend)),
        ("memory.private_backend", config.memory.private_backend),
    ]
    .into_iter()
    .filter_map(|(field, backend)| Some((field, backend?)))
}

/// Whether pages of the VM's memory may become private (a TD, private
/// memory, conversions): then its anonymous memory must be the shared form,
/// whose views can hide a page; otherwise it is private anonymous memory,
/// which gets transparent huge pages under the host's default THP mode.
pub fn has_private_pages(config: &Config) -> bool {
    config.tdx.enabled
        || config.memory.private_backend.is_some()
        || matches!(
            config.workload.kind,
            crate::config::Workload::Convert { .. }
        )
}

/// What `config` needs of the host, in the order [`check_host`] checks it.
pub fn host_needs(config: &Config) -> Vec<HostNeed> {
    let mut needs = Vec::new();
    let mut need = |capability, field, fix| {
        needs.push(HostNeed {
            capability,
            field,
            fix,
        });
    };
    let kvm = config.accel == crate::config::Accel::Kvm;
    if kvm {
        need(
            Capability::Kvm,
            "accel",
            "run on a host with KVM, or use \"accel\": \"soft\"",
        );
    }
    for (field, backend) in memory_backends(config) {
        match backend {
            BackendName::Hugetlb => need(
                Capability::hugetlb_of(1 << config.memory.huge_page_size.log2())
                    .unwrap_or(Capability::Hugetlb2M),
                field,
                "reserve HugeTLB pages (scripts/reserve-hugepages), or pick another backend",
            ),
            BackendName::Secret => need(
                Capability::MemfdSecret,
                field,
                "boot with secretmem.enable=1, or pick another backend",
            ),
            BackendName::GuestMemfd => need(
                Capability::GuestMemfdMmap,
                field,
                "use a kernel whose guest_memfd the host can map (KVM_CAP_GUEST_MEMFD_FLAGS \
                 with MMAP and INIT_SHARED), or another backend",
            ),
            _ => {}
        }
    }
    if kvm && config.mmu.manual_protect {
        need(
            Capability::ManualDirtyLogProtect,
            "mmu.manual_protect",
            "turn manual_protect off on this host",
        );
    }
    if config.memory.require_transparent_huge_pages {
        if config.memory.backend == BackendName::Anonymous && !has_private_pages(config) {
            need(
                Capability::AnonymousThp,
                "memory.require_transparent_huge_pages",
                "set /sys/kernel/mm/transparent_hugepage/enabled to madvise (as root), or drop \
                 the requirement",
            );
        } else {
            need(
                Capability::ShmemThp,
                "memory.require_transparent_huge_pages",
                "set /sys/kernel/mm/transparent_hugepage/shmem_enabled to advise (as root), or \
                 drop the requirement",
            );
        }
    }
    needs
}

/// Checks, before anything runs, that the host has what the configuration
/// asks for ([`host_needs`]), and enough free HugeTLB pages. The error
/// names the field and what is missing (exit 2).
pub fn check_host(config: &Config, caps: &gmem::HostCaps) -> Result<(), RunError> {
    for need in host_needs(config) {
        if !caps.has(need.capability) {
            return Err(RunError::Host {
                what: format!(
                    "{}: needs {} ({})",
                    need.field,
                    need.capability,
                    caps.describe(need.capability)
                ),
                fix: need.fix.into(),
            });
        }
    }
    // Prefault touches all of memory at once: more than the host has
    // available would push it into swap or the OOM killer. (HugeTLB memory
    // comes from its pool, checked below.)
    if config.memory.prefault
        && config.memory.backend != BackendName::Hugetlb
        && let Some(available) = caps.mem_available
        && config.memory_bytes() > available
    {
        return Err(RunError::Host {
            what: format!(
                "memory.size_mib: {} MiB to prefault, and the host has {} MiB available",
                config.memory.size_mib,
                available >> 20
            ),
            fix: "lower memory.size_mib, or turn memory.prefault off".into(),
        });
    }
    for (field, backend) in memory_backends(config) {
        if backend == BackendName::Hugetlb {
            let page = 1u64 << config.memory.huge_page_size.log2();
            let needed = config.memory_bytes() / page;
            let free = caps.pool(page).map_or(0, |pool| pool.available);
            if free < needed {
                let pool = mmukit_sys::hugetlb::pool_name(page);
                return Err(RunError::Host {
                    what: format!(
                        "memory.size_mib: {} MiB of hugetlb memory ({field}) needs {needed} free \
                         pages of {pool}; the host has {free}",
                        config.memory.size_mib,
                    ),
                    fix: format!(
                        "{}, or lower memory.size_mib",
                        mmukit_sys::hugetlb::reserve_hint(&pool)
                    ),
                });
            }
        }
    }
    Ok(())
}

/// Creates the guest memory file the configuration asks for.
pub fn create_memory(config: &Config, vm: Option<&Arc<KvmVm>>) -> Result<GuestMemFile, RunError> {
    let backend = match config.memory.backend {
        BackendName::Anonymous => Backend::anonymous(has_private_pages(config)),
        BackendName::Memfd => Backend::Memfd,
        BackendName::Hugetlb => Backend::Hugetlb,
        BackendName::Secret => Backend::Secret,
        BackendName::GuestMemfd => Backend::Kvm(vm.cloned().ok_or_else(|| RunError::Host {
            what: "memory.backend guest_memfd needs KVM".into(),
            fix: "run on a host with /dev/kvm, or pick another backend".into(),
        })?),
    };
    let log2 = if config.memory.backend == BackendName::Hugetlb {
        config.memory.huge_page_size.log2()
    } else {
        0
    };
    tracing::debug!(
        backend = config.memory.backend.name(),
        size_mib = config.memory.size_mib,
        "creating guest memory"
    );
    GuestMemFile::create(
        &backend,
        GmemConfig {
            size: config.memory_bytes(),
            flags: GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
            huge_page_size_log2: log2,
        },
    )
    .map_err(|err| match err.errno() {
        // The size is what the host could not give.
        libc::ENOMEM | libc::EFBIG | libc::ENOSPC => RunError::Host {
            what: format!(
                "memory.size_mib: {} MiB of {} memory: {err}",
                config.memory.size_mib,
                config.memory.backend.name()
            ),
            fix: "lower memory.size_mib, or free memory on the host".into(),
        },
        _ => RunError::Memory(err),
    })
}

/// Opens KVM, or says why not.
pub fn open_kvm() -> Result<Arc<KvmVm>, RunError> {
    KvmVm::new().map_err(|err| RunError::Host {
        what: format!("accel kvm: {err}"),
        fix: "run on a host with /dev/kvm (and access to it), or use \"accel\": \"soft\" for \
              the dirty_log workload"
            .into(),
    })
}

/// Prefaults all of `file` when the configuration asks for it, with a
/// progress bar on a terminal; returns GiB/s.
pub fn prefault(config: &Config, file: &GuestMemFile) -> Result<Option<f64>, RunError> {
    if !config.memory.prefault {
        return Ok(None);
    }
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(file.size());
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "prefault {bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec}",
            )
            .expect("a valid template"),
        );
        bar
    });
    let report = file.prefault(
        0,
        file.size(),
        config.memory.prefault_threads,
        &|done, _| {
            if let Some(bar) = &bar {
                bar.set_position(done);
            }
        },
    )?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    tracing::debug!(gib_s = report.gib_per_s(), "prefault done");
    Ok(Some(report.gib_per_s()))
}

/// Progress of the dirty-log passes on a terminal (stderr): pass N of M,
/// the memory the vCPUs have written and the rate. Nothing off a terminal.
pub struct PassProgress {
    bar: Option<indicatif::ProgressBar>,
    bytes_per_pass: u64,
    started: std::time::Instant,
}

impl PassProgress {
    /// Progress over `passes` passes that each write `bytes_per_pass`.
    pub fn new(passes: u32, bytes_per_pass: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(u64::from(passes));
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "dirty-log pass {pos}/{len} {bar:30} {msg}",
                )
                .expect("a valid template"),
            );
            bar
        });
        Self {
            bar,
            bytes_per_pass,
            started: std::time::Instant::now(),
        }
    }

    /// One more pass is done.
    pub fn pass_done(&self) {
        let Some(bar) = &self.bar else {
            return;
        };
        bar.inc(1);
        let written = bar.position() * self.bytes_per_pass;
        let rate = written as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(format!(
            "{} written, {}/s",
            indicatif::BinaryBytes(written),
            indicatif::BinaryBytes(rate as u64)
        ));
    }
}

impl Drop for PassProgress {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Every page written in the pass must be in the log.
pub fn verify_log(
    log: &[u64],
    shares_start: u64,
    vcpus: usize,
    share_bytes: u64,
    write_percent: u32,
    iteration: u32,
) -> Result<(), RunError> {
    for vcpu in 0..vcpus as u64 {
        let first = (shares_start + vcpu * share_bytes) / 4096;
        for i in 0..share_bytes / 4096 {
            if i % 100 >= u64::from(write_percent) {
                continue;
            }
            let page = first + i;
            if log[(page / 64) as usize] & (1 << (page % 64)) == 0 {
                return Err(GuestError::NotInDirtyLog {
                    iteration,
                    vcpu,
                    gpa: layout::gpa_of(page * 4096),
                }
                .into());
            }
        }
    }
    Ok(())
}
