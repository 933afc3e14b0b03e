//! Helpers shared by the gmem tests: the backends this host can run, and a
//! way to check that an access kills a child process.
#![allow(dead_code, reason = "each test binary uses some of the helpers")]

use std::sync::Arc;

use gmem::consts::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
use gmem::{Backend, BackendKind, GmemConfig, GmemError, GuestMemFile, HostCaps, KvmVm};

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

/// HugeTLB 2 MiB pages available to a test that needs `pages` of them.
pub fn hugetlb_available(page_size: u64, pages: u64) -> Result<(), String> {
    let caps = HostCaps::probe();
    match caps.pool(page_size) {
        Some(pool) if pool.available >= pages => Ok(()),
        Some(pool) => Err(format!(
            "{} has {} pages available, {pages} needed (scripts/setup reserves them)",
            pool.name, pool.available
        )),
        None => Err(format!("no HugeTLB pool of {page_size} bytes")),
    }
}

/// Every backend this host can run; the others are named with the reason
/// they are skipped.
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
    if HostCaps::probe().memfd_secret {
        cases.push(Case {
            name: "secret",
            backend: Backend::Secret,
            page: 4096,
            log2: 0,
        });
    } else {
        eprintln!("skip secret: this kernel has no memfd_secret");
    }
    match hugetlb_available(2 << 20, huge_pages_needed) {
        Ok(()) => cases.push(Case {
            name: "hugetlb-2M",
            backend: Backend::Hugetlb,
            page: 2 << 20,
            log2: 21,
        }),
        Err(why) => eprintln!("skip hugetlb-2M: {why}"),
    }
    match kvm_vm() {
        Ok(vm) => cases.push(Case {
            name: "guest_memfd",
            backend: Backend::Kvm(vm),
            page: 4096,
            log2: 0,
        }),
        Err(why) => eprintln!("skip guest_memfd: {why}"),
    }
    cases
}

/// The kernel's guest_memfd backend, or `None` (with the reason printed)
/// where this host has none.
pub fn guest_memfd_case() -> Option<Case> {
    match kvm_vm() {
        Ok(vm) => Some(Case {
            name: "guest_memfd",
            backend: Backend::Kvm(vm),
            page: 4096,
            log2: 0,
        }),
        Err(why) => {
            eprintln!("skip: no guest_memfd on this host: {why}");
            None
        }
    }
}

/// A VM whose KVM offers guest_memfd with MMAP, or why not.
pub fn kvm_vm() -> Result<Arc<KvmVm>, String> {
    let vm = KvmVm::new().map_err(|err| err.to_string())?;
    if !vm.caps().guest_memfd {
        return Err("KVM has no KVM_CAP_GUEST_MEMFD".into());
    }
    if vm.caps().guest_memfd_flags & GUEST_MEMFD_FLAG_MMAP == 0 {
        return Err("KVM's guest_memfd cannot be mapped (no GUEST_MEMFD_FLAG_MMAP)".into());
    }
    Ok(vm)
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
