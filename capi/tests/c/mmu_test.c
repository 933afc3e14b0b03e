/* A fault / split / dirty-log cycle through C, on the plain MMU and a TD. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>

#include "mmukit.h"
#include "check.h"


static void cycle(struct mmukit_tdp_mmu *mmu) {
    /* 8 MiB of guest memory on 2 MiB-aligned host frames at 4 GiB. */
    CHECK(mmukit_tdp_mmu_add_slot(mmu, 0, 0, 2048, 1u << 20) == 0);
    CHECK(mmukit_tdp_mmu_add_slot(mmu, 0, 0, 2048, 1u << 20) == -EEXIST);
    for (uint64_t gpa = 0; gpa < (8u << 20); gpa += 2u << 20)
        CHECK(mmukit_tdp_mmu_fault(mmu, gpa, true) == 0);
    CHECK(mmukit_tdp_mmu_fault(mmu, 1ull << 32, true) == -ENOENT);
    struct mmukit_mmu_stats stats;
    CHECK(mmukit_tdp_mmu_stats(mmu, &stats) == 0);
    CHECK(stats.pages_2m == 4 && stats.pages_4k == 0);
    uint64_t hpa = 0;
    uint8_t level = 0;
    CHECK(mmukit_tdp_mmu_translate(mmu, 0x5000, &hpa, &level) == 0);
    CHECK(level == 2 && hpa == (1ull << 32) + 0x5000);
    CHECK(mmukit_tdp_mmu_split(mmu, 0) == 4);
    CHECK(mmukit_tdp_mmu_stats(mmu, &stats) == 0);
    CHECK(stats.pages_2m == 0 && stats.pages_4k == 2048);
    CHECK(mmukit_tdp_mmu_enable_dirty_log(mmu, 0) == 0);
    CHECK(mmukit_tdp_mmu_fault(mmu, 0x3000, true) == 0);
    uint64_t log[32];
    CHECK(mmukit_tdp_mmu_get_dirty_log(mmu, 0, log, 1) == -EINVAL);
    CHECK(mmukit_tdp_mmu_get_dirty_log(mmu, 0, log, 32) == 0);
    CHECK(log[0] == (1u << 3));
    CHECK(mmukit_tdp_mmu_translate(mmu, 1ull << 40, &hpa, &level) == -ENOENT);
}

/* The host's page size bounds the leaves: 4 KiB pages under a 1 GiB-aligned
 * slot still give 4K leaves; 2 MiB pages give 2M leaves, not 1G. */
static void host_pages(void) {
    struct mmukit_tdp_mmu *mmu = NULL;
    CHECK(mmukit_tdp_mmu_new(4, false, &mmu) == 0);
    CHECK(mmukit_tdp_mmu_add_slot_on_host_pages(mmu, 0, 0, 1u << 18, 1u << 20, 8192) == -EINVAL);
    CHECK(mmukit_tdp_mmu_add_slot_on_host_pages(mmu, 0, 0, 1u << 18, 1u << 20, 4096) == 0);
    CHECK(mmukit_tdp_mmu_add_slot_on_host_pages(mmu, 1, 1u << 18, 1u << 18, 2u << 20, 2u << 20) == 0);
    uint64_t hpa = 0;
    uint8_t level = 0;
    CHECK(mmukit_tdp_mmu_fault(mmu, 0x7000, true) == 0);
    CHECK(mmukit_tdp_mmu_translate(mmu, 0x7000, &hpa, &level) == 0);
    CHECK(level == 1 && hpa == (1ull << 32) + 0x7000);
    CHECK(mmukit_tdp_mmu_fault(mmu, (1ull << 30) + 0x7000, true) == 0);
    CHECK(mmukit_tdp_mmu_translate(mmu, (1ull << 30) + 0x7000, &hpa, &level) == 0);
    CHECK(level == 2 && hpa == (2ull << 32) + 0x7000);
    mmukit_tdp_mmu_destroy(mmu);
}

int main(void) {
    struct mmukit_tdp_mmu *mmu = NULL;
    CHECK(mmukit_tdp_mmu_new(3, true, &mmu) == -EINVAL);
    CHECK(mmukit_tdp_mmu_new(4, true, &mmu) == 0);
    cycle(mmu);
    mmukit_tdp_mmu_destroy(mmu);
    host_pages();

    struct mmukit_tdx *tdx = NULL;
    CHECK(mmukit_tdx_new(4, 7, &tdx) == -EINVAL);
    CHECK(mmukit_tdx_new(4, MMUKIT_PAMT_ON_INSTALL, &tdx) == 0);
    cycle(mmukit_tdx_mmu(tdx));
    uint64_t seamcalls = 0, pamt_pages = 0;
    CHECK(mmukit_tdx_counts(tdx, &seamcalls, &pamt_pages) == 0);
    CHECK(seamcalls > 0 && pamt_pages > 0);
    mmukit_tdx_destroy(tdx);

    CHECK(mmukit_tdp_mmu_fault(NULL, 0, true) == -EINVAL);
    CHECK(mmukit_tdx_mmu(NULL) == NULL);
    mmukit_tdp_mmu_destroy(NULL);
    mmukit_tdx_destroy(NULL);
    puts("mmu_test: ok");
    return 0;
}
