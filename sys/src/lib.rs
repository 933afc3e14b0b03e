//! # mmukit-sys
//!
//! The system calls mmukit's crates make, in one place, each returning the
//! kernel's errno as an [`io::Error`]: memfd files (and `memfd_secret(2)`,
//! which no crate wraps), their size and allocation, mappings owned by a
//! value ([`Mapping`]) and the fixed-address calls that replace parts of
//! them, the HugeTLB pools ([`hugetlb`]), filling new pages in one pass
//! ([`userfault`]), sending memory into a socket without copying it
//! ([`splice`]) and sizing a socket's send buffer. The calls go through rustix where it covers them; only
//! `memfd_secret` and the userfaultfd ioctls are made raw.
//!
//! ```
//! use mmukit_sys::{Mapping, memfd_create, ftruncate, file_size};
//!
//! let fd = memfd_create(c"example", libc::MFD_CLOEXEC)?;
//! ftruncate(&fd, 1 << 20)?;
//! assert_eq!(file_size(&fd)?, 1 << 20);
//! let map = Mapping::new(1 << 20, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, Some(&fd), 0)?;
//! assert_eq!(map.len(), 1 << 20);
//! # Ok::<(), std::io::Error>(())
//! ```

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;

use rustix::fs::{FallocateFlags, MemfdFlags};
use rustix::mm::{Advice, MapFlags, MremapFlags, ProtFlags};

pub mod host;
pub mod hugetlb;
pub mod size;
pub mod splice;
pub mod userfault;

use host::Capability;

/// `memfd_create(name, flags)` (`MFD_*` flags). With `MFD_HUGETLB` and
/// the pool of that page size hidden ([`host::HIDE_ENV`]), `EINVAL`, as a
/// kernel without HugeTLB answers.
pub fn memfd_create(name: &CStr, flags: libc::c_uint) -> io::Result<OwnedFd> {
    if flags & libc::MFD_HUGETLB != 0 {
        // No size bits: the default huge page size, 2 MiB on x86.
        let log2 = match (flags >> libc::MFD_HUGE_SHIFT) & libc::MFD_HUGE_MASK {
            0 => 21,
            log2 => log2,
        };
        if Capability::hugetlb_of(1 << log2).is_some_and(Capability::is_hidden) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
    }
    Ok(rustix::fs::memfd_create(
        name,
        MemfdFlags::from_bits_retain(flags),
    )?)
}

/// `memfd_secret(O_CLOEXEC)`: memory removed from the kernel direct map. A
/// raw system call (447 on x86_64): neither libc nor rustix wraps it.
/// `ENOSYS` where [`host::HIDE_ENV`] hides it, as on a kernel without it.
pub fn memfd_secret() -> io::Result<OwnedFd> {
    if Capability::MemfdSecret.is_hidden() {
        return Err(io::Error::from_raw_os_error(libc::ENOSYS));
    }
    // SAFETY: memfd_secret takes one integer flag and returns a descriptor
    // or -1; it touches no memory of ours.
    let ret = unsafe { libc::syscall(libc::SYS_memfd_secret, libc::O_CLOEXEC) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor from the kernel, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as RawFd) })
}

/// `ftruncate(fd, len)`.
pub fn ftruncate(fd: impl AsFd, len: u64) -> io::Result<()> {
    Ok(rustix::fs::ftruncate(fd, len)?)
}

/// `fallocate(fd, mode, offset, len)`, the values passed to the kernel as
/// they are (an offset at or above 2^63 is a negative `loff_t` there).
pub fn fallocate(fd: impl AsFd, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    Ok(rustix::fs::fallocate(
        fd,
        FallocateFlags::from_bits_retain(mode as u32),
        offset,
        len,
    )?)
}

/// The size of the file behind `fd`.
pub fn file_size(fd: impl AsFd) -> io::Result<u64> {
    Ok(rustix::fs::fstat(fd)?.st_size as u64)
}

