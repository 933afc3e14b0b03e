//! The mapping steps every backend is built from: whole-file mappings,
//! fixed remaps inside a view, populate, zero, copy, and the fault source
//! that makes an access raise SIGBUS. A leaf: it knows descriptors and
//! mappings, nothing of files or views.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use super::error::GmemError;
use crate::sys::{self, Mapping, userfault::PageFiller};

/// The `fallocate` mode that frees a range and keeps the size.
pub(super) const PUNCH_HOLE: i32 = libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE;

/// Read and write: the protection of every mapping of guest memory.
const READ_WRITE: i32 = libc::PROT_READ | libc::PROT_WRITE;

/// A shared read-write mapping of all of `fd`.
pub(super) fn map_whole(fd: &OwnedFd, size: u64) -> Result<Mapping, GmemError> {
    Mapping::new(size as usize, READ_WRITE, libc::MAP_SHARED, Some(fd), 0)
        .map_err(GmemError::os("mmap"))
}

/// A shared read-write mapping of all of `fd` that reserves nothing: pages
/// are taken only where they are allocated.
pub(super) fn map_whole_sparse(fd: &OwnedFd, size: u64) -> Result<Mapping, GmemError> {
    Mapping::new(
        size as usize,
        READ_WRITE,
        libc::MAP_SHARED | libc::MAP_NORESERVE,
        Some(fd),
        0,
    )
    .map_err(GmemError::os("mmap"))
}

/// `fallocate(fd, mode, start, end - start)`.
pub(super) fn fallocate(fd: &OwnedFd, mode: i32, start: u64, end: u64) -> Result<(), GmemError> {
    sys::fallocate(fd, mode, start, end - start).map_err(GmemError::os("fallocate"))
}

/// Maps `[offset, offset + len)` of `fd` at the start of `view`.
pub(super) fn map_file_view(
    view: &Mapping,
    fd: &OwnedFd,
    offset: u64,
    len: u64,
) -> Result<(), GmemError> {
    if len == 0 {
        return Ok(());
    }
    // SAFETY: the start of the caller's fresh reservation.
    unsafe { sys::map_fixed(view.addr(), len as usize, READ_WRITE, fd, offset) }
        .map_err(GmemError::os("mmap"))
}

/// Maps `[offset, offset + len)` of `fd` read-write at `addr`.
///
/// # Safety
///
/// The range must lie inside a view's mapping, under the state lock, with
/// no Rust reference into it.
pub(super) unsafe fn map_file_at(
    addr: *mut u8,
    fd: &OwnedFd,
    offset: u64,
    len: u64,
) -> Result<(), GmemError> {
    // SAFETY: guaranteed by the caller.
    unsafe { sys::map_fixed(addr, len as usize, READ_WRITE, fd, offset) }
        .map_err(GmemError::os("mmap(MAP_FIXED)"))
}

/// Allocates the pages of `[offset, offset + len)` of an internal mapping
/// in one call rather than one fault each.
pub(super) fn populate(map: &Mapping, offset: u64, len: u64) -> Result<(), GmemError> {
    assert!(offset + len <= map.len() as u64);
    // SAFETY: inside the mapping (asserted), which the file owns; populating
    // changes no contents.
    unsafe {
        sys::madvise(
            map.addr().add(offset as usize),
            len as usize,
            libc::MADV_POPULATE_WRITE,
        )
    }
    .map_err(GmemError::os("madvise(MADV_POPULATE_WRITE)"))
}

/// Zeroes `[start, end)` of an internal mapping.
pub(super) fn zero(map: &Mapping, start: u64, end: u64) {
    assert!(start <= end && end <= map.len() as u64);
    // SAFETY: inside the internal read-write mapping (asserted); guest
    // memory is reached through raw pointers only.
    unsafe { std::ptr::write_bytes(map.addr().add(start as usize), 0, (end - start) as usize) };
}

/// Copies `[offset, offset + len)` from one internal mapping to the same
/// offsets of another; both cover the whole file, each a different one.
///
/// # Safety
///
/// Nothing may access either range while it runs: a split or merge expects
/// no access to the page it moves.
pub(super) unsafe fn copy_range(from: &Mapping, to: &Mapping, offset: u64, len: u64) {
    let end = (offset + len) as usize;
    assert!(end <= from.len() && end <= to.len() && from.addr() != to.addr());
    // SAFETY: both ranges are inside their mappings (asserted), in
    // different files, and unused for the copy's length (the caller's word).
    unsafe {
        std::ptr::copy_nonoverlapping(
            from.addr().add(offset as usize),
            to.addr().add(offset as usize),
            len as usize,
        )
    };
}

