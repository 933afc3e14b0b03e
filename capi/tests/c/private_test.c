/* Private memory through C: memory attributes, memory-fault exits, frames
 * from a guest memory file, on a software-protected VM and on a TD. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>

#include "mmukit.h"
#include "check.h"

#define HOST_BASE (1ull << 32) /* shared host frames: numbers, never touched */

static struct mmukit_gmem *private_file(void) {
    struct mmukit_gmem_config config = {
        .struct_size = sizeof(struct mmukit_gmem_config), .backend = MMUKIT_GMEM_MEMFD,
        .size = 4u << 20, .flags = 1 /* MMAP */,
        .huge_page_size_log2 = 0,
    };
    struct mmukit_gmem *file = NULL;
    CHECK(mmukit_gmem_create(&config, &file) == 0);
    return file;
}

static void software_protected(void) {
    struct mmukit_tdp_mmu *mmu = NULL;
    CHECK(mmukit_tdp_mmu_new_vm(4, true, 7, &mmu) == -EINVAL);
    CHECK(mmukit_tdp_mmu_new_vm(4, true, MMUKIT_VM_SW_PROTECTED, &mmu) == 0);
    struct mmukit_gmem *file = private_file();
    /* 4 MiB at gpa 0; a slot past the file's end is refused. */
    CHECK(mmukit_tdp_mmu_add_private_slot(mmu, 1, 1024, 2048, HOST_BASE >> 12, file, 0)
          == -EINVAL);
    CHECK(mmukit_tdp_mmu_add_private_slot(mmu, 0, 0, 1024, HOST_BASE >> 12, file, 0) == 0);

    uint64_t hpa = 0;
    struct mmukit_memory_fault fault = {0};
    /* Shared at first: a private access exits with a memory fault. */
    CHECK(mmukit_tdp_mmu_access(mmu, 0x1008, true, MMUKIT_ACCESS_PRIVATE, &hpa, &fault)
          == -EFAULT);
    /* The faulting page, as kvm_mmu_prepare_memory_fault_exit() reports it. */
    CHECK(fault.flags == MMUKIT_MEMORY_EXIT_FLAG_PRIVATE && fault.gpa == 0x1000
          && fault.size == 4096);
    CHECK(mmukit_tdp_mmu_access(mmu, 0x1000, true, MMUKIT_ACCESS_AUTO, &hpa, NULL) == 0);
    CHECK(hpa == HOST_BASE + 0x1000);

    /* Private: the frame comes from the file, and a shared access exits. */
    CHECK(mmukit_tdp_mmu_set_memory_attributes(mmu, 0, 16, 1u << 5) == -EINVAL);
    CHECK(mmukit_tdp_mmu_set_memory_attributes(mmu, 0, 0, MMUKIT_MEMORY_ATTRIBUTE_PRIVATE)
          == -EINVAL);
    CHECK(mmukit_tdp_mmu_set_memory_attributes(mmu, 0, 16, MMUKIT_MEMORY_ATTRIBUTE_PRIVATE)
          == 0);
    CHECK(mmukit_tdp_mmu_access(mmu, 0x1000, false, MMUKIT_ACCESS_SHARED, &hpa, &fault)
          == -EFAULT);
    CHECK(fault.flags == 0 && fault.gpa == 0x1000);
    CHECK(mmukit_tdp_mmu_access(mmu, 0x1000, true, MMUKIT_ACCESS_AUTO, &hpa, NULL) == 0);
    CHECK(hpa != HOST_BASE + 0x1000 && hpa % 4096 == 0);
    uint64_t private_hpa = hpa;
    /* The frame is the file's memory: a write there reads back. */
    *(volatile uint64_t *)(uintptr_t)private_hpa = 0x5eed;
    CHECK(*(volatile uint64_t *)(uintptr_t)private_hpa == 0x5eed);

    /* Back to shared. */
    CHECK(mmukit_tdp_mmu_set_memory_attributes(mmu, 1, 1, 0) == 0);
    CHECK(mmukit_tdp_mmu_access(mmu, 0x1000, false, MMUKIT_ACCESS_AUTO, &hpa, NULL) == 0);
    CHECK(hpa == HOST_BASE + 0x1000);
    CHECK(mmukit_tdp_mmu_access(mmu, 0x1000, false, 9, &hpa, NULL) == -EINVAL);
    CHECK(mmukit_tdp_mmu_access(mmu, 0x1000, false, MMUKIT_ACCESS_AUTO, NULL, NULL) == -EINVAL);
    mmukit_tdp_mmu_destroy(mmu);
    mmukit_gmem_destroy(file);

    /* A default VM supports no attribute bits: private is -EINVAL, and
       attributes 0 pass the mask check (attributes & ~supported) and change
       nothing, as kvm_vm_ioctl_set_mem_attributes() has it. */
    CHECK(mmukit_tdp_mmu_new(4, true, &mmu) == 0);
    CHECK(mmukit_tdp_mmu_set_memory_attributes(mmu, 0, 1, MMUKIT_MEMORY_ATTRIBUTE_PRIVATE)
          == -EINVAL);
    CHECK(mmukit_tdp_mmu_set_memory_attributes(mmu, 0, 16, 0) == 0);
    mmukit_tdp_mmu_destroy(mmu);
}

