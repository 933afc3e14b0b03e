//! Guest-physical layout used by the built-in workloads.

/// Where built-in programs are loaded.
pub const CODE: u64 = 0x1000;
/// Where the vCPUs after the first of a `hello`, `counter` or `binary`
/// run park: one `hlt` instruction, below [`CODE`].
pub const PARK: u64 = 0xff0;
/// Where the `kvm` idle guest's fill starts: the pages below hold its
/// program and the parked vCPUs' `hlt`.
pub const IDLE_FILL: u64 = 0x2000;
/// Where the dirty-log shares of the vCPUs start in guest memory of
/// up to [`MMIO_HOLE_START`].
pub const SHARES: u64 = 1 << 20;
/// Guest memory is laid out as real machines lay it out: below this
/// (3 GiB) at its own address, and the rest from [`HIGH_MEMORY`], past
/// the MMIO hole (the local APIC, the IOAPIC, PCI windows).
pub const MMIO_HOLE_START: u64 = 3 << 30;
/// Where memory above the hole starts (4 GiB).
pub const HIGH_MEMORY: u64 = 4 << 30;
/// The most guest memory the KVM dirty-log guest maps (its page tables
/// live below [`SHARES`]).
pub const MAX_MAPPED_GIB: u64 = 240;

/// Where the dirty-log shares start, in guest memory (not a guest
/// physical address: above the hole they differ by 1 GiB). Memory of up
/// to 3 GiB keeps them at [`SHARES`]; bigger memory puts them at its
/// top, so that the guest writes past 4 GiB.
pub fn shares_start(memory_bytes: u64, total_share_bytes: u64) -> u64 {
    if memory_bytes <= MMIO_HOLE_START {
        SHARES
    } else {
        (memory_bytes - total_share_bytes) & !((2 << 20) - 1)
    }
}

/// The guest physical address of guest memory offset `offset`.
pub fn gpa_of(offset: u64) -> u64 {
    if offset < MMIO_HOLE_START {
        offset
    } else {
        offset - MMIO_HOLE_START + HIGH_MEMORY
    }
}
