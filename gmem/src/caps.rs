//! What this host offers: KVM and its guest_memfd capabilities, HugeTLB
//! pools, memfd_secret and transparent huge pages, each answerable by
//! [`Capability`] (hidden ones read as missing: see [`mmukit_sys::host`]).
//!
//! A test that needs something of the host asks here and skips with one
//! line naming it:
//!
//! ```
//! use gmem::{Capability, HostCaps};
//!
//! if !HostCaps::get().allows("example", &[Capability::Kvm, Capability::GuestMemfdMmap]) {
//!     return; // printed: skip example: needs guest_memfd_mmap: ...
//! }
//! ```

use std::fmt;
use std::sync::OnceLock;

use kvm_ioctls::Kvm;

pub use mmukit_sys::host::{Capability, hidden_from_env, record_skip};

use crate::consts::{
    GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
    KVM_CAP_DIRTY_LOG_RING, KVM_CAP_GUEST_MEMFD, KVM_CAP_GUEST_MEMFD_FLAGS,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_CAP_MEMORY_ATTRIBUTES, KVM_CAP_MULTI_ADDRESS_SPACE,
    KVM_CAP_NR_MEMSLOTS, KVM_CAP_READONLY_MEM, KVM_CAP_USER_MEMORY2, KVM_CAP_VM_TYPES,
    KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_X86_SW_PROTECTED_VM,
};

/// Flags of a guest_memfd the host maps and that starts shared.
const SHARED_MMAP: u64 = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;

/// KVM's answers, when `/dev/kvm` could be opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvmCaps {
    /// `KVM_CAP_GUEST_MEMFD`.
    pub guest_memfd: bool,
    /// `KVM_CAP_GUEST_MEMFD_FLAGS`: the flag bits guest_memfd accepts.
    pub guest_memfd_flags: u64,
    /// `KVM_CAP_USER_MEMORY2`.
    pub user_memory2: bool,
    /// `KVM_CAP_MEMORY_ATTRIBUTES`: the attribute bits (private = 8).
    pub memory_attributes: u64,
    /// `KVM_CAP_VM_TYPES`: a bitmask of VM types.
    pub vm_types: u64,
    /// `KVM_CAP_NR_MEMSLOTS`: user memslot ids per address space.
    pub nr_memslots: u64,
    /// `KVM_CAP_MULTI_ADDRESS_SPACE`: memslot address spaces (0 reads as 1).
    pub address_spaces: u64,
    /// `KVM_CAP_READONLY_MEM`.
    pub readonly_mem: bool,
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`: the flags it takes (0: none).
    pub manual_dirty_log_protect: u64,
    /// `KVM_CAP_DIRTY_LOG_RING`: the largest ring in bytes (0: none).
    pub dirty_log_ring: u64,
}

impl KvmCaps {
    /// Reads the capabilities from an open `/dev/kvm`, with those
    /// [`mmukit_sys::host::HIDE_ENV`] hides read as absent.
    pub fn read(kvm: &Kvm) -> Self {
        let cap = |c: u32| kvm.check_extension_raw(libc::c_ulong::from(c)).max(0) as u64;
        Self {
            guest_memfd: cap(KVM_CAP_GUEST_MEMFD) != 0,
            guest_memfd_flags: cap(KVM_CAP_GUEST_MEMFD_FLAGS),
            user_memory2: cap(KVM_CAP_USER_MEMORY2) != 0,
            memory_attributes: cap(KVM_CAP_MEMORY_ATTRIBUTES),
            vm_types: cap(KVM_CAP_VM_TYPES),
            nr_memslots: cap(KVM_CAP_NR_MEMSLOTS),
            address_spaces: cap(KVM_CAP_MULTI_ADDRESS_SPACE).max(1),
            readonly_mem: cap(KVM_CAP_READONLY_MEM) != 0,
            manual_dirty_log_protect: cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2),
            dirty_log_ring: cap(KVM_CAP_DIRTY_LOG_RING),
        }
        .without_hidden()
    }

    /// These answers with every hidden capability cleared.
    pub fn without_hidden(mut self) -> Self {
        if Capability::GuestMemfd.is_hidden() {
            self.guest_memfd = false;
            self.guest_memfd_flags = 0;
        }
        if Capability::GuestMemfdMmap.is_hidden() {
            self.guest_memfd_flags &= !SHARED_MMAP;
        }
        if Capability::MemoryAttributes.is_hidden() {
            self.memory_attributes = 0;
        }
        if Capability::SoftwareProtectedVm.is_hidden() {
            self.vm_types &= !(1 << KVM_X86_SW_PROTECTED_VM);
        }
        if Capability::ManualDirtyLogProtect.is_hidden() {
            self.manual_dirty_log_protect = 0;
        }
        if Capability::DirtyLogRing.is_hidden() {
            self.dirty_log_ring = 0;
        }
        self
    }

    /// Whether KVM offers `cap` (`None` for a capability that is not
    /// KVM's).
    pub fn has(&self, cap: Capability) -> Option<bool> {
        Some(match cap {
            Capability::Kvm => true,
            Capability::GuestMemfd => self.guest_memfd,
            Capability::GuestMemfdMmap => {
                self.guest_memfd && self.guest_memfd_flags & SHARED_MMAP == SHARED_MMAP
            }
            Capability::MemoryAttributes => {
                self.memory_attributes & u64::from(KVM_MEMORY_ATTRIBUTE_PRIVATE) != 0
            }
            Capability::SoftwareProtectedVm => self.vm_types & (1 << KVM_X86_SW_PROTECTED_VM) != 0,
            Capability::ManualDirtyLogProtect => self.manual_dirty_log_protect != 0,
            Capability::DirtyLogRing => self.dirty_log_ring != 0,
            _ => return None,
        })
    }
}

pub use mmukit_sys::hugetlb::HugetlbPool;

/// The host's transparent huge page modes (`/sys/kernel/mm/
/// transparent_hugepage/`): `enabled` for private anonymous memory and
/// `shmem_enabled` for shmem, which gmem's anonymous (shared) and memfd
/// memory are.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ThpModes {
    /// `enabled`: always, madvise or never.
    pub anonymous: String,
    /// `shmem_enabled`: always, within_size, advise, never, deny or force.
    pub shmem: String,
}