/// The direction of a [`file_io`] between a mapping and a file.
#[derive(Clone, Copy)]
enum FileIo {
    /// `pwrite(2)`: the mapping into the file.
    Write,
    /// `pread(2)`: the file into the mapping.
    Read,
}

/// Moves `[offset, offset + len)` between the internal mapping `map` and
/// the same offsets of the file `fd`, one `pwrite`/`pread` after another
/// until all of it moved.
///
/// # Safety
///
/// Nothing may access the mapping's range while it runs.
unsafe fn file_io(
    io_kind: FileIo,
    map: &Mapping,
    fd: &OwnedFd,
    offset: u64,
    len: u64,
) -> Result<(), GmemError> {
    assert!(offset + len <= map.len() as u64);
    let (name, at_end) = match io_kind {
        FileIo::Write => ("pwrite", libc::ENOSPC),
        FileIo::Read => ("pread", libc::EIO),
    };
    let mut done = 0;
    while done < len {
        // SAFETY: inside the mapping (asserted).
        let at = unsafe { map.addr().add((offset + done) as usize) };
        let (rest, file_offset) = ((len - done) as usize, (offset + done) as libc::off_t);
        // SAFETY: `at` is valid for the rest of the range, which the
        // caller keeps unused.
        let moved = unsafe {
            match io_kind {
                FileIo::Write => libc::pwrite(fd.as_raw_fd(), at.cast(), rest, file_offset),
                FileIo::Read => libc::pread(fd.as_raw_fd(), at.cast(), rest, file_offset),
            }
        };
        if moved <= 0 {
            let err = if moved == 0 {
                io::Error::from_raw_os_error(at_end)
            } else {
                io::Error::last_os_error()
            };
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(GmemError::os(name)(err));
        }
        done += moved as u64;
    }
    Ok(())
}

/// Writes `[offset, offset + len)` of the internal mapping `from` into the
/// same offsets of the shmem file `to` with `pwrite(2)`: the kernel takes
/// each page and fills it from the data in one pass (a write of whole pages
/// leaves them uncleared), where populating first would clear every page
/// and then copy over it.
///
/// # Safety
///
/// Nothing may access the source range while it runs (a split moves a page
/// nothing uses).
pub(super) unsafe fn write_range_into(
    from: &Mapping,
    to: &OwnedFd,
    offset: u64,
    len: u64,
) -> Result<(), GmemError> {
    // SAFETY: guaranteed by the caller.
    unsafe { file_io(FileIo::Write, from, to, offset, len) }
}

/// Reads `[offset, offset + len)` of the file `from` into the same offsets
/// of the internal mapping `to` with `pread(2)`: no fault on a mapping of
/// the file, whose pages a write put in the file only.
///
/// # Safety
///
/// Nothing may access the destination range while it runs (a merge moves a
/// page nothing uses).
pub(super) unsafe fn read_range_from(
    from: &OwnedFd,
    to: &Mapping,
    offset: u64,
    len: u64,
) -> Result<(), GmemError> {
    // SAFETY: guaranteed by the caller.
    unsafe { file_io(FileIo::Read, to, from, offset, len) }
}

/// Copies `[offset, offset + len)` from the internal mapping `from` into
/// the same offsets of `to`, whose pages in that range are all missing, on
/// up to `threads` threads, each taking a share of `page_size`-aligned
/// pages (`page_size` is `to`'s page size).
///
/// Where the host offers userfaultfd, each page is taken and filled in one
/// pass (`UFFDIO_COPY`), so it is never cleared first. Elsewhere each
/// thread populates a page (the kernel clears it) and copies into it while
/// it is still in cache. A page the destination cannot take (its HugeTLB
/// pool is short) fails the copy with ENOMEM.
///
/// # Safety
///
/// Nothing may access either range while it runs (a split moves a page
/// nothing uses); the two mappings are of different files.
pub(super) unsafe fn copy_into_new_pages(
    from: &Mapping,
    to: &Mapping,
    offset: u64,
    len: u64,
    page_size: u64,
    threads: usize,
) -> Result<(), GmemError> {
    assert!(offset + len <= to.len() as u64);
    let at = to.addr().wrapping_add(offset as usize);
    // SAFETY: the range lies in `to` (asserted) and nothing touches it
    // while the split runs (the caller's word), so no access waits on the
    // registration.
    let filler = match unsafe { PageFiller::register(at, len as usize) } {
        Ok(filler) => Some(filler),
        Err(err) if PageFiller::unavailable(&err) => None,
        Err(err) => return Err(GmemError::os("userfaultfd: UFFDIO_REGISTER")(err)),
    };
    // SAFETY: the caller's word, passed on; the filler covers the range.
    unsafe { copy_pages(from, to, offset, len, page_size, threads, filler.as_ref()) }
}

