#define _GNU_SOURCE
/* A C hypervisor's own VM: it creates the VM with raw ioctls, makes a
 * guest_memfd on it through mmukit, binds it as a memslot with gmem's
 * checks, and runs a real-mode guest from it. */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "mmukit.h"
#include "check.h"

#define GUEST_MEMFD_FLAG_MMAP 1u
#define GUEST_MEMFD_FLAG_INIT_SHARED 2u

int main(void) {
    /* The library's probe says what the host has; no errno is guessed at. */
    if (mmukit_host_has(MMUKIT_CAP_KVM) != 1) {
        puts("skip vm_fd_test: needs kvm");
        return 0;
    }
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    CHECK(kvm >= 0);
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    CHECK(vm >= 0);
    const uint64_t size = 1u << 20;

    /* Not a VM: refused. */
    struct mmukit_gmem *gmem = NULL;
    struct mmukit_gmem_config config = {
        sizeof(struct mmukit_gmem_config), MMUKIT_GMEM_GUEST_MEMFD, size,
        GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED, 0,
    };
    CHECK(mmukit_gmem_create_on_vm(kvm, 0, &config, &gmem) == -EINVAL);
    CHECK(mmukit_gmem_create_on_vm(-1, 0, &config, &gmem) == -EINVAL);
    int rc = mmukit_gmem_create_on_vm(vm, 0, &config, &gmem);
    if (mmukit_host_has(MMUKIT_CAP_GUEST_MEMFD_MMAP) != 1) {
        /* Refused, and nothing handed out. */
        CHECK(rc < 0 && gmem == NULL);
        printf("skip vm_fd_test: needs guest_memfd_mmap (create answered %s)\n",
               mmukit_strerror(rc));
        close(vm);
        close(kvm);
        return 0;
    }
    CHECK(rc == 0);

    /* The guest: out 0x3f8 of 'C', then hlt, at gpa 0x1000. */
    uint64_t host = 0;
    CHECK(mmukit_gmem_host_addr(gmem, &host) == 0);
    const uint8_t code[] = {0xb0, 'C', 0xba, 0xf8, 0x03, 0xee, 0xf4};
    memcpy((uint8_t *)(uintptr_t)host + 0x1000, code, sizeof code);

    /* gmem's checks: a misaligned guest address, then the real binding. */
    CHECK(mmukit_gmem_bind(gmem, 0, 0x123, size, 0, 0) == -EINVAL);
    CHECK(mmukit_gmem_bind(gmem, 0, 0, size, 0, 0) == 0);
    CHECK(mmukit_gmem_bind(gmem, 1, 0, size, 0, 0) == -EEXIST); /* overlaps slot 0 */

    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    CHECK(vcpu >= 0);
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    CHECK(run_size > 0);
    struct kvm_run *run = mmap(NULL, (size_t)run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    CHECK(run != MAP_FAILED);
    struct kvm_sregs sregs;
    CHECK(ioctl(vcpu, KVM_GET_SREGS, &sregs) == 0);
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    CHECK(ioctl(vcpu, KVM_SET_SREGS, &sregs) == 0);
    struct kvm_regs regs;
    memset(&regs, 0, sizeof regs);
    regs.rip = 0x1000;
    regs.rflags = 2;
    CHECK(ioctl(vcpu, KVM_SET_REGS, &regs) == 0);

    char out = 0;
    for (int exits = 0; exits < 100; exits++) {
        CHECK(ioctl(vcpu, KVM_RUN, 0) == 0);
        if (run->exit_reason == KVM_EXIT_IO && run->io.port == 0x3f8) {
            out = *((char *)run + run->io.data_offset);
        } else if (run->exit_reason == KVM_EXIT_HLT) {
            break;
        } else {
            fprintf(stderr, "unexpected exit %u\n", run->exit_reason);
            return 1;
        }
    }
    CHECK(out == 'C');
    CHECK(mmukit_gmem_unbind(gmem, 0) == 0);
    CHECK(mmukit_gmem_unbind(gmem, 0) == -EINVAL);
    munmap(run, (size_t)run_size);
    close(vcpu);
    mmukit_gmem_destroy(gmem);
    close(vm); /* the caller's descriptor stays the caller's */
    close(kvm);

    /* A file with no VM cannot be bound. */
    struct mmukit_gmem_config plain = {sizeof(struct mmukit_gmem_config), MMUKIT_GMEM_MEMFD, size, 3, 0};
    CHECK(mmukit_gmem_create(&plain, &gmem) == 0);
    CHECK(mmukit_gmem_bind(gmem, 0, 0, size, 0, 0) == -ENOTSUP);
    mmukit_gmem_destroy(gmem);
    puts("vm_fd_test: ok");
    return 0;
}