impl ThpModes {
    /// Reads the modes, or `None` on a kernel without THP.
    pub fn read() -> Option<Self> {
        let mode = |file: &str| -> Option<String> {
            let text =
                std::fs::read_to_string(format!("/sys/kernel/mm/transparent_hugepage/{file}"))
                    .ok()?;
            Self::selected(&text)
        };
        Some(Self {
            anonymous: mode("enabled")?,
            shmem: mode("shmem_enabled")?,
        })
    }

    /// The bracketed word of a sysfs mode line (`always [madvise] never`).
    fn selected(text: &str) -> Option<String> {
        let start = text.find('[')? + 1;
        let end = start + text[start..].find(']')?;
        Some(text[start..end].to_string())
    }

    /// Whether shmem gets huge pages for a mapping that asks with
    /// `MADV_HUGEPAGE` (or without asking).
    pub fn shmem_allows(&self) -> bool {
        matches!(
            self.shmem.as_str(),
            "always" | "within_size" | "advise" | "force"
        )
    }

    /// Whether private anonymous memory gets huge pages when it asks.
    pub fn anonymous_allows(&self) -> bool {
        matches!(self.anonymous.as_str(), "always" | "madvise")
    }
}

/// Everything gmem probes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostCaps {
    /// KVM's capabilities, or `None` without a usable `/dev/kvm`.
    pub kvm: Option<KvmCaps>,
    /// Why KVM is not usable, when it is not.
    pub kvm_error: Option<String>,
    /// The 2 MiB and 1 GiB HugeTLB pools that exist.
    pub hugetlb: Vec<HugetlbPool>,
    /// Whether `memfd_secret(2)` works.
    pub memfd_secret: bool,
    /// Whether `userfaultfd(2)` fills pages (`UFFDIO_COPY`).
    pub userfaultfd: bool,
    /// The transparent huge page modes, when the kernel has THP.
    pub thp: Option<ThpModes>,
    /// `MemAvailable` of `/proc/meminfo` in bytes: what the host can give
    /// without swapping, when the kernel says.
    pub mem_available: Option<u64>,
}

