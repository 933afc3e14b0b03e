//! The floor for refvmm's start-up benchmark: the least a kvm-ioctls
//! program does to print one byte from a guest (create a VM, map 64 KiB of
//! anonymous memory, run a real-mode `out 0x3f8; hlt`).

use std::io::Write;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};

fn main() {
    let kvm = Kvm::new().expect("/dev/kvm");
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    let size = 64 << 10;
    // SAFETY: a fresh anonymous mapping, used only as guest memory below.
    let memory = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(memory, libc::MAP_FAILED);
    let code = [0xba, 0xf8, 0x03, 0xb0, b'H', 0xee, 0xf4];
    // SAFETY: the mapping is `size` bytes; the code is far shorter.
    unsafe {
        std::ptr::copy_nonoverlapping(code.as_ptr(), memory.cast::<u8>().add(0x1000), code.len())
    };
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: size as u64,
        userspace_addr: memory as u64,
    };
    // SAFETY: the mapping lives until the process exits.
    unsafe { vm.set_user_memory_region(region) }.expect("memslot");
    let mut vcpu = vm.create_vcpu(0).expect("vCPU");
    let mut sregs = vcpu.get_sregs().expect("sregs");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).expect("sregs");
    let mut regs = vcpu.get_regs().expect("regs");
    regs.rip = 0x1000;
    regs.rflags = 2;
    vcpu.set_regs(&regs).expect("regs");
    let mut out = std::io::stdout();
    loop {
        match vcpu.run().expect("KVM_RUN") {
            VcpuExit::IoOut(0x3f8, data) => {
                out.write_all(data).expect("stdout");
                out.flush().expect("stdout");
            }
            VcpuExit::Hlt => break,
            _ => {}
        }
    }
}
