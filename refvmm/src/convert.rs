//! The `convert` workload on the soft accelerator: a soft TD (or a
//! software-protected VM) whose private memory is a guest memory file and
//! whose shared memory is the configured region. vCPU threads convert their
//! own memory back and forth the way a TD guest does with MapGPA, and write
//! and check data on both sides.
//!
//! Each vCPU owns `huge_pages_per_vcpu` 2 MiB pages. A round:
//! 1. writes and checks every 4 KiB page of them as private memory;
//! 2. makes one 4 KiB page of its first 2 MiB page shared (on a TD the
//!    private 2M leaf is demoted and the file's HugeTLB page split), writes
//!    it through the shared GPA and checks the host sees it, checks the
//!    other 511 pages kept their private data, then writes the page as
//!    private again: on a TD that access exits to the VMM with a memory
//!    fault, which converts the page back and lets the vCPU retry; a
//!    software-protected guest converts it back first;
//! 3. converts its second 2 MiB page whole to shared and back, with data
//!    checked on each side.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::Instant;

use gmem::consts::GUEST_MEMFD_FLAG_MMAP;
use gmem::{Backend, GmemConfig, GuestMemFile, View};
use mmu_cache::PagePool;
use mmu_cache::alloc::ChunkAllocator;
use mmukit_private::{ConversionReport, PrivateMemoryVm, slot_over_view};
use split::{
    Access, AccessKind, Gfn, Gpa, Hpa, MemoryAttribute, MmuConfig, MmuError, TdpMmu, VcpuCaches,
    VmType,
};
use tdx_ext::pamt::PamtPolicy;
use tdx_ext::{Seamcall, SimTdxModule, TdxMirror};

use crate::config::{BackendName, Config, PamtPolicyName, Workload};
use crate::engine::{RunError, create_memory, prefault};
use crate::events::{Metrics, STOP, TIMED_OUT};
use crate::guest_error::GuestError;
use crate::report::{ConvertFigures, Report};

const HUGE_PAGES: u64 = 512;

/// What the vCPU threads count together.
#[derive(Default)]
struct Counts {
    conversions: AtomicU64,
    conversions_4k: AtomicU64,
    exits: AtomicU64,
    demotes: AtomicU64,
    zapped: AtomicU64,
    checked: AtomicU64,
}

/// The VM the threads share.
struct ConvertVm<'a> {
    vm: PrivateMemoryVm,
    metrics: &'a Metrics,
    vm_type: VmType,
    shared_host: View,
    counts: Counts,
    /// Every vCPU and the main thread meet after the first private pass,
    /// twice: the main thread counts the leaves in between.
    first_pass: Barrier,
}

fn pattern(gfn: u64, round: u64) -> u64 {
    (round << 48) ^ 0x0050_7afe_0000_0000 ^ gfn
}

fn shared_pattern(gfn: u64, round: u64) -> u64 {
    !pattern(gfn, round)
}

