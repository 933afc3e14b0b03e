//! A guest memory file on memfd: data written through a host view, a page
//! made private (the host view faults on it; the guest view does not) and
//! shared again with its data.

use gmem::consts::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
use gmem::{Attribute, Backend, GmemConfig, GmemError, GuestMemFile};

fn main() -> Result<(), GmemError> {
    let file = GuestMemFile::create(
        &Backend::Memfd,
        GmemConfig {
            size: 2 << 20,
            flags: GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
            huge_page_size_log2: 0,
        },
    )?;
    let host = file.map(0, 2 << 20)?;
    let guest = file.map_guest(0, 2 << 20)?;
    host.write_at(0x3000, b"shared data")?;
    file.convert(0x3000, 0x1000, Attribute::Private)?;
    assert!(
        host.read_at(0x3000, &mut [0; 4]).is_err(),
        "private: the host faults"
    );
    let mut word = [0u8; 11];
    guest.read_at(0x3000, &mut word)?;
    assert_eq!(&word, b"shared data", "the guest still sees it");
    file.convert(0x3000, 0x1000, Attribute::Shared)?;
    host.read_at(0x3000, &mut word)?;
    println!(
        "back to shared: {:?}; attribute runs {:?}",
        String::from_utf8_lossy(&word),
        file.attribute_runs(0, 2 << 20)
    );
    Ok(())
}
