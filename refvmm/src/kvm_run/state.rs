//! A KVM vCPU's state as a migration carries it: registers, special
//! registers, FPU, XSAVE, XCRs, the MSRs KVM lists, pending events and the
//! MP state, each as the raw `kvm_bindings` structure in one state section
//! (`kvm/vcpuN/...`). The LAPIC travels only where KVM emulates one (an
//! in-kernel irqchip; refvmm's VMs have none, as their guests poll).

use kvm_bindings::{
    Msrs, kvm_fpu, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave,
};
use kvm_ioctls::{Kvm, VcpuFd};
use zerocopy::{FromBytes, IntoBytes};

use crate::engine::{RunError, kvm_err};

/// The sections of vCPU `id`, named `kvm/vcpu{id}/{part}`.
pub fn save(kvm: &Kvm, vcpu: &mut VcpuFd, id: u64) -> Result<Vec<(String, Vec<u8>)>, RunError> {
    // An exit on a port write completes on the next KVM_RUN: run it with
    // an immediate exit first, so that the state saved is after it.
    vcpu.set_kvm_immediate_exit(1);
    let _ = vcpu.run();
    vcpu.set_kvm_immediate_exit(0);
    let name = |part: &str| format!("kvm/vcpu{id}/{part}");
    let mut sections = vec![
        (
            name("regs"),
            vcpu.get_regs()
                .map_err(kvm_err("KVM_GET_REGS"))?
                .as_bytes()
                .to_vec(),
        ),
        (
            name("sregs"),
            vcpu.get_sregs()
                .map_err(kvm_err("KVM_GET_SREGS"))?
                .as_bytes()
                .to_vec(),
        ),
        (
            name("fpu"),
            fpu_bytes(&vcpu.get_fpu().map_err(kvm_err("KVM_GET_FPU"))?),
        ),
        (
            name("events"),
            vcpu.get_vcpu_events()
                .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?
                .as_bytes()
                .to_vec(),
        ),
        (
            name("mp_state"),
            vcpu.get_mp_state()
                .map_err(kvm_err("KVM_GET_MP_STATE"))?
                .as_bytes()
                .to_vec(),
        ),
    ];
    // XSAVE and XCRs exist where the CPU KVM shows has XSAVE.
    if let Ok(xsave) = vcpu.get_xsave() {
        sections.push((name("xsave"), xsave.region.as_bytes().to_vec()));
    }
    if let Ok(xcrs) = vcpu.get_xcrs() {
        sections.push((name("xcrs"), xcrs.as_bytes().to_vec()));
    }
    sections.push((name("msrs"), save_msrs(kvm, vcpu)?));
    Ok(sections)
}

/// The MSRs KVM lists (`KVM_GET_MSR_INDEX_LIST`) that this vCPU reads, as
/// (index, value) pairs.
fn save_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u8>, RunError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
    let mut bytes = Vec::new();
    for &index in list.as_slice() {
        // One at a time: KVM stops a batch at the first MSR it cannot read.
        let entry = kvm_msr_entry {
            index,
            ..Default::default()
        };
        let mut msrs = Msrs::from_entries(&[entry]).expect("one entry fits");
        if vcpu.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))? == 1 {
            let entry = msrs.as_slice()[0];
            bytes.extend_from_slice(&entry.index.to_le_bytes());
            bytes.extend_from_slice(&entry.data.to_le_bytes());
        }
    }
    Ok(bytes)
}

/// The bytes of `fpu` (kvm-bindings gives `kvm_fpu` no byte view).
fn fpu_bytes(fpu: &kvm_fpu) -> Vec<u8> {
    // SAFETY: `kvm_fpu` is a `repr(C)` struct of integers and integer
    // arrays whose fields leave no padding, so all its bytes are
    // initialized; the slice lives as long as the borrow.
    unsafe {
        std::slice::from_raw_parts(
            (fpu as *const kvm_fpu).cast::<u8>(),
            std::mem::size_of::<kvm_fpu>(),
        )
    }
    .to_vec()
}

