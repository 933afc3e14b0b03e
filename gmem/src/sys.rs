//! Thin wrappers over the system calls gmem uses, each returning the
//! kernel's errno as an `io::Error`.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `memfd_create(name, flags)`.
pub(crate) fn memfd_create(name: &CStr, flags: libc::c_uint) -> io::Result<OwnedFd> {
    // SAFETY: `name` is a valid NUL-terminated string; the call has no
    // other memory effects.
    let fd = check(unsafe { libc::memfd_create(name.as_ptr(), flags) })?;
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `memfd_secret(flags)` (syscall 447; libc has no wrapper).
pub(crate) fn memfd_secret() -> io::Result<OwnedFd> {
    // SAFETY: memfd_secret takes one integer flag and returns a descriptor.
    let ret = unsafe { libc::syscall(libc::SYS_memfd_secret, libc::O_CLOEXEC) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor from the kernel, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as RawFd) })
}

/// `ftruncate(fd, len)`.
pub(crate) fn ftruncate(fd: &OwnedFd, len: u64) -> io::Result<()> {
    // SAFETY: a plain syscall on a descriptor we own.
    check(unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) }).map(drop)
}

/// `fallocate(fd, mode, offset, len)`.
pub(crate) fn fallocate(fd: &OwnedFd, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: a plain syscall on a descriptor we own.
    check(unsafe {
        libc::fallocate(
            fd.as_raw_fd(),
            mode,
            offset as libc::off_t,
            len as libc::off_t,
        )
    })
    .map(drop)
}

/// The size of the file behind `fd`.
pub(crate) fn file_size(fd: &OwnedFd) -> io::Result<u64> {
    // SAFETY: `stat` is plain data; zeroed is a valid value to overwrite.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `stat` is a valid out-pointer for the duration of the call.
    check(unsafe { libc::fstat(fd.as_raw_fd(), &mut stat) })?;
    Ok(stat.st_size as u64)
}

/// A memory mapping owned by this value and unmapped on drop.
#[derive(Debug)]
pub(crate) struct Mapping {
    addr: NonNull<u8>,
    len: usize,
}

// SAFETY: a Mapping is an address range; access to the memory goes through
// raw pointers whose users synchronize as documented where they are used.
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` hands out only the address.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// `mmap(NULL, len, prot, flags, fd, offset)`.
    pub(crate) fn new(
        len: usize,
        prot: i32,
        flags: i32,
        fd: Option<&OwnedFd>,
        offset: u64,
    ) -> io::Result<Self> {
        let raw = fd.map_or(-1, AsRawFd::as_raw_fd);
        // SAFETY: a new mapping at an address the kernel chooses; it cannot
        // overlap memory Rust already uses.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                flags,
                raw,
                offset as libc::off_t,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            addr: NonNull::new(addr.cast()).expect("mmap does not return NULL on success"),
            len,
        })
    }

    /// An inaccessible reservation of `len` bytes aligned to `align` (a
    /// power of two), to map files into with [`map_fixed`].
    pub(crate) fn reserve_aligned(len: usize, align: usize) -> io::Result<Self> {
        let padded = Self::new(
            len + align,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            None,
            0,
        )?;
        let base = padded.addr() as usize;
        let aligned = base.next_multiple_of(align);
        let (head, tail) = (aligned - base, base + len + align - (aligned + len));
        std::mem::forget(padded);
        // SAFETY: head and tail are the unaligned ends of the reservation
        // just made, which nothing else knows about.
        unsafe {
            if head > 0 {
                libc::munmap(base as *mut libc::c_void, head);
            }
            if tail > 0 {
                libc::munmap((aligned + len) as *mut libc::c_void, tail);
            }
        }
        Ok(Self {
            addr: NonNull::new(aligned as *mut u8).expect("non-null"),
            len,
        })
    }

    pub(crate) fn addr(&self) -> *mut u8 {
        self.addr.as_ptr()
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the range was mapped by `new` (or handed over through
        // `from_raw`) and is unmapped exactly once, here.
        unsafe { libc::munmap(self.addr.as_ptr().cast(), self.len) };
    }
}

/// `mmap(addr, len, prot, MAP_SHARED | MAP_FIXED, fd, offset)`: replaces
/// part of an existing mapping with the file range.
///
/// # Safety
///
/// `[addr, addr + len)` must lie inside a mapping owned by the caller, whose
/// memory no Rust reference points into.
pub(crate) unsafe fn map_fixed(
    addr: *mut u8,
    len: usize,
    prot: i32,
    fd: &OwnedFd,
    offset: u64,
) -> io::Result<()> {
    // SAFETY: guaranteed by the caller.
    unsafe { map_fixed_flags(addr, len, prot, libc::MAP_SHARED, fd, offset) }
}

/// `mmap(addr, len, prot, flags | MAP_FIXED, fd, offset)`.
///
/// # Safety
///
/// As for [`map_fixed`].
pub(crate) unsafe fn map_fixed_flags(
    addr: *mut u8,
    len: usize,
    prot: i32,
    flags: i32,
    fd: &OwnedFd,
    offset: u64,
) -> io::Result<()> {
    // SAFETY: guaranteed by the caller.
    let ret = unsafe {
        libc::mmap(
            addr.cast(),
            len,
            prot,
            flags | libc::MAP_FIXED,
            fd.as_raw_fd(),
            offset as libc::off_t,
        )
    };
    if ret == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `mremap(old, 0, len, MREMAP_MAYMOVE | MREMAP_FIXED, new)`: a second
/// mapping of the same shared pages at `new`.
///
/// # Safety
///
/// `old` must start a shared mapping of at least `len` bytes; `[new, new +
/// len)` must lie inside a mapping owned by the caller that nothing uses.
pub(crate) unsafe fn mremap_alias(old: *mut u8, len: usize, new: *mut u8) -> io::Result<()> {
    // SAFETY: guaranteed by the caller.
    let ret = unsafe {
        libc::mremap(
            old.cast(),
            0,
            len,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            new.cast::<libc::c_void>(),
        )
    };
    if ret == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `madvise(addr, len, advice)`.
///
/// # Safety
///
/// The range must lie inside a mapping owned by the caller; advice that
/// drops contents (MADV_REMOVE) must not pull data from under a reference.
pub(crate) unsafe fn madvise(addr: *mut u8, len: usize, advice: i32) -> io::Result<()> {
    // SAFETY: guaranteed by the caller.
    check(unsafe { libc::madvise(addr.cast(), len, advice) }).map(drop)
}
