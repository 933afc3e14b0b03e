//! Host capabilities by name, a way to run as if some were missing, and
//! the one line a test prints when it skips for want of one.
//!
//! Hosts differ in what their kernel offers (guest_memfd and its flags,
//! memory attributes, HugeTLB pools, `memfd_secret`, ...). Every mmukit
//! crate names what it probes with a [`Capability`]; the probes (gmem's
//! `HostCaps`, [`memfd_secret_works`], [`HugetlbPool::read`]) answer "no"
//! for a capability listed in the environment variable [`HIDE_ENV`], and the
//! calls that use one fail as on a kernel without it, so a whole test suite
//! can be run as if the host lacked it:
//!
//! ```sh
//! MMUKIT_HIDE_CAPS=guest_memfd,hugetlb_1g cargo test
//! ```
//!
//! A test that needs a capability the host lacks calls [`record_skip`],
//! which prints one line naming it and, where [`SKIP_LOG_ENV`] names a
//! file, appends it there so that a test command can sum up its skips.
//!
//! ```
//! use mmukit_sys::host::Capability;
//!
//! assert_eq!(Capability::from_name("guest_memfd"), Some(Capability::GuestMemfd));
//! assert_eq!(Capability::GuestMemfd.name(), "guest_memfd");
//! assert!(mmukit_sys::host::parse_hidden("kvm, hugetlb_2m").is_ok());
//! assert!(mmukit_sys::host::parse_hidden("kvmm").is_err());
//! ```
//!
//! [`HugetlbPool::read`]: crate::hugetlb::HugetlbPool::read

use std::fmt;
use std::io::Write;
use std::sync::OnceLock;

/// The environment variable that hides capabilities: names separated by
/// commas (see [`Capability::name`]).
pub const HIDE_ENV: &str = "MMUKIT_HIDE_CAPS";

/// The environment variable naming a file each skipped test appends one
/// line to: `capability<TAB>test<TAB>detail`.
pub const SKIP_LOG_ENV: &str = "MMUKIT_SKIP_LOG";

/// Something a host may or may not offer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Capability {
    /// A usable `/dev/kvm`.
    Kvm,
    /// `KVM_CAP_GUEST_MEMFD`: `KVM_CREATE_GUEST_MEMFD` works.
    GuestMemfd,
    /// `KVM_CAP_GUEST_MEMFD_FLAGS` with `MMAP | INIT_SHARED`: guest_memfd
    /// memory the host can map and that starts shared.
    GuestMemfdMmap,
    /// `KVM_CAP_MEMORY_ATTRIBUTES` with the private bit.
    MemoryAttributes,
    /// `KVM_CAP_VM_TYPES` with `KVM_X86_SW_PROTECTED_VM`.
    SoftwareProtectedVm,
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`.
    ManualDirtyLogProtect,
    /// `KVM_CAP_DIRTY_LOG_RING`.
    DirtyLogRing,
    /// A 2 MiB HugeTLB pool (`/sys/kernel/mm/hugepages/hugepages-2048kB`).
    Hugetlb2M,
    /// A 1 GiB HugeTLB pool (`hugepages-1048576kB`).
    Hugetlb1G,
    /// `memfd_secret(2)`.
    MemfdSecret,
    /// Transparent huge pages for shmem (`shmem_enabled` allows them).
    ShmemThp,
    /// Transparent huge pages for private anonymous memory that asks
    /// (`enabled` is `always` or `madvise`).
    AnonymousThp,
    /// `userfaultfd(2)` with `UFFDIO_COPY`: new pages filled in one pass,
    /// not cleared first (a HugeTLB split's copy).
    Userfaultfd,
}

impl Capability {
    /// Every capability, in the order reports list them.
    pub const ALL: [Self; 13] = [
        Self::Kvm,
        Self::GuestMemfd,
        Self::GuestMemfdMmap,
        Self::MemoryAttributes,
        Self::SoftwareProtectedVm,
        Self::ManualDirtyLogProtect,
        Self::DirtyLogRing,
        Self::Hugetlb2M,
        Self::Hugetlb1G,
        Self::MemfdSecret,
        Self::ShmemThp,
        Self::AnonymousThp,
        Self::Userfaultfd,
    ];

    /// The name used in [`HIDE_ENV`], in skip lines and in reports.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::GuestMemfd => "guest_memfd",
            Self::GuestMemfdMmap => "guest_memfd_mmap",
            Self::MemoryAttributes => "memory_attributes",
            Self::SoftwareProtectedVm => "sw_protected_vm",
            Self::ManualDirtyLogProtect => "manual_dirty_log_protect",
            Self::DirtyLogRing => "dirty_log_ring",
            Self::Hugetlb2M => "hugetlb_2m",
            Self::Hugetlb1G => "hugetlb_1g",
            Self::MemfdSecret => "memfd_secret",
            Self::ShmemThp => "shmem_thp",
            Self::AnonymousThp => "anonymous_thp",
            Self::Userfaultfd => "userfaultfd",
        }
    }

    /// The page size of a HugeTLB pool capability, in bytes.
    pub const fn hugetlb_page_size(self) -> Option<u64> {
        match self {
            Self::Hugetlb2M => Some(1 << 21),
            Self::Hugetlb1G => Some(1 << 30),
            _ => None,
        }
    }

    /// The HugeTLB pool capability of `page_size`-byte pages, if there is
    /// one.
    pub fn hugetlb_of(page_size: u64) -> Option<Self> {
        [Self::Hugetlb2M, Self::Hugetlb1G]
            .into_iter()
            .find(|cap| cap.hugetlb_page_size() == Some(page_size))
    }

    /// The capability called `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|cap| cap.name() == name)
    }

    /// The capabilities hiding this one takes with it: without KVM there is
    /// no guest_memfd, and without guest_memfd none that maps.
    fn implied_by(self) -> &'static [Self] {
        match self {
            Self::Kvm => &[
                Self::GuestMemfd,
                Self::GuestMemfdMmap,
                Self::MemoryAttributes,
                Self::SoftwareProtectedVm,
                Self::ManualDirtyLogProtect,
                Self::DirtyLogRing,
            ],
            Self::GuestMemfd => &[Self::GuestMemfdMmap],
            _ => &[],
        }
    }

    /// Whether [`HIDE_ENV`] hides this capability (directly, or by hiding
    /// one it depends on).
    pub fn is_hidden(self) -> bool {
        hidden().contains(&self)
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name in [`HIDE_ENV`] that is no capability.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownCapability(pub String);

impl fmt::Display for UnknownCapability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let known: Vec<&str> = Capability::ALL.iter().map(|cap| cap.name()).collect();
        write!(
            f,
            "{HIDE_ENV}: unknown capability {:?} (known: {})",
            self.0,
            known.join(", ")
        )
    }
}