/// `MemAvailable` of `/proc/meminfo`, in bytes.
fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text
        .lines()
        .find(|line| line.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

impl HostCaps {
    /// Probes the host now (HugeTLB pools' free pages change as memory is
    /// taken; the rest does not). Hidden capabilities read as absent.
    pub fn probe() -> Self {
        let (kvm, kvm_error) = if Capability::Kvm.is_hidden() {
            (
                None,
                Some(format!(
                    "/dev/kvm: hidden by {}",
                    mmukit_sys::host::HIDE_ENV
                )),
            )
        } else {
            match Kvm::new() {
                Ok(kvm) => (Some(KvmCaps::read(&kvm)), None),
                Err(err) => (None, Some(format!("/dev/kvm: {err}"))),
            }
        };
        Self {
            kvm,
            kvm_error,
            hugetlb: [Capability::Hugetlb2M, Capability::Hugetlb1G]
                .into_iter()
                .filter_map(|cap| HugetlbPool::read(cap.hugetlb_page_size()?))
                .collect(),
            memfd_secret: mmukit_sys::host::memfd_secret_works(),
            userfaultfd: mmukit_sys::userfault::userfaultfd_works(),
            thp: ThpModes::read(),
            mem_available: mem_available(),
        }
    }

    /// The host as probed once by this process: what every test asks.
    pub fn get() -> &'static Self {
        static CAPS: OnceLock<HostCaps> = OnceLock::new();
        CAPS.get_or_init(Self::probe)
    }

    /// Whether the host offers `cap`. A HugeTLB pool counts when the
    /// kernel has it with pages reserved (how many are free is
    /// [`hugetlb_pages_free`]'s question); shmem THP when `shmem_enabled`
    /// gives huge pages to a mapping that asks.
    pub fn has(&self, cap: Capability) -> bool {
        match cap {
            Capability::Hugetlb2M | Capability::Hugetlb1G => {
                self.hugetlb_pool(cap).is_some_and(|pool| pool.total > 0)
            }
            Capability::MemfdSecret => self.memfd_secret,
            Capability::Userfaultfd => self.userfaultfd,
            Capability::ShmemThp => {
                !cap.is_hidden() && self.thp.as_ref().is_some_and(ThpModes::shmem_allows)
            }
            Capability::AnonymousThp => {
                !cap.is_hidden() && self.thp.as_ref().is_some_and(ThpModes::anonymous_allows)
            }
            kvm_cap => self
                .kvm
                .as_ref()
                .and_then(|kvm| kvm.has(kvm_cap))
                .unwrap_or(false),
        }
    }

    /// What the host has of `cap`, in words, for a skip line.
    pub fn describe(&self, cap: Capability) -> String {
        match (cap, &self.kvm) {
            (Capability::Hugetlb2M | Capability::Hugetlb1G, _) => match self.hugetlb_pool(cap) {
                Some(pool) => format!("{} has {} pages", pool.name, pool.total),
                None => format!(
                    "no {} pool",
                    mmukit_sys::hugetlb::pool_name(cap.hugetlb_page_size().unwrap_or_default())
                ),
            },
            (Capability::MemfdSecret, _) => "memfd_secret(2) fails".into(),
            (Capability::Userfaultfd, _) => "userfaultfd(2) with UFFD_USER_MODE_ONLY fails".into(),
            (Capability::ShmemThp | Capability::AnonymousThp, _) if cap.is_hidden() => {
                format!("hidden by {}", mmukit_sys::host::HIDE_ENV)
            }
            (Capability::ShmemThp, _) => match &self.thp {
                Some(thp) => format!("shmem_enabled is {}", thp.shmem),
                None => "no transparent huge pages".into(),
            },
            (Capability::AnonymousThp, _) => match &self.thp {
                Some(thp) => format!("transparent_hugepage/enabled is {}", thp.anonymous),
                None => "no transparent huge pages".into(),
            },
            (_, None) => self
                .kvm_error
                .clone()
                .unwrap_or_else(|| "no /dev/kvm".into()),
            (Capability::GuestMemfd | Capability::GuestMemfdMmap, Some(kvm)) => format!(
                "KVM_CAP_GUEST_MEMFD is {}, KVM_CAP_GUEST_MEMFD_FLAGS is {}",
                u8::from(kvm.guest_memfd),
                flag_names(kvm.guest_memfd_flags)
            ),
            (_, Some(_)) => format!("KVM does not offer {cap}"),
        }
    }

    /// For test suites: whether the host has every capability in `needs`;
    /// where it lacks one, `test` is reported skipped with one line naming
    /// it ([`mmukit_sys::host::record_skip`]).
    pub fn allows(&self, test: &str, needs: &[Capability]) -> bool {
        match needs.iter().find(|&&cap| !self.has(cap)) {
            Some(&missing) => {
                mmukit_sys::host::record_skip(test, missing, &self.describe(missing));
                false
            }
            None => true,
        }
    }

    /// The pool a HugeTLB capability names, if the kernel has it.
    fn hugetlb_pool(&self, cap: Capability) -> Option<&HugetlbPool> {
        self.pool(cap.hugetlb_page_size()?)
    }

    /// The pool of `page_size` bytes, if the kernel has one.
    pub fn pool(&self, page_size: u64) -> Option<&HugetlbPool> {
        self.hugetlb.iter().find(|pool| pool.page_size == page_size)
    }
}

