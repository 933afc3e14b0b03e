//! Boot: the guest's program in memory, and the processor modes it
//! starts in (real, protected, long with identity-mapped page tables).

use gmem::GuestRegion;
use kvm_bindings::kvm_segment;
use kvm_ioctls::VcpuFd;

use crate::config::layout;
use crate::engine::{RunError, kvm_err};
use crate::guest_error::GuestError;

/// Page tables for long mode live here: the PML4, the PDPT, then one page
/// directory per GiB mapped (up to `layout::MAX_MAPPED_GIB`, below the
/// dirty-log shares at 1 MiB).
const LONG_MODE_TABLES: u64 = 0x9000;

pub(super) fn write_guest(region: &GuestRegion, gpa: u64, bytes: &[u8]) -> Result<(), RunError> {
    region
        .view()
        .write_at(gpa, bytes)
        .map_err(|source| GuestError::Load { gpa, source }.into())
}

/// Real mode at linear address `entry`: CS holds the 64 KiB segment of
/// the entry point (so it may lie above 64 KiB), data segments start at 0.
pub(super) fn real_mode(vcpu: &VcpuFd, entry: u64) -> Result<(), RunError> {
    if entry >= 1 << 20 {
        return Err(RunError::Host {
            what: format!("workload.entry_gpa {entry:#x} is above 1 MiB"),
            fix: "real mode reaches only the first 1 MiB; use \"mode\": \"long\"".into(),
        });
    }
    let mut sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    for segment in [
        &mut sregs.cs,
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.fs,
        &mut sregs.gs,
        &mut sregs.ss,
    ] {
        segment.base = 0;
        segment.selector = 0;
    }
    sregs.cs.base = entry & !0xffff;
    sregs.cs.selector = (sregs.cs.base >> 4) as u16;
    vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    let mut regs = vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
    regs.rip = entry & 0xffff;
    regs.rflags = 2;
    regs.rsp = 0x8000;
    vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))
}

pub(super) fn flat_segments(long: bool) -> (kvm_segment, kvm_segment) {
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x8,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = kvm_segment {
        selector: 0x10,
        type_: 0x3,
        db: 1,
        l: 0,
        ..code
    };
    (code, data)
}

pub(super) fn protected_mode(vcpu: &VcpuFd, long: bool) -> Result<(), RunError> {
    let mut sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    let (code, data) = flat_segments(long);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.cr0 |= 1;
    if long {
        sregs.cr3 = LONG_MODE_TABLES;
        sregs.cr4 |= 1 << 5; // PAE
        sregs.efer |= (1 << 8) | (1 << 10); // LME, LMA
        sregs.cr0 |= 1 << 31; // PG
    }
    vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))
}

/// Page tables for long mode over all of guest memory (up to
/// `layout::MAX_MAPPED_GIB`), with 2 MiB pages: virtual address V maps
/// guest memory offset V, so the first 3 GiB are identity-mapped and the
/// rest is found past the 4 GiB hole. Accessed and dirty bits are preset,
/// so the CPU never writes the tables (they stay out of the dirty log).
pub(super) fn long_mode_tables(region: &GuestRegion, memory_bytes: u64) -> Result<(), RunError> {
    const PRESENT_WRITABLE: u64 = 0x3;
    const ACCESSED: u64 = 0x20;
    const DIRTY_HUGE: u64 = 0x40 | 0x80;
    let pml4 = LONG_MODE_TABLES;
    let pdpt = pml4 + 0x1000;
    let gib = memory_bytes
        .div_ceil(1 << 30)
        .clamp(1, layout::MAX_MAPPED_GIB);
    write_guest(
        region,
        pml4,
        &(pdpt | PRESENT_WRITABLE | ACCESSED).to_le_bytes(),
    )?;
    let mut pdpt_entries = Vec::with_capacity(gib as usize * 8);
    for i in 0..gib {
        let pd = pdpt + 0x1000 * (1 + i);
        pdpt_entries.extend_from_slice(&(pd | PRESENT_WRITABLE | ACCESSED).to_le_bytes());
        let mut entries = Vec::with_capacity(512 * 8);
        for j in 0..512u64 {
            let frame = layout::gpa_of((i << 30) + (j << 21));
            entries.extend_from_slice(
                &(frame | PRESENT_WRITABLE | ACCESSED | DIRTY_HUGE).to_le_bytes(),
            );
        }
        write_guest(region, pd, &entries)?;
    }
    write_guest(region, pdpt, &pdpt_entries)
}