/// [`copy_into_new_pages`] with the filler given (or none: populate, then
/// copy).
///
/// # Safety
///
/// As [`copy_into_new_pages`]; `filler`, if any, covers the range of `to`.
unsafe fn copy_pages(
    from: &Mapping,
    to: &Mapping,
    offset: u64,
    len: u64,
    page_size: u64,
    threads: usize,
    filler: Option<&PageFiller>,
) -> Result<(), GmemError> {
    let end = offset + len;
    assert!(end <= from.len() as u64 && end <= to.len() as u64 && from.addr() != to.addr());
    let (from_addr, to_addr) = (from.addr() as usize, to.addr() as usize);
    let copy_page = |at: u64| -> Result<(), GmemError> {
        let (src, dst) = (
            (from_addr + at as usize) as *const u8,
            (to_addr + at as usize) as *mut u8,
        );
        if let Some(filler) = filler {
            // SAFETY: one page inside the registered range, from the same
            // offset of `from`.
            match unsafe { filler.copy(dst, src, page_size as usize) } {
                Ok(()) => return Ok(()),
                // Already there (a page left behind): copy over it below;
                // it is present, so nothing waits on the registration.
                Err(err) if err.raw_os_error() == Some(libc::EEXIST) => {}
                Err(err) => return Err(GmemError::os("userfaultfd: UFFDIO_COPY")(err)),
            }
        } else {
            // SAFETY: inside `to` (asserted); populating changes no data.
            unsafe { sys::madvise(dst, page_size as usize, libc::MADV_POPULATE_WRITE) }.map_err(
                |err| {
                    // A HugeTLB page the pool cannot give is a SIGBUS the
                    // populate reports as EFAULT: the pool is short.
                    let err = if err.raw_os_error() == Some(libc::EFAULT) {
                        io::Error::from_raw_os_error(libc::ENOMEM)
                    } else {
                        err
                    };
                    GmemError::os("madvise(MADV_POPULATE_WRITE)")(err)
                },
            )?;
        }
        // SAFETY: both inside their mappings (asserted), of different
        // files, unused while the split runs (the caller's word); the
        // destination page is present.
        unsafe { std::ptr::copy_nonoverlapping(src, dst, page_size as usize) };
        Ok(())
    };
    let pages = len.div_ceil(page_size).max(1);
    let threads = (threads.max(1) as u64).min(pages);
    let per_thread = pages.div_ceil(threads) * page_size;
    let part = |start: u64| -> Result<(), GmemError> {
        let stop = (start + per_thread).min(end);
        (start..stop)
            .step_by(page_size as usize)
            .try_for_each(&copy_page)
    };
    std::thread::scope(|scope| {
        let others: Vec<_> = (1..threads)
            .map(|t| {
                let part = &part;
                scope.spawn(move || part(offset + t * per_thread))
            })
            .collect();
        let mut result = part(offset);
        for other in others {
            let joined = other.join().expect("a copy thread does not panic");
            result = result.and(joined);
        }
        result
    })
}

/// Asks for transparent huge pages on `[addr, addr + len)`; false when the
/// kernel refuses.
///
/// # Safety
///
/// The range must be a mapping the caller owns.
pub(super) unsafe fn ask_for_huge_pages(addr: *mut u8, len: usize) -> bool {
    // SAFETY: guaranteed by the caller; the advice changes no contents.
    unsafe { sys::madvise(addr, len, libc::MADV_HUGEPAGE) }.is_ok()
}

