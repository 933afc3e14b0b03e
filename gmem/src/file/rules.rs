//! The kernel's argument checks for fallocate and mmap, in its order.

use std::io;

use super::PAGE_SIZE;
use super::error::{GmemError, InvalidArgument, Unsupported};
use crate::consts::GUEST_MEMFD_FLAG_MMAP;

pub(super) fn page_aligned(value: u64) -> bool {
    value.is_multiple_of(PAGE_SIZE)
}

/// `MAP_SHARED_VALIDATE`: shared, with every other flag checked.
const MAP_SHARED_VALIDATE: i32 = 0x03;
/// The map types (`MAP_TYPE`).
const MAP_TYPE: i32 = 0x0f;
/// The largest mapping length: x86-64's user address space with 4-level
/// paging, less a page (`TASK_SIZE`).
const TASK_SIZE: u64 = (1 << 47) - 4096;
/// The flags `MAP_SHARED_VALIDATE` accepts (`LEGACY_MAP_MASK`).
const LEGACY_MAP_MASK: i32 = libc::MAP_SHARED
    | libc::MAP_PRIVATE
    | libc::MAP_FIXED
    | libc::MAP_ANONYMOUS
    | libc::MAP_DENYWRITE
    | libc::MAP_EXECUTABLE
    | 0x4000000 // MAP_UNINITIALIZED
    | libc::MAP_GROWSDOWN
    | libc::MAP_LOCKED
    | libc::MAP_NORESERVE
    | libc::MAP_POPULATE
    | libc::MAP_NONBLOCK
    | libc::MAP_STACK
    | libc::MAP_HUGETLB;

/// Checks an `mmap(2)` of `len` bytes at `offset` of a guest memory file
/// created with `file_flags`, in the kernel's order, and returns the length
/// rounded up to whole pages (as `do_mmap` rounds it):
///
/// 1. `mmap` itself (`do_mmap`): a zero length, or an offset not page
///    aligned, is EINVAL; a length that wraps when rounded up, or that
///    passes the user address space, is ENOMEM; an offset plus length that
///    wraps in pages, or ends past the largest file offset, is EOVERFLOW;
///    a map type other than `MAP_SHARED`, `MAP_SHARED_VALIDATE` or
///    `MAP_PRIVATE` is EINVAL, and a flag `MAP_SHARED_VALIDATE` does not
///    know (or `MAP_SYNC`, which guest memory does not take) is EOPNOTSUPP.
/// 2. guest_memfd's `mmap` handler: a file without `GUEST_MEMFD_FLAG_MMAP`
///    is ENODEV; a private mapping is EINVAL; for HugeTLB memory an offset
///    or length that is not a whole number of huge pages (`granule`) is
///    EINVAL.
///
/// ```
/// use gmem::check_mmap;
/// use gmem::consts::GUEST_MEMFD_FLAG_MMAP;
/// // The offset is checked before the MMAP flag.
/// assert_eq!(check_mmap(1, 4096, libc::MAP_SHARED, 0, 4096).unwrap_err().errno(), libc::EINVAL);
/// assert_eq!(check_mmap(0, 4096, libc::MAP_SHARED, 0, 4096).unwrap_err().errno(), libc::ENODEV);
/// assert_eq!(check_mmap(0, 100, 0x03, GUEST_MEMFD_FLAG_MMAP, 4096).unwrap(), 4096);
/// ```
pub fn check_mmap(
    offset: u64,
    len: u64,
    map_flags: i32,
    file_flags: u64,
    granule: u64,
) -> Result<u64, GmemError> {
    let (len, shared) = check_mmap_generic(offset, len, map_flags)?;
    if file_flags & GUEST_MEMFD_FLAG_MMAP == 0 {
        return Err(GmemError::NoMmap);
    }
    if !shared {
        return Err(InvalidArgument::PrivateMapping.into());
    }
    if !offset.is_multiple_of(granule) || !len.is_multiple_of(granule) {
        return Err(InvalidArgument::MappingPages {
            offset,
            len,
            granule,
        }
        .into());
    }
    Ok(len)
}

/// See [`check_mmap`]: the checks the kernel's `mmap` makes for every file,
/// before the file's own handler runs. Returns the length rounded up to
/// whole pages and whether the mapping is shared.
pub(super) fn check_mmap_generic(
    offset: u64,
    len: u64,
    map_flags: i32,
) -> Result<(u64, bool), GmemError> {
    let os = |errno: i32| GmemError::Os {
        op: "mmap",
        source: io::Error::from_raw_os_error(errno),
    };
    if len == 0 || !page_aligned(offset) {
        return Err(InvalidArgument::Mapping { offset, len }.into());
    }
    let len = len
        .checked_next_multiple_of(PAGE_SIZE)
        .ok_or(os(libc::ENOMEM))?;
    let pgoff = offset / PAGE_SIZE;
    if pgoff.checked_add(len / PAGE_SIZE).is_none() {
        return Err(os(libc::EOVERFLOW));
    }
    if len > TASK_SIZE {
        return Err(os(libc::ENOMEM));
    }
    // `file_mmap_ok`: the mapping must end inside the largest file offset.
    if offset > MAX_FILE_OFFSET || len > MAX_FILE_OFFSET - offset {
        return Err(os(libc::EOVERFLOW));
    }
    let shared = match map_flags & MAP_TYPE {
        libc::MAP_SHARED => true,
        MAP_SHARED_VALIDATE => {
            if map_flags & !LEGACY_MAP_MASK != 0 {
                return Err(Unsupported::ValidatedMapFlags { flags: map_flags }.into());
            }
            true
        }
        libc::MAP_PRIVATE => false,
        _ => {
            return Err(InvalidArgument::MapType { flags: map_flags }.into());
        }
    };
    Ok((len, shared))
}