/// A `kvm_fpu` from exactly its size in bytes.
fn fpu_from(bytes: &[u8]) -> kvm_fpu {
    assert_eq!(bytes.len(), std::mem::size_of::<kvm_fpu>());
    // SAFETY: the length is the struct's (asserted); every bit pattern is a
    // valid `kvm_fpu` (integers only); the read may be unaligned.
    unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<kvm_fpu>()) }
}

/// Loads vCPU `id`'s sections into `vcpu`; what is missing or malformed is
/// named.
pub fn restore(vcpu: &VcpuFd, id: u64, state: &[(String, Vec<u8>)]) -> Result<(), String> {
    let find = |part: &str| {
        let name = format!("kvm/vcpu{id}/{part}");
        state
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, bytes)| (name, bytes.as_slice()))
    };
    let need = |part: &str| find(part).ok_or_else(|| format!("kvm/vcpu{id}/{part} is missing"));
    let parse = |name: &str, what: &[u8], size: usize| {
        if what.len() != size {
            Err(format!("{name}: {} bytes, not {size}", what.len()))
        } else {
            Ok(())
        }
    };
    let set = |what: &str, result: Result<(), kvm_ioctls::Error>| {
        result.map_err(|err| format!("{what} of vCPU {id}: {err}"))
    };
    let (name, bytes) = need("sregs")?;
    let sregs = kvm_sregs::read_from_bytes(bytes).map_err(|_| format!("{name}: malformed"))?;
    set("KVM_SET_SREGS", vcpu.set_sregs(&sregs))?;
    let (name, bytes) = need("regs")?;
    let regs = kvm_regs::read_from_bytes(bytes).map_err(|_| format!("{name}: malformed"))?;
    set("KVM_SET_REGS", vcpu.set_regs(&regs))?;
    let (name, bytes) = need("fpu")?;
    parse(&name, bytes, std::mem::size_of::<kvm_fpu>())?;
    let fpu = fpu_from(bytes);
    set("KVM_SET_FPU", vcpu.set_fpu(&fpu))?;
    if let Some((name, bytes)) = find("xcrs") {
        let xcrs = kvm_xcrs::read_from_bytes(bytes).map_err(|_| format!("{name}: malformed"))?;
        set("KVM_SET_XCRS", vcpu.set_xcrs(&xcrs))?;
    }
    if let Some((name, bytes)) = find("xsave") {
        parse(&name, bytes, 4096)?;
        let mut xsave = kvm_xsave::default();
        xsave.region.as_mut_bytes().copy_from_slice(bytes);
        // SAFETY: a 4 KiB legacy XSAVE area, the size KVM_SET_XSAVE reads.
        set("KVM_SET_XSAVE", unsafe { vcpu.set_xsave(&xsave) })?;
    }
    let (name, bytes) = need("msrs")?;
    if bytes.len() % 12 != 0 {
        return Err(format!("{name}: not whole (index, value) pairs"));
    }
    let entries: Vec<kvm_msr_entry> = bytes
        .chunks_exact(12)
        .map(|pair| kvm_msr_entry {
            index: u32::from_le_bytes(pair[..4].try_into().expect("4 bytes")),
            data: u64::from_le_bytes(pair[4..].try_into().expect("8 bytes")),
            ..Default::default()
        })
        .collect();
    for entry in entries {
        let msrs = Msrs::from_entries(&[entry]).expect("one entry fits");
        // An MSR the destination's KVM will not set is left at its reset
        // value, as QEMU does for MSRs the other side does not know.
        if vcpu
            .set_msrs(&msrs)
            .map_err(|err| format!("KVM_SET_MSRS: {err}"))?
            != 1
        {
            tracing::debug!(index = entry.index, "an MSR this KVM does not set");
        }
    }
    let (name, bytes) = need("events")?;
    let events =
        kvm_vcpu_events::read_from_bytes(bytes).map_err(|_| format!("{name}: malformed"))?;
    set("KVM_SET_VCPU_EVENTS", vcpu.set_vcpu_events(&events))?;
    let (name, bytes) = need("mp_state")?;
    let mp_state =
        kvm_mp_state::read_from_bytes(bytes).map_err(|_| format!("{name}: malformed"))?;
    set("KVM_SET_MP_STATE", vcpu.set_mp_state(mp_state))?;
    Ok(())
}
