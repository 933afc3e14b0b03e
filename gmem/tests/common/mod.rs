//! Helpers shared by the gmem tests: the backends this host can run, and a
//! way to check that an access kills a child process.
#![allow(dead_code, reason = "each test binary uses some of the helpers")]

use std::sync::Arc;

use gmem::consts::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
use gmem::{
    Backend, BackendKind, Capability, GmemConfig, GmemError, GuestMemFile, HostCaps, KvmVm,
};

pub const SHARED_MMAP: u64 = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;

/// One backend to run a test on.
pub struct Case {
    pub name: &'static str,
    pub backend: Backend,
    /// The page size the contract uses: 4 KiB, or the huge page size.
    pub page: u64,
    pub log2: u8,
}

impl Case {
    pub fn create(&self, size: u64, flags: u64) -> Result<GuestMemFile, GmemError> {
        GuestMemFile::create(
            &self.backend,
            GmemConfig {
                size,
                flags,
                huge_page_size_log2: self.log2,
            },
        )
    }

    pub fn supported_flags(&self) -> u64 {
        match &self.backend {
            Backend::Kvm(vm) => vm.guest_memfd_flags(),
            other => other.kind().supported_flags(),
        }
    }

    pub fn is(&self, kind: BackendKind) -> bool {
        self.backend.kind() == kind
    }
}

/// The running test's name: the test harness names each test's thread
/// after its test.
pub fn current_test() -> String {
    std::thread::current()
        .name()
        .unwrap_or("gmem test")
        .to_string()
}

/// Whether `pages` HugeTLB pages of `page_size` bytes are free for the
/// running test; otherwise its skip is reported, naming the pool.
pub fn hugetlb_available(page_size: u64, pages: u64) -> bool {
    gmem::caps::hugetlb_pages_free(&current_test(), page_size, pages)
}

/// Whether the host has every capability in `needs` for the running test
/// (`what` names the part of it that needs them); otherwise the skip is
/// reported.
pub fn host_allows(what: &str, needs: &[Capability]) -> bool {
    HostCaps::get().allows(&format!("{} ({what})", current_test()), needs)
}

/// Every backend this host can run; the others are reported skipped,
/// naming the capability they need.
pub fn cases(huge_pages_needed: u64) -> Vec<Case> {
    let mut cases = vec![
        Case {
            name: "memfd",
            backend: Backend::Memfd,
            page: 4096,
            log2: 0,
        },
        Case {
            name: "anonymous",
            backend: Backend::Anonymous,
            page: 4096,
            log2: 0,
        },
    ];
    if host_allows("secret", &[Capability::MemfdSecret]) {
        cases.push(Case {
            name: "secret",
            backend: Backend::Secret,
            page: 4096,
            log2: 0,
        });
    }
    if hugetlb_available(2 << 20, huge_pages_needed.max(1)) {
        cases.push(Case {
            name: "hugetlb-2M",
            backend: Backend::Hugetlb,
            page: 2 << 20,
            log2: 21,
        });
    }
    cases.extend(guest_memfd_case());
    cases
}

/// The kernel's guest_memfd backend, or `None` (the skip reported) where
/// this host has no guest_memfd the host can map.
pub fn guest_memfd_case() -> Option<Case> {
    guest_memfd_vm("guest_memfd").map(|vm| Case {
        name: "guest_memfd",
        backend: Backend::Kvm(vm),
        page: 4096,
        log2: 0,
    })
}

/// A VM whose KVM offers guest_memfd with MMAP and INIT_SHARED, or `None`
/// (the skip of `what` reported).
pub fn guest_memfd_vm(what: &str) -> Option<Arc<KvmVm>> {
    host_allows(what, &[Capability::Kvm, Capability::GuestMemfdMmap])
        .then(|| KvmVm::new().expect("the probe found KVM"))
}

/// Runs `access` in a forked child; returns the signal that killed it, or
/// `None` when it exited normally.
pub fn killing_signal(access: impl FnOnce()) -> Option<i32> {
    // SAFETY: the child only runs `access` (raw memory accesses) and exits
    // with _exit, without touching locks another thread could hold.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        access();
        // SAFETY: ends the child without running the parent's destructors.
        unsafe { libc::_exit(0) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child; `status` is a valid out-pointer.
    let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(waited, pid);
    libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status))
}

/// Reads one byte the way a guest or a careless host would: no checks.
///
/// # Safety
///
/// `ptr` must be inside a mapping (it may fault).
pub unsafe fn touch(ptr: *mut u8) -> u8 {
    // SAFETY: guaranteed by the caller; a fault is the point of the test.
    unsafe { std::ptr::read_volatile(ptr) }
}