/// Asks for a send buffer of `bytes` on the socket `fd` (`SO_SNDBUF`).
/// The kernel caps the request at `net.core.wmem_max` and keeps twice
/// what it grants (`sk_setsockopt`), as [`send_buffer_size`] then reads.
pub fn set_send_buffer_size(fd: impl AsFd, bytes: usize) -> io::Result<()> {
    Ok(rustix::net::sockopt::set_socket_send_buffer_size(
        fd, bytes,
    )?)
}

/// The send buffer of the socket `fd` in bytes (`SO_SNDBUF`).
pub fn send_buffer_size(fd: impl AsFd) -> io::Result<usize> {
    Ok(rustix::net::sockopt::socket_send_buffer_size(fd)?)
}

/// A memory mapping owned by this value and unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    addr: NonNull<u8>,
    len: usize,
}

// SAFETY: a Mapping is an address range; access to the memory goes through
// raw pointers whose users synchronize as documented where they are used.
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` hands out only the address.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// `mmap(NULL, len, prot, flags, fd, offset)` (`PROT_*`, `MAP_*`);
    /// anonymous without `fd`.
    pub fn new(
        len: usize,
        prot: i32,
        flags: i32,
        fd: Option<&OwnedFd>,
        offset: u64,
    ) -> io::Result<Self> {
        let prot = ProtFlags::from_bits_retain(prot as u32);
        let addr = match fd {
            // SAFETY: a new mapping at an address the kernel chooses; it
            // cannot overlap memory Rust already uses.
            Some(fd) => unsafe {
                rustix::mm::mmap(
                    std::ptr::null_mut(),
                    len,
                    prot,
                    MapFlags::from_bits_retain(flags as u32),
                    fd,
                    offset,
                )
            },
            // SAFETY: as above, with no file.
            None => unsafe {
                rustix::mm::mmap_anonymous(
                    std::ptr::null_mut(),
                    len,
                    prot,
                    MapFlags::from_bits_retain((flags & !libc::MAP_ANONYMOUS) as u32),
                )
            },
        }?;
        Ok(Self {
            addr: NonNull::new(addr.cast()).expect("mmap does not return NULL on success"),
            len,
        })
    }

    /// An inaccessible, unreserved span of `len` bytes aligned to `align` (a
    /// power of two), to map files into with [`map_fixed`].
    pub fn reserve_aligned(len: usize, align: usize) -> io::Result<Self> {
        let padded_len = len
            .checked_add(align)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        let padded = Self::new(
            padded_len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            None,
            0,
        )?;
        let base = padded.addr() as usize;
        let aligned = base.next_multiple_of(align);
        let (head, tail) = (aligned - base, base + padded_len - (aligned + len));
        std::mem::forget(padded);
        // SAFETY: head and tail are the unaligned ends of the reservation
        // just made, which nothing else knows about.
        unsafe {
            munmap(base as *mut u8, head);
            munmap((aligned + len) as *mut u8, tail);
        }
        Ok(Self {
            addr: NonNull::new(aligned as *mut u8).expect("non-null"),
            len,
        })
    }

    /// The first byte.
    pub fn addr(&self) -> *mut u8 {
        self.addr.as_ptr()
    }

    /// The length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never, for a mapping the kernel made).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Keeps the range mapped for the rest of the process and returns its
    /// address: nothing unmaps it any more.
    pub fn into_raw(self) -> *mut u8 {
        let addr = self.addr();
        std::mem::forget(self);
        addr
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the range was mapped by `new` or `reserve_aligned` and is
        // unmapped exactly once, here.
        unsafe { munmap(self.addr(), self.len) };
    }
}

/// `munmap(addr, len)`; a zero length does nothing.
///
/// # Safety
///
/// The range must be mapped by the caller's code, and nothing may use it
/// afterwards.
pub unsafe fn munmap(addr: *mut u8, len: usize) {
    if len == 0 {
        return;
    }
    // SAFETY: guaranteed by the caller.
    if let Err(err) = unsafe { rustix::mm::munmap(addr.cast(), len) } {
        // munmap of a range we mapped fails only on a bad argument: a bug.
        debug_assert!(false, "munmap({addr:p}, {len:#x}): {err}");
    }
}

/// `mmap(addr, len, prot, MAP_SHARED | MAP_FIXED, fd, offset)`: replaces
/// part of an existing mapping with the file range.
///
/// # Safety
///
/// `[addr, addr + len)` must lie inside a mapping owned by the caller, whose
/// memory no Rust reference points into.
pub unsafe fn map_fixed(
    addr: *mut u8,
    len: usize,
    prot: i32,
    fd: impl AsFd,
    offset: u64,
) -> io::Result<()> {
    // SAFETY: guaranteed by the caller.
    unsafe { map_fixed_flags(addr, len, prot, libc::MAP_SHARED, fd, offset) }
}

/// `mmap(addr, len, prot, flags | MAP_FIXED, fd, offset)`, the flags passed
/// to the kernel as they are (`MAP_SHARED_VALIDATE` included).
///
/// # Safety
///
/// As for [`map_fixed`].
pub unsafe fn map_fixed_flags(
    addr: *mut u8,
    len: usize,
    prot: i32,
    flags: i32,
    fd: impl AsFd,
    offset: u64,
) -> io::Result<()> {
    // SAFETY: guaranteed by the caller.
    unsafe {
        rustix::mm::mmap(
            addr.cast(),
            len,
            ProtFlags::from_bits_retain(prot as u32),
            MapFlags::from_bits_retain((flags | libc::MAP_FIXED) as u32),
            fd,
            offset,
        )
    }?;
    Ok(())
}

/// `mmap(addr, len, prot, flags | MAP_ANONYMOUS | MAP_FIXED, -1, 0)`: fresh
/// anonymous memory over part of an existing mapping (`MAP_HUGETLB` and
/// `MAP_POPULATE` among the flags as the caller wants).
///
/// # Safety
///
/// As for [`map_fixed`].
pub unsafe fn map_fixed_anonymous(
    addr: *mut u8,
    len: usize,
    prot: i32,
    flags: i32,
) -> io::Result<()> {
    // SAFETY: guaranteed by the caller.
    unsafe {
        rustix::mm::mmap_anonymous(
            addr.cast(),
            len,
            ProtFlags::from_bits_retain(prot as u32),
            MapFlags::from_bits_retain(((flags | libc::MAP_FIXED) & !libc::MAP_ANONYMOUS) as u32),
        )
    }?;
    Ok(())
}

/// `mremap(old, 0, len, MREMAP_MAYMOVE | MREMAP_FIXED, new)`: a second
/// mapping of the same shared pages at `new`.
///
/// # Safety
///
/// `old` must start a shared mapping of at least `len` bytes; `[new, new +
/// len)` must lie inside a mapping owned by the caller that nothing uses.
pub unsafe fn mremap_alias(old: *mut u8, len: usize, new: *mut u8) -> io::Result<()> {
    // SAFETY: guaranteed by the caller.
    unsafe { rustix::mm::mremap_fixed(old.cast(), 0, len, MremapFlags::MAYMOVE, new.cast()) }?;
    Ok(())
}

/// `madvise(addr, len, advice)` (`MADV_*`).
///
/// # Safety
///
/// The range must lie inside a mapping owned by the caller; advice that
/// drops contents (MADV_REMOVE) must not pull data from under a reference.
pub unsafe fn madvise(addr: *mut u8, len: usize, advice: i32) -> io::Result<()> {
    let advice = match advice {
        libc::MADV_POPULATE_WRITE => Advice::LinuxPopulateWrite,
        libc::MADV_POPULATE_READ => Advice::LinuxPopulateRead,
        libc::MADV_REMOVE => Advice::LinuxRemove,
        libc::MADV_DONTNEED => Advice::LinuxDontNeed,
        libc::MADV_HUGEPAGE => Advice::LinuxHugepage,
        libc::MADV_NOHUGEPAGE => Advice::LinuxNoHugepage,
        _ => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
    };
    // SAFETY: guaranteed by the caller.
    unsafe { rustix::mm::madvise(addr.cast(), len, advice) }?;
    Ok(())
}