impl std::error::Error for UnknownCapability {}

/// The capabilities `text` (a [`HIDE_ENV`] value) hides, with those they
/// take with them, sorted.
pub fn parse_hidden(text: &str) -> Result<Vec<Capability>, UnknownCapability> {
    let mut hidden = Vec::new();
    for name in text
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
    {
        let cap = Capability::from_name(name).ok_or_else(|| UnknownCapability(name.to_string()))?;
        hidden.push(cap);
        hidden.extend_from_slice(cap.implied_by());
    }
    hidden.sort();
    hidden.dedup();
    Ok(hidden)
}

/// The capabilities this process runs without, read once from
/// [`HIDE_ENV`]. An unknown name is reported once on stderr and hides
/// nothing else; [`hidden_from_env`] returns it as an error.
pub fn hidden() -> &'static [Capability] {
    static HIDDEN: OnceLock<Vec<Capability>> = OnceLock::new();
    HIDDEN.get_or_init(|| match hidden_from_env() {
        Ok(hidden) => hidden,
        Err(err) => {
            eprintln!("mmukit: {err}; hiding nothing");
            Vec::new()
        }
    })
}

/// [`HIDE_ENV`] read now, with an unknown name as an error (a command line
/// refuses it).
pub fn hidden_from_env() -> Result<Vec<Capability>, UnknownCapability> {
    parse_hidden(&std::env::var(HIDE_ENV).unwrap_or_default())
}

/// Whether `memfd_secret(2)` works here (probed once; "no" when hidden).
pub fn memfd_secret_works() -> bool {
    static WORKS: OnceLock<bool> = OnceLock::new();
    *WORKS.get_or_init(|| crate::memfd_secret().is_ok())
}

/// For test suites: reports that `test` does not run here because the host
/// lacks `missing` (`detail` says what was found). Prints one line on
/// stderr and appends `capability<TAB>test<TAB>detail` to the file
/// [`SKIP_LOG_ENV`] names, if any.
pub fn record_skip(test: &str, missing: Capability, detail: &str) {
    let hidden = if missing.is_hidden() {
        format!(" (hidden by {HIDE_ENV})")
    } else {
        String::new()
    };
    eprintln!("skip {test}: needs {missing}{hidden}: {detail}");
    if let Some(path) = std::env::var_os(SKIP_LOG_ENV) {
        let line = format!(
            "{missing}\t{test}\t{}{hidden}\n",
            detail.replace(['\t', '\n'], " ")
        );
        // One short write with O_APPEND: lines from parallel tests do not
        // interleave.
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut file| file.write_all(line.as_bytes()));
        if let Err(err) = written {
            eprintln!("mmukit: {SKIP_LOG_ENV} {}: {err}", path.to_string_lossy());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_distinct() {
        for cap in Capability::ALL {
            assert_eq!(Capability::from_name(cap.name()), Some(cap));
        }
        let mut names: Vec<&str> = Capability::ALL.iter().map(|cap| cap.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Capability::ALL.len());
    }

    #[test]
    fn hiding_kvm_hides_what_depends_on_it() {
        let hidden = parse_hidden("kvm").unwrap();
        assert!(hidden.contains(&Capability::GuestMemfdMmap));
        assert!(hidden.contains(&Capability::ManualDirtyLogProtect));
        assert!(!hidden.contains(&Capability::MemfdSecret));
        assert_eq!(
            parse_hidden(" guest_memfd ,").unwrap(),
            [Capability::GuestMemfd, Capability::GuestMemfdMmap]
        );
        assert_eq!(parse_hidden("").unwrap(), []);
    }

    #[test]
    fn an_unknown_name_is_refused_with_the_known_ones() {
        let err = parse_hidden("guest_memfd,guestmemfd").unwrap_err();
        assert_eq!(err.0, "guestmemfd");
        assert!(err.to_string().contains("guest_memfd_mmap"));
    }
}