impl ConvertVm<'_> {
    fn mmu(&self) -> &TdpMmu {
        self.vm.mmu()
    }

    /// The address a guest access uses: a TD's shared accesses carry the
    /// shared bit.
    fn gpa(&self, gfn: u64, private: bool) -> Gpa {
        match self.vm_type {
            VmType::Td { shared_bit } if !private => Gpa(Gfn(gfn).gpa().0 | 1 << shared_bit),
            _ => Gfn(gfn).gpa(),
        }
    }

    /// The host address of a guest access: the hardware walk, or a fault of
    /// the access's kind on a miss.
    fn translate(
        &self,
        vcpu: &mut VcpuCaches,
        gfn: u64,
        private: bool,
        write: bool,
    ) -> Result<Hpa, MmuError> {
        let gpa = self.gpa(gfn, private);
        let access = AccessKind::data(write);
        match self.mmu().access(vcpu, gpa, access) {
            Access::Hit(hpa) => Ok(hpa),
            Access::Miss => {
                let attribute = MemoryAttribute::of_access(private);
                Ok(self.mmu().fault_as(vcpu, gpa, access, attribute)?.hpa)
            }
        }
    }

    fn write(
        &self,
        vcpu: &mut VcpuCaches,
        gfn: u64,
        private: bool,
        value: u64,
    ) -> Result<(), MmuError> {
        let hpa = self.translate(vcpu, gfn, private, true)?;
        // SAFETY: the MMU maps guest frames into the private file's guest
        // view or the shared region's, both alive for the whole run; guest
        // memory is reached through raw pointers only.
        unsafe { std::ptr::write_volatile(hpa.0 as *mut u64, value) };
        Ok(())
    }

    fn read(&self, vcpu: &mut VcpuCaches, gfn: u64, private: bool) -> Result<u64, MmuError> {
        let hpa = self.translate(vcpu, gfn, private, false)?;
        // SAFETY: as in `write`.
        Ok(unsafe { std::ptr::read_volatile(hpa.0 as *const u64) })
    }

    fn convert(&self, start: u64, end: u64, to: MemoryAttribute) -> Result<(), GuestError> {
        let report: ConversionReport =
            self.vm
                .convert(Gfn(start), Gfn(end), to)
                .map_err(|source| GuestError::Convert {
                    start,
                    end,
                    to,
                    source,
                })?;
        tracing::trace!(start, end, %to, ?report, "conversion");
        self.metrics.conversions.fetch_add(1, Ordering::Relaxed);
        let c = &self.counts;
        c.conversions.fetch_add(1, Ordering::Relaxed);
        if end - start < HUGE_PAGES {
            c.conversions_4k.fetch_add(1, Ordering::Relaxed);
        }
        c.demotes.fetch_add(report.mmu.splits, Ordering::Relaxed);
        c.zapped.fetch_add(report.mmu.zapped, Ordering::Relaxed);
        Ok(())
    }

    /// Writes and checks the pattern of `round` on `[start, end)` as
    /// private memory.
    fn private_pass(
        &self,
        vcpu: &mut VcpuCaches,
        start: u64,
        end: u64,
        round: u64,
    ) -> Result<(), GuestError> {
        for gfn in start..end {
            self.write(vcpu, gfn, true, pattern(gfn, round))
                .map_err(access_error("write", MemoryAttribute::Private, gfn))?;
        }
        self.check_private(vcpu, start, end, round, None)
    }

    fn check_private(
        &self,
        vcpu: &mut VcpuCaches,
        start: u64,
        end: u64,
        round: u64,
        skip: Option<u64>,
    ) -> Result<(), GuestError> {
        for gfn in (start..end).filter(|&g| Some(g) != skip) {
            let value = self.read(vcpu, gfn, true).map_err(access_error(
                "read",
                MemoryAttribute::Private,
                gfn,
            ))?;
            if value != pattern(gfn, round) {
                return Err(GuestError::PrivateValue {
                    gfn,
                    read: value,
                    expected: pattern(gfn, round),
                });
            }
            self.counts.checked.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Writes `gfn` as shared memory and checks the host sees it.
    fn shared_write_and_check(
        &self,
        vcpu: &mut VcpuCaches,
        gfn: u64,
        round: u64,
    ) -> Result<(), GuestError> {
        let value = shared_pattern(gfn, round);
        self.write(vcpu, gfn, false, value).map_err(access_error(
            "write",
            MemoryAttribute::Shared,
            gfn,
        ))?;
        let mut word = [0u8; 8];
        self.shared_host
            .read_at(gfn * 4096, &mut word)
            .map_err(|source| GuestError::HostRead { gfn, source })?;
        if u64::from_ne_bytes(word) != value {
            return Err(GuestError::SharedValue {
                gfn,
                seen: u64::from_ne_bytes(word),
                wrote: value,
            });
        }
        self.counts.checked.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// A private write to `gfn`, which the guest made shared: a TD's access
    /// exits with a memory fault and the VMM converts the page back; a
    /// software-protected guest converts it back itself first (its faults
    /// take their kind from the attributes, so they never mismatch).
    fn private_write_after_shared(
        &self,
        vcpu: &mut VcpuCaches,
        gfn: u64,
        value: u64,
    ) -> Result<(), GuestError> {
        if !matches!(self.vm_type, VmType::Td { .. }) {
            self.convert(gfn, gfn + 1, MemoryAttribute::Private)?;
        }
        match self.write(vcpu, gfn, true, value) {
            Ok(()) => Ok(()),
            Err(MmuError::MemoryFault { private: true, .. }) => {
                self.counts.exits.fetch_add(1, Ordering::Relaxed);
                self.convert(gfn, gfn + 1, MemoryAttribute::Private)?;
                self.write(vcpu, gfn, true, value).map_err(access_error(
                    "write after converting",
                    MemoryAttribute::Private,
                    gfn,
                ))
            }
            Err(err) => Err(access_error("write", MemoryAttribute::Private, gfn)(err)),
        }
    }

    /// One vCPU's rounds over its huge pages `[first, first + count)`.
    fn vcpu(&self, id: u64, first: u64, count: u64, rounds: u32) -> Result<(), GuestError> {
        tracing::debug!(vcpu = id, "convert vCPU starts");
        let mut vcpu = self.mmu().new_vcpu_caches();
        let start = first * HUGE_PAGES;
        let end = (first + count) * HUGE_PAGES;
        let first_pass = self.private_pass(&mut vcpu, start, end, 0);
        self.first_pass.wait();
        self.first_pass.wait();
        first_pass?;
        for round in 0..u64::from(rounds) {
            if STOP.load(Ordering::Relaxed) {
                return Err(GuestError::Stopped);
            }
            if TIMED_OUT.load(Ordering::Relaxed) {
                return Err(GuestError::TimedOutInRound {
                    vcpu: id,
                    round,
                    rounds,
                });
            }
            if round > 0 {
                self.private_pass(&mut vcpu, start, end, round)?;
            }
            // A 4 KiB page inside the first 2 MiB page, to shared and back.
            let page = start + (round * 37 + id * 11) % HUGE_PAGES;
            self.convert(page, page + 1, MemoryAttribute::Shared)?;
            self.shared_write_and_check(&mut vcpu, page, round)?;
            self.check_private(&mut vcpu, start, start + HUGE_PAGES, round, Some(page))?;
            self.private_write_after_shared(&mut vcpu, page, pattern(page, round))?;
            self.check_private(&mut vcpu, start, start + HUGE_PAGES, round, None)?;
            // The whole second 2 MiB page, to shared and back.
            let (whole, whole_end) = (start + HUGE_PAGES, start + 2 * HUGE_PAGES);
            self.convert(whole, whole_end, MemoryAttribute::Shared)?;
            for gfn in (whole..whole_end).step_by(61) {
                self.shared_write_and_check(&mut vcpu, gfn, round)?;
            }
            self.convert(whole, whole_end, MemoryAttribute::Private)?;
            self.private_pass(&mut vcpu, whole, whole_end, round)?;
        }
        vcpu.free_all();
        let counters = self.mmu().counters();
        self.metrics
            .faults
            .store(counters.faults, Ordering::Relaxed);
        self.metrics
            .splits
            .store(counters.splits, Ordering::Relaxed);
        tracing::debug!(vcpu = id, "convert vCPU done");
        Ok(())
    }
}

fn backend(name: BackendName) -> Backend {
    match name {
        BackendName::Anonymous => Backend::Anonymous,
        BackendName::Memfd => Backend::Memfd,
        BackendName::Hugetlb => Backend::Hugetlb,
        BackendName::Secret => Backend::Secret,
        BackendName::GuestMemfd => unreachable!("refused at validation"),
    }
}

/// Runs the convert workload.
pub fn run(config: &Config, metrics: &Metrics) -> Result<Report, RunError> {
    let Workload::Convert {
        rounds,
        huge_pages_per_vcpu,
    } = config.workload.kind
    else {
        unreachable!("called for the convert workload");
    };
    let private_backend = config
        .memory
        .private_backend
        .expect("validation requires private memory for convert");
    let size = config.memory_bytes();
    let shared_file = create_memory(config, None)?;
    let prefault_gib_s = prefault(config, &shared_file)?;
    let shared_guest = shared_file.map_guest(0, size)?;
    let shared_host = shared_file.map(0, size)?;
    let private_file = GuestMemFile::create(
        &backend(private_backend),
        GmemConfig {
            size,
            flags: GUEST_MEMFD_FLAG_MMAP,
            huge_page_size_log2: if private_backend == BackendName::Hugetlb {
                config.memory.huge_page_size.log2()
            } else {
                0
            },
        },
    )
    .map_err(|err| RunError::Host {
        what: format!("memory.private_backend {}", private_backend.name()),
        fix: err.to_string(),
    })?;

    let levels = MmuConfig::default().levels;
    let vm_type = if config.tdx.enabled {
        VmType::td(levels)
    } else {
        VmType::SoftwareProtected
    };
    let mmu_config = MmuConfig {
        vm_type,
        vcpu_cache_capacity: config.mmu.cache_capacity,
        ..MmuConfig::default()
    };
    let pool = PagePool::new(ChunkAllocator::anonymous());
    let td: Option<(Arc<SimTdxModule>, Arc<TdxMirror>)> = if config.tdx.enabled {
        let policy = match config.tdx.pamt_policy {
            PamtPolicyName::OnInstall => PamtPolicy::OnInstall,
            PamtPolicyName::OnCacheEntry => PamtPolicy::OnCacheEntry,
        };
        Some(
            TdxMirror::finalized_on_sim(levels, policy)
                .map_err(RunError::tdx("finalizing the TD"))?,
        )
    } else {
        None
    };
    let mmu = match &td {
        Some((_, mirror)) => TdpMmu::with_hooks(pool, mmu_config, mirror.clone()),
        None => TdpMmu::new(pool, mmu_config),
    }
    .map_err(RunError::mmu("creating the MMU"))?;
    let mut vm = PrivateMemoryVm::new(Arc::new(mmu));
    let npages = size / 4096;
    let slot = slot_over_view(0, Gfn(0), &shared_file, &shared_guest).map_err(RunError::Memslot)?;
    vm.bind(slot, &private_file, 0)
        .map_err(RunError::private("binding the private memory"))?;
    // The VMM makes the guest's memory private before it runs, as a TD's is.
    vm.convert(Gfn(0), Gfn(npages), MemoryAttribute::Private)
        .map_err(RunError::private("making memory private"))?;
    let shared = ConvertVm {
        vm,
        metrics,
        vm_type,
        shared_host,
        counts: Counts::default(),
        first_pass: Barrier::new(config.vcpus as usize + 1),
    };

    let failure: Mutex<Option<GuestError>> = Mutex::new(None);
    let start = Instant::now();
    let pages_before = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..u64::from(config.vcpus))
            .map(|id| {
                let (shared, failure) = (&shared, &failure);
                scope.spawn(move || {
                    let first = id * huge_pages_per_vcpu;
                    if let Err(why) = shared.vcpu(id, first, huge_pages_per_vcpu, rounds) {
                        failure
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert(GuestError::OnVcpu {
                                vcpu: id,
                                source: Box::new(why),
                            });
                    }
                    metrics.passes.fetch_add(1, Ordering::Relaxed);
                })
            })
            .collect();
        // The leaves of the first private pass, before any conversion.
        shared.first_pass.wait();
        let pages_before = shared.mmu().page_stats().into();
        shared.first_pass.wait();
        for handle in handles {
            handle.join().expect("vCPU threads do not panic");
        }
        pages_before
    });
    let run_s = start.elapsed().as_secs_f64();
    if let Some(why) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(why.into());
    }
    let files = shared.vm.file_metrics();
    let c = &shared.counts;
    let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
    let figures = ConvertFigures {
        vm_type: match vm_type {
            VmType::Td { .. } => "td",
            _ => "software_protected",
        }
        .into(),
        private_backend: private_backend.name().into(),
        conversions: get(&c.conversions),
        conversions_4k: get(&c.conversions_4k),
        memory_fault_exits: get(&c.exits),
        demotes: get(&c.demotes),
        zapped: get(&c.zapped),
        pages_before,
        pages_after: shared.mmu().page_stats().into(),
        hugetlb_splits: files.splits,
        hugetlb_merges: files.merges,
        pamt_pages: td
            .as_ref()
            .map(|(_, mirror)| mirror.pamt().counters().pages_in_use),
        pages_checked: get(&c.checked),
        run_s,
    };
    let tdx = td
        .as_ref()
        .map(|(module, mirror)| crate::report::TdxFigures {
            seamcalls: Seamcall::ALL.iter().map(|&s| module.calls(s)).sum(),
            pamt_pages: mirror.pamt().counters().pages_in_use,
        });
    if td.is_some() {
        tracing::debug!("TD teardown");
        shared
            .mmu()
            .teardown()
            .map_err(RunError::mmu("tearing the TD down"))?;
    }
    Ok(Report {
        accel: "soft".into(),
        backend: config.memory.backend.name().into(),
        vcpus: config.vcpus,
        memory_bytes: size,
        prefault_gib_s,
        transparent_huge_pages: shared_file.transparent_huge_pages(),
        memory_pages: Some(crate::report::MemoryPages::of(&shared_file)),
        workload: "convert".into(),
        convert: Some(figures),
        tdx,
        exit: "rounds done".into(),
        ..Report::default()
    })
}

/// A conversion workload's guest access of `gfn` failed.
fn access_error(
    op: &'static str,
    attribute: MemoryAttribute,
    gfn: u64,
) -> impl Fn(MmuError) -> GuestError {
    move |source| GuestError::ConvertAccess {
        op,
        attribute,
        gfn,
        source,
    }
}