/// The modes `vfs_fallocate` knows (`FALLOC_FL_MODE_MASK`): punch hole,
/// collapse, zero, insert, unshare and write-zeroes ranges.
const FALLOC_MODE_MASK: i32 = 0x02 | 0x08 | 0x10 | 0x20 | 0x40 | 0x80;
/// The largest file offset (`MAX_LFS_FILESIZE`, the `s_maxbytes` of
/// guest_memfd's pseudo filesystem).
const MAX_FILE_OFFSET: u64 = i64::MAX as u64;

/// Checks a `fallocate(2)` on a guest memory file of `size` bytes as the
/// kernel does, in its order, and returns the range `[offset, offset +
/// len)`:
///
/// 1. `vfs_fallocate`: an offset or a length that is negative as a `loff_t`
///    (at or above 2^63), or a zero length, is EINVAL; a mode bit it does
///    not know, a combination of modes, a punch without `KEEP_SIZE`, or
///    collapse / insert / write-zeroes with it, is EOPNOTSUPP; `offset +
///    len` past the largest file offset is EFBIG.
/// 2. guest_memfd (`kvm_gmem_fallocate`): no `KEEP_SIZE`, or any mode but a
///    punch, is EOPNOTSUPP; an offset or length not page aligned is EINVAL;
///    an allocation past the end of the file is EINVAL.
///
/// Nothing is clamped before every check has passed, so a punch of
/// `(0, 1 << 63)` is EINVAL and never wipes a file.
///
/// ```
/// use gmem::check_fallocate;
/// let punch = libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE;
/// assert_eq!(check_fallocate(punch, 0, 1 << 63, 1 << 20).unwrap_err().errno(), libc::EINVAL);
/// assert_eq!(check_fallocate(punch, 4096, u64::MAX >> 1, 1 << 20).unwrap_err().errno(), libc::EFBIG);
/// assert_eq!(check_fallocate(0, 0, 0, 1 << 20).unwrap_err().errno(), libc::EINVAL);
/// assert_eq!(check_fallocate(punch, 1 << 20, 4096, 1 << 20).unwrap(), (1 << 20)..(1 << 20) + 4096);
/// ```
pub fn check_fallocate(
    mode: i32,
    offset: u64,
    len: u64,
    size: u64,
) -> Result<std::ops::Range<u64>, GmemError> {
    if offset > MAX_FILE_OFFSET || len > MAX_FILE_OFFSET || len == 0 {
        return Err(InvalidArgument::FallocateArguments { offset, len }.into());
    }
    let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
    let unsupported = |why: Unsupported| Err(GmemError::NotSupported(why));
    if mode & !(FALLOC_MODE_MASK | libc::FALLOC_FL_KEEP_SIZE) != 0 {
        return unsupported(Unsupported::UnknownFallocateBits { mode });
    }
    match mode & FALLOC_MODE_MASK {
        // Allocate, unshare and zero ranges take KEEP_SIZE or not.
        0 | 0x40 | 0x10 => {}
        libc::FALLOC_FL_PUNCH_HOLE if !keep_size => {
            return unsupported(Unsupported::PunchWithoutKeepSize);
        }
        libc::FALLOC_FL_PUNCH_HOLE => {}
        0x08 | 0x20 | 0x80 if keep_size => {
            return unsupported(Unsupported::ModeCannotKeepSize { mode });
        }
        0x08 | 0x20 | 0x80 => {}
        _ => return unsupported(Unsupported::CombinedModes { mode }),
    }
    let end = offset + len;
    if end > MAX_FILE_OFFSET {
        return Err(GmemError::TooBig { offset, len });
    }
    if !keep_size {
        return unsupported(Unsupported::SizeChange);
    }
    if mode & !(libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE) != 0 {
        return unsupported(Unsupported::FallocateMode { mode });
    }
    if !page_aligned(offset) || !page_aligned(len) {
        return Err(InvalidArgument::FallocateAlignment { offset, len }.into());
    }
    if mode & libc::FALLOC_FL_PUNCH_HOLE == 0 && end > size {
        return Err(InvalidArgument::AllocationPastEnd { offset, end, size }.into());
    }
    Ok(offset..end)
}
