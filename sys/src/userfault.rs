//! Filling pages as they are taken: `userfaultfd(2)`'s `UFFDIO_COPY`.
//!
//! A page the kernel gives to a mapping is cleared first, so filling fresh
//! memory with a copy (populate, then `memcpy`) writes every byte twice.
//! `UFFDIO_COPY` takes a missing page and fills it from a source in one
//! pass, clearing nothing: for a HugeTLB page the kernel copies straight
//! into the new folio (`hugetlb_mfill_atomic_pte`), for shmem and
//! anonymous memory into the new page.
//!
//! A [`PageFiller`] registers a range for missing-page faults, copies into
//! it, and unregisters it when dropped. It is made with
//! `UFFD_USER_MODE_ONLY`, which any user may ask for whatever
//! `vm.unprivileged_userfaultfd` says; no fault is ever handled through it.
//!
//! ```
//! use mmukit_sys::{Mapping, memfd_create, ftruncate, userfault::PageFiller};
//!
//! let fd = memfd_create(c"example", libc::MFD_CLOEXEC)?;
//! ftruncate(&fd, 1 << 16)?;
//! let map = Mapping::new(1 << 16, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, Some(&fd), 0)?;
//! let data = vec![0x5au8; 1 << 16];
//! // SAFETY: the mapping is ours and nothing touches it while the filler
//! // lives.
//! match unsafe { PageFiller::register(map.addr(), map.len()) } {
//!     Ok(filler) => {
//!         // SAFETY: inside the registered range; `data` is as long.
//!         unsafe { filler.copy(map.addr(), data.as_ptr(), data.len()) }?;
//!         drop(filler);
//!         // SAFETY: the pages are filled and nothing else writes them.
//!         assert_eq!(unsafe { *map.addr().add(12345) }, 0x5a);
//!     }
//!     // A kernel without userfaultfd (or MMUKIT_HIDE_CAPS=userfaultfd).
//!     Err(err) => assert!(PageFiller::unavailable(&err)),
//! }
//! # Ok::<(), std::io::Error>(())
//! ```

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::OnceLock;

use rustix::mm::UserfaultfdFlags;

use crate::host::Capability;

/// `UFFD_API`: the only API version.
const UFFD_API: u64 = 0xaa;
/// `UFFD_USER_MODE_ONLY`: faults from kernel mode are not handled (no
/// privilege needed).
const UFFD_USER_MODE_ONLY: u32 = 1;
/// `UFFDIO_REGISTER_MODE_MISSING`.
const REGISTER_MODE_MISSING: u64 = 1;
/// `1 << _UFFDIO_COPY` in the ioctls a registration offers.
const OFFERS_COPY: u64 = 1 << 3;

/// `_IOWR(0xAA, 0x3F, struct uffdio_api)`.
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
/// `_IOWR(0xAA, 0x00, struct uffdio_register)`.
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
/// `_IOR(0xAA, 0x01, struct uffdio_range)`.
const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_aa01;
/// `_IOWR(0xAA, 0x03, struct uffdio_copy)`.
const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;

/// `struct uffdio_api`.
#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct UffdioRange {
    start: u64,
    len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

/// `struct uffdio_copy`.
#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// A range registered for missing pages, filled with [`copy`](Self::copy)
/// and unregistered on drop.
#[derive(Debug)]
pub struct PageFiller {
    fd: OwnedFd,
    range: UffdioRange,
}