/// For test suites: whether the HugeTLB pool of `page_size` bytes has
/// `pages` free now; otherwise `test` is reported skipped, naming the pool.
pub fn hugetlb_pages_free(test: &str, page_size: u64, pages: u64) -> bool {
    let capability = Capability::hugetlb_of(page_size).unwrap_or(Capability::Hugetlb2M);
    let pool = HugetlbPool::read(page_size);
    if pool.as_ref().is_some_and(|pool| pool.available >= pages) {
        return true;
    }
    let name = mmukit_sys::hugetlb::pool_name(page_size);
    let found = pool.map_or_else(
        || "no pool".into(),
        |pool| format!("{} free", pool.available),
    );
    mmukit_sys::host::record_skip(
        test,
        capability,
        &format!("{pages} free pages of {name} needed, {found} (scripts/setup reserves them)"),
    );
    false
}

/// The names of guest_memfd flag bits, `|`-joined.
pub fn flag_names(flags: u64) -> String {
    let names: Vec<&str> = [
        (GUEST_MEMFD_FLAG_MMAP, "MMAP"),
        (GUEST_MEMFD_FLAG_INIT_SHARED, "INIT_SHARED"),
        (GUEST_MEMFD_FLAG_NO_DIRECT_MAP, "NO_DIRECT_MAP"),
    ]
    .into_iter()
    .filter(|(bit, _)| flags & bit != 0)
    .map(|(_, name)| name)
    .collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join("|")
    }
}