static void td(void) {
    const uint64_t shared_bit = 1ull << 47;
    struct mmukit_tdx *tdx = NULL;
    CHECK(mmukit_tdx_new_private(4, MMUKIT_PAMT_ON_INSTALL, &tdx) == 0);
    struct mmukit_tdp_mmu *mmu = mmukit_tdx_mmu(tdx);
    struct mmukit_gmem *file = private_file();
    CHECK(mmukit_tdp_mmu_add_private_slot(mmu, 0, 0, 1024, HOST_BASE >> 12, file, 0) == 0);
    CHECK(mmukit_tdp_mmu_set_memory_attributes(mmu, 0, 1024, MMUKIT_MEMORY_ATTRIBUTE_PRIVATE)
          == 0);
    uint64_t hpa = 0;
    struct mmukit_memory_fault fault = {0};
    /* Without the shared bit: private, through the mirror and the S-EPT. */
    CHECK(mmukit_tdp_mmu_access(mmu, 0x2000, true, MMUKIT_ACCESS_AUTO, &hpa, NULL) == 0);
    CHECK(hpa != HOST_BASE + 0x2000);
    /* With it: a shared access to private memory exits. */
    CHECK(mmukit_tdp_mmu_access(mmu, shared_bit | 0x2000, true, MMUKIT_ACCESS_AUTO, &hpa,
                                &fault) == -EFAULT);
    /* The exit names the page without the shared bit (the fault's gfn has
       it stripped before kvm_mmu_prepare_memory_fault_exit()). */
    CHECK(mmukit_tdp_mmu_access(mmu, shared_bit | 0x2abc, true, MMUKIT_ACCESS_AUTO, &hpa,
                                &fault) == -EFAULT);
    CHECK(fault.flags == 0 && fault.gpa == 0x2000 && fault.size == 4096);
    /* The guest makes the page shared (MapGPA): the VMM converts it. */
    CHECK(mmukit_tdp_mmu_set_memory_attributes(mmu, 2, 1, 0) == 0);
    CHECK(mmukit_tdp_mmu_access(mmu, shared_bit | 0x2000, true, MMUKIT_ACCESS_AUTO, &hpa,
                                NULL) == 0);
    CHECK(hpa == HOST_BASE + 0x2000);
    CHECK(mmukit_tdp_mmu_access(mmu, 0x2000, true, MMUKIT_ACCESS_AUTO, &hpa, &fault)
          == -EFAULT);
    CHECK(fault.flags == MMUKIT_MEMORY_EXIT_FLAG_PRIVATE);
    uint64_t seamcalls = 0, pamt_pages = 0;
    CHECK(mmukit_tdx_counts(tdx, &seamcalls, &pamt_pages) == 0);
    CHECK(seamcalls > 0 && pamt_pages > 0);
    mmukit_tdx_destroy(tdx);
    mmukit_gmem_destroy(file);
}

int main(void) {
    software_protected();
    td();
    puts("private_test: ok");
    return 0;
}