impl PageFiller {
    /// Registers `[addr, addr + len)` (aligned to the mapping's page size)
    /// for missing pages. `ENOSYS` where the kernel lacks userfaultfd or
    /// [`HIDE_ENV`](crate::host::HIDE_ENV) hides it.
    ///
    /// # Safety
    ///
    /// The range must lie in mappings owned by the caller, and nothing but
    /// [`copy`](Self::copy) may touch a missing page in it while the filler
    /// lives: a user-mode access would wait for a handler that never comes.
    pub unsafe fn register(addr: *mut u8, len: usize) -> io::Result<Self> {
        if Capability::Userfaultfd.is_hidden() {
            return Err(io::Error::from_raw_os_error(libc::ENOSYS));
        }
        let flags =
            UserfaultfdFlags::CLOEXEC | UserfaultfdFlags::from_bits_retain(UFFD_USER_MODE_ONLY);
        // SAFETY: the descriptor only acts on ranges registered below.
        let fd = unsafe { rustix::mm::userfaultfd(flags) }?;
        let mut api = UffdioApi {
            api: UFFD_API,
            features: 0,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes one `uffdio_api`.
        unsafe { ioctl(&fd, UFFDIO_API, &mut api) }?;
        let range = UffdioRange {
            start: addr as u64,
            len: len as u64,
        };
        let mut register = UffdioRegister {
            range,
            mode: REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes one `uffdio_register`;
        // the range is the caller's (its contract).
        unsafe { ioctl(&fd, UFFDIO_REGISTER, &mut register) }?;
        let filler = Self { fd, range };
        if register.ioctls & OFFERS_COPY == 0 {
            // Nothing on this range could be filled: dropping the filler
            // unregisters it.
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        Ok(filler)
    }

    /// Whether `err` (from [`register`](Self::register)) means this host
    /// cannot fill pages so, rather than that something went wrong: the
    /// caller copies the usual way instead.
    pub fn unavailable(err: &io::Error) -> bool {
        matches!(
            err.raw_os_error(),
            Some(libc::ENOSYS | libc::EPERM | libc::EINVAL | libc::EOPNOTSUPP)
        )
    }

    /// Copies `len` bytes from `src` into the missing pages at `dst`,
    /// taking each page as it goes. `EEXIST` where a page is already there;
    /// `ENOMEM` where none can be taken (a HugeTLB pool ran short). Safe to
    /// call from several threads at once on parts that do not overlap.
    ///
    /// # Safety
    ///
    /// `[dst, dst + len)` must lie in the registered range, page-aligned;
    /// `src` must be readable for `len` bytes.
    pub unsafe fn copy(&self, dst: *mut u8, src: *const u8, len: usize) -> io::Result<()> {
        let UffdioRange {
            start,
            len: range_len,
        } = self.range;
        let (dst, src, len) = (dst as u64, src as u64, len as u64);
        assert!(
            dst >= start && dst + len <= start + range_len,
            "a copy inside the registered range"
        );
        let mut done = 0;
        while done < len {
            let mut copy = UffdioCopy {
                dst: dst + done,
                src: src + done,
                len: len - done,
                mode: 0,
                copy: 0,
            };
            // SAFETY: UFFDIO_COPY reads and writes one `uffdio_copy`; the
            // ranges are as the caller promised.
            let result = unsafe { ioctl(&self.fd, UFFDIO_COPY, &mut copy) };
            if copy.copy > 0 {
                done += copy.copy as u64;
            }
            match result {
                Ok(()) => {}
                Err(err) if matches!(err.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)) => {}
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }
}

impl Drop for PageFiller {
    fn drop(&mut self) {
        let mut range = self.range;
        // SAFETY: UFFDIO_UNREGISTER reads one `uffdio_range`, the one
        // registered.
        if let Err(err) = unsafe { ioctl(&self.fd, UFFDIO_UNREGISTER, &mut range) } {
            // Closing the descriptor drops the registration anyway.
            debug_assert!(false, "UFFDIO_UNREGISTER: {err}");
        }
    }
}

/// One userfaultfd ioctl on `fd` with its argument `arg`.
///
/// # Safety
///
/// `request` must take a pointer to exactly one `T`, and what it does to
/// memory must be what the caller allows.
unsafe fn ioctl<T>(fd: &OwnedFd, request: libc::c_ulong, arg: &mut T) -> io::Result<()> {
    // SAFETY: guaranteed by the caller.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), request, std::ptr::from_mut(arg)) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether userfaultfd works here for filling pages (probed once on a small
/// anonymous mapping; "no" when hidden).
pub fn userfaultfd_works() -> bool {
    static WORKS: OnceLock<bool> = OnceLock::new();
    *WORKS.get_or_init(|| {
        let Ok(map) = crate::Mapping::new(
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            None,
            0,
        ) else {
            return false;
        };
        // SAFETY: a mapping of our own that nothing else knows about.
        unsafe { PageFiller::register(map.addr(), map.len()) }.is_ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Mapping;

    fn filler_or_skip(map: &Mapping) -> Option<PageFiller> {
        // SAFETY: the test's own mapping, untouched while the filler lives.
        match unsafe { PageFiller::register(map.addr(), map.len()) } {
            Ok(filler) => Some(filler),
            Err(err) if PageFiller::unavailable(&err) => {
                crate::host::record_skip("userfault", Capability::Userfaultfd, &err.to_string());
                None
            }
            Err(err) => panic!("register: {err}"),
        }
    }

    /// `UFFDIO_COPY` fills only missing pages: the kernel's
    /// `mfill_atomic_pte_copy` (shmem: `shmem_mfill_atomic_pte`) answers
    /// EEXIST where a page is already there, and unregistered pages fault
    /// in cleared as ever.
    #[test]
    fn a_copy_fills_missing_pages_and_refuses_present_ones() {
        let fd = crate::memfd_create(c"userfault-test", libc::MFD_CLOEXEC).unwrap();
        crate::ftruncate(&fd, 8 * 4096).unwrap();
        let map = Mapping::new(
            8 * 4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            Some(&fd),
            0,
        )
        .unwrap();
        let Some(filler) = filler_or_skip(&map) else {
            return;
        };
        let data: Vec<u8> = (0..4 * 4096).map(|i| (i % 251) as u8).collect();
        // SAFETY: pages 2..6 of the registered range, from `data`.
        unsafe { filler.copy(map.addr().add(2 * 4096), data.as_ptr(), data.len()) }.unwrap();
        // SAFETY: page 3 is present now: EEXIST.
        let again = unsafe { filler.copy(map.addr().add(3 * 4096), data.as_ptr(), 4096) };
        assert_eq!(again.unwrap_err().raw_os_error(), Some(libc::EEXIST));
        drop(filler);
        // SAFETY: filled pages read back; the rest read as zero (the
        // filler is gone, so a fault takes a cleared page).
        let back = unsafe { std::slice::from_raw_parts(map.addr(), map.len()) };
        assert_eq!(&back[2 * 4096..6 * 4096], &data[..]);
        assert!(back[..2 * 4096].iter().all(|&b| b == 0));
        assert!(back[6 * 4096..].iter().all(|&b| b == 0));
    }

    #[test]
    fn the_probe_agrees_with_a_registration() {
        let map = Mapping::new(
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            None,
            0,
        )
        .unwrap();
        // SAFETY: our own mapping.
        let registered = unsafe { PageFiller::register(map.addr(), map.len()) }.is_ok();
        assert_eq!(userfaultfd_works(), registered);
    }
}