impl HostCaps {
    /// What the host has of `cap` beyond yes or no (flags, pages, modes),
    /// for `--check-host`; empty where there is nothing more to say.
    pub fn detail(&self, cap: Capability) -> String {
        let kvm = self.kvm.as_ref();
        match cap {
            Capability::Kvm => match kvm {
                Some(kvm) => format!(
                    "{} memslots, user memory2 {}",
                    kvm.nr_memslots,
                    if kvm.user_memory2 { "yes" } else { "no" }
                ),
                None => self.kvm_error.clone().unwrap_or_default(),
            },
            Capability::GuestMemfd | Capability::GuestMemfdMmap => kvm
                .map(|kvm| format!("flags {}", flag_names(kvm.guest_memfd_flags)))
                .unwrap_or_default(),
            Capability::ManualDirtyLogProtect => kvm
                .filter(|kvm| kvm.manual_dirty_log_protect != 0)
                .map(|kvm| {
                    let mut names = vec!["MANUAL_PROTECT_ENABLE"];
                    if kvm.manual_dirty_log_protect & 2 != 0 {
                        names.push("INITIALLY_SET");
                    }
                    names.join("|")
                })
                .unwrap_or_default(),
            Capability::DirtyLogRing => kvm
                .filter(|kvm| kvm.dirty_log_ring != 0)
                .map(|kvm| format!("up to {} KiB", kvm.dirty_log_ring >> 10))
                .unwrap_or_default(),
            Capability::Hugetlb2M | Capability::Hugetlb1G => match self.hugetlb_pool(cap) {
                Some(pool) => format!("{} pages, {} available", pool.total, pool.available),
                None => "no pool".into(),
            },
            Capability::ShmemThp => match &self.thp {
                Some(thp) => format!(
                    "shmem_enabled {}, enabled {} (gmem's anonymous and memfd memory are shmem)",
                    thp.shmem, thp.anonymous
                ),
                None => "the kernel has no transparent huge pages".into(),
            },
            Capability::AnonymousThp => match &self.thp {
                Some(thp) => format!(
                    "enabled {} (gmem's private anonymous memory asks with MADV_HUGEPAGE)",
                    thp.anonymous
                ),
                None => "the kernel has no transparent huge pages".into(),
            },
            Capability::Userfaultfd if self.userfaultfd => {
                "UFFDIO_COPY (a HugeTLB split fills its new pages without clearing them)".into()
            }
            Capability::MemoryAttributes
            | Capability::SoftwareProtectedVm
            | Capability::MemfdSecret
            | Capability::Userfaultfd => String::new(),
        }
    }
}

/// One line per capability, by name: `guest_memfd: no (flags none)`; then
/// the capabilities hidden by `MMUKIT_HIDE_CAPS`, if any.
impl fmt::Display for HostCaps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for cap in Capability::ALL {
            let answer = if self.has(cap) { "yes" } else { "no" };
            match self.detail(cap) {
                detail if detail.is_empty() => writeln!(f, "{cap}: {answer}")?,
                detail => writeln!(f, "{cap}: {answer} ({detail})")?,
            }
        }
        let hidden = mmukit_sys::host::hidden();
        if !hidden.is_empty() {
            let names: Vec<&str> = hidden.iter().map(|cap| cap.name()).collect();
            writeln!(
                f,
                "hidden by {}: {}",
                mmukit_sys::host::HIDE_ENV,
                names.join(", ")
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_reports_every_line() {
        let caps = HostCaps::probe();
        let text = caps.to_string();
        for cap in Capability::ALL {
            let line = text
                .lines()
                .find(|line| line.starts_with(&format!("{cap}: ")))
                .unwrap_or_else(|| panic!("no line for {cap}: {text}"));
            let answer = if caps.has(cap) { "yes" } else { "no" };
            assert!(line[cap.name().len() + 2..].starts_with(answer), "{line}");
        }
        if let Some(kvm) = caps.kvm {
            assert!(kvm.guest_memfd_flags & !7 == 0, "unknown flag bits");
        }
    }

    #[test]
    fn thp_modes_read_the_bracketed_word() {
        assert_eq!(
            ThpModes::selected("always [madvise] never\n").as_deref(),
            Some("madvise")
        );
        assert_eq!(ThpModes::selected("never"), None);
        let modes = ThpModes {
            anonymous: "never".into(),
            shmem: "advise".into(),
        };
        assert!(modes.shmem_allows() && !modes.anonymous_allows());
        assert!(HostCaps::probe().to_string().contains("shmem_thp: "));
    }

    #[test]
    fn flag_names_are_spelled_out() {
        assert_eq!(flag_names(3), "MMAP|INIT_SHARED");
        assert_eq!(flag_names(0), "none");
    }
}
