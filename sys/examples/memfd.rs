//! A memfd, sized, allocated and mapped through mmukit-sys, then read back
//! through the mapping.

use mmukit_sys::{Mapping, fallocate, file_size, ftruncate, memfd_create};

fn main() -> std::io::Result<()> {
    let fd = memfd_create(c"mmukit-example", libc::MFD_CLOEXEC)?;
    ftruncate(&fd, 1 << 20)?;
    fallocate(&fd, libc::FALLOC_FL_KEEP_SIZE, 0, 1 << 20)?;
    let map = Mapping::new(
        1 << 20,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_SHARED,
        Some(&fd),
        0,
    )?;
    // SAFETY: the mapping is 1 MiB of this process's readable, writable
    // memory, and nothing else refers to it.
    unsafe {
        map.addr().write(0x5a);
        assert_eq!(map.addr().read(), 0x5a);
    }
    println!(
        "memfd of {} bytes, mapped at {:p}",
        file_size(&fd)?,
        map.addr()
    );
    Ok(())
}