/// An empty memfd: every page of a mapping of it lies past its end, so any
/// access raises SIGBUS. Host views map private pages, and the parts of
/// themselves past the end of the file, from it.
fn fault_source() -> Result<&'static OwnedFd, GmemError> {
    static SOURCE: std::sync::OnceLock<OwnedFd> = std::sync::OnceLock::new();
    if let Some(fd) = SOURCE.get() {
        return Ok(fd);
    }
    let fd = sys::memfd_create(c"mmukit-gmem-sigbus", libc::MFD_CLOEXEC)
        .map_err(GmemError::os("memfd_create"))?;
    Ok(SOURCE.get_or_init(|| fd))
}

/// Maps `[addr, addr + len)` from the fault source: touching it raises
/// SIGBUS.
///
/// # Safety
///
/// The range must lie inside a mapping owned by the caller, whose memory no
/// Rust reference points into.
pub(super) unsafe fn map_fault_source(addr: *mut u8, len: u64) -> Result<(), GmemError> {
    let fd = fault_source()?;
    // SAFETY: guaranteed by the caller.
    unsafe { sys::map_fixed(addr, len as usize, READ_WRITE, fd, 0) }
        .map_err(GmemError::os("mmap(MAP_FIXED)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh shared file mapping of `len` bytes, of 4 KiB pages or (with
    /// `hugetlb`) 2 MiB ones.
    fn fresh(len: u64, hugetlb: bool) -> (OwnedFd, Mapping) {
        let flags = if hugetlb {
            libc::MFD_CLOEXEC | libc::MFD_HUGETLB | (21 << libc::MFD_HUGE_SHIFT)
        } else {
            libc::MFD_CLOEXEC
        };
        let fd = sys::memfd_create(c"mapping-test", flags).unwrap();
        sys::ftruncate(&fd, len).unwrap();
        let map = Mapping::new(
            len as usize,
            READ_WRITE,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
            Some(&fd),
            0,
        )
        .unwrap();
        (fd, map)
    }

    /// Copies pages `[page_size, len - page_size)` of a patterned source
    /// both ways (filled by userfaultfd where the host has it, and
    /// populated then copied) on 3 threads, and checks every byte, and that
    /// the first and last pages stay untouched.
    fn both_ways(len: u64, page_size: u64, hugetlb: bool) {
        let (_source_fd, source) = fresh(len, hugetlb);
        // SAFETY: our own mapping, written through its pointer alone.
        let bytes = unsafe { std::slice::from_raw_parts_mut(source.addr(), len as usize) };
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = (i / 4096 + i % 251) as u8;
        }
        let (offset, copied) = (page_size, len - 2 * page_size);
        for with_filler in [true, false] {
            let (_fd, to) = fresh(len, hugetlb);
            // SAFETY: the test's own mappings; nothing else touches them.
            let filler = with_filler.then(|| unsafe {
                PageFiller::register(to.addr().add(offset as usize), copied as usize)
            });
            let filler = match filler {
                None => None,
                Some(Ok(filler)) => Some(filler),
                Some(Err(err)) if PageFiller::unavailable(&err) => {
                    crate::HostCaps::get().allows(
                        "copy_pages with userfaultfd",
                        &[sys::host::Capability::Userfaultfd],
                    );
                    continue;
                }
                Some(Err(err)) => panic!("register: {err}"),
            };
            // SAFETY: as above; the filler covers the copied range.
            unsafe { copy_pages(&source, &to, offset, copied, page_size, 3, filler.as_ref()) }
                .unwrap();
            drop(filler);
            // SAFETY: our mapping, every page now readable.
            let back = unsafe { std::slice::from_raw_parts(to.addr(), len as usize) };
            let (head, rest) = back.split_at(offset as usize);
            let (middle, tail) = rest.split_at(copied as usize);
            assert!(head.iter().all(|&b| b == 0), "first page untouched");
            assert!(tail.iter().all(|&b| b == 0), "last page untouched");
            assert!(
                middle == &bytes[offset as usize..(offset + copied) as usize],
                "every copied byte (filler: {with_filler})"
            );
        }
    }

    #[test]
    fn new_pages_get_every_byte_filled_or_populated() {
        both_ways(64 * 4096, 4096, false);
    }

    #[test]
    fn new_hugetlb_pages_get_every_byte_filled_or_populated() {
        if crate::caps::hugetlb_pages_free("copy_pages on HugeTLB", 2 << 20, 10) {
            both_ways(5 * (2 << 20), 2 << 20, true);
        }
    }
}
