//! What this host offers: KVM and its guest_memfd capabilities, HugeTLB
//! pools, and memfd_secret.

use std::fmt;

use kvm_ioctls::Kvm;

use crate::consts::{
    GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
    KVM_CAP_GUEST_MEMFD, KVM_CAP_GUEST_MEMFD_FLAGS, KVM_CAP_MEMORY_ATTRIBUTES,
    KVM_CAP_MULTI_ADDRESS_SPACE, KVM_CAP_NR_MEMSLOTS, KVM_CAP_READONLY_MEM, KVM_CAP_USER_MEMORY2,
    KVM_CAP_VM_TYPES,
};

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
}

/// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`.
const KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: u32 = 168;

impl KvmCaps {
    /// Reads the capabilities from an open `/dev/kvm`.
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
        }
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
    /// The transparent huge page modes, when the kernel has THP.
    pub thp: Option<ThpModes>,
}

impl HostCaps {
    /// Probes the host.
    pub fn probe() -> Self {
        let (kvm, kvm_error) = match Kvm::new() {
            Ok(kvm) => (Some(KvmCaps::read(&kvm)), None),
            Err(err) => (None, Some(format!("/dev/kvm: {err}"))),
        };
        Self {
            kvm,
            kvm_error,
            hugetlb: [2 << 20, 1 << 30]
                .into_iter()
                .filter_map(HugetlbPool::read)
                .collect(),
            memfd_secret: crate::sys::memfd_secret().is_ok(),
            thp: ThpModes::read(),
        }
    }

    /// The pool of `page_size` bytes, if the kernel has one.
    pub fn pool(&self, page_size: u64) -> Option<&HugetlbPool> {
        self.hugetlb.iter().find(|pool| pool.page_size == page_size)
    }
}

fn flag_names(flags: u64) -> String {
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

impl fmt::Display for HostCaps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.kvm, &self.kvm_error) {
            (Some(kvm), _) => {
                writeln!(f, "kvm: yes")?;
                writeln!(
                    f,
                    "guest_memfd: {}",
                    if kvm.guest_memfd { "yes" } else { "no" }
                )?;
                writeln!(
                    f,
                    "guest_memfd flags: {:#x} ({})",
                    kvm.guest_memfd_flags,
                    flag_names(kvm.guest_memfd_flags)
                )?;
                writeln!(
                    f,
                    "user memory2: {}",
                    if kvm.user_memory2 { "yes" } else { "no" }
                )?;
                writeln!(f, "memory attributes: {:#x}", kvm.memory_attributes)?;
                writeln!(f, "vm types: {:#x}", kvm.vm_types)?;
                writeln!(
                    f,
                    "manual dirty-log protect: {:#x}",
                    kvm.manual_dirty_log_protect
                )?;
            }
            (None, error) => writeln!(f, "kvm: no ({})", error.as_deref().unwrap_or("absent"))?,
        }
        for size in [2u64 << 20, 1 << 30] {
            match self.pool(size) {
                Some(pool) => writeln!(
                    f,
                    "hugetlb {}: {} pages, {} available",
                    pool.name, pool.total, pool.available
                )?,
                None => writeln!(f, "hugetlb {}kB: no pool", size >> 10)?,
            }
        }
        writeln!(
            f,
            "memfd_secret: {}",
            if self.memfd_secret { "yes" } else { "no" }
        )?;
        match &self.thp {
            Some(thp) => write!(
                f,
                "thp: private anonymous {}, shmem {} (gmem's anonymous and memfd memory are shmem: {})",
                thp.anonymous,
                thp.shmem,
                if thp.shmem_allows() {
                    "they ask for huge pages"
                } else {
                    "no huge pages"
                }
            ),
            None => write!(f, "thp: no (the kernel has no transparent huge pages)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_reports_every_line() {
        let caps = HostCaps::probe();
        let text = caps.to_string();
        assert!(text.contains("kvm: "));
        assert!(text.contains("hugetlb hugepages-2048kB") || text.contains("hugetlb 2048kB"));
        assert!(text.contains("memfd_secret: "));
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
        assert!(HostCaps::probe().to_string().contains("thp: "));
    }

    #[test]
    fn flag_names_are_spelled_out() {
        assert_eq!(flag_names(3), "MMAP|INIT_SHARED");
        assert_eq!(flag_names(0), "none");
    }
}
