/* Every C entry point with NULL, misaligned and huge arguments. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mmukit.h"
#include "check.h"


int main(void) {
    _Alignas(8) unsigned char buffer[64];
    void *misaligned = buffer + 1;

    /* The cache. */
    struct mmukit_cache_config config = {sizeof(struct mmukit_cache_config), 0, false, 0, NULL};
    struct mmukit_cache *cache = NULL;
    CHECK(mmukit_cache_new(&config, (struct mmukit_cache **)misaligned) == -EINVAL);
    CHECK(mmukit_cache_new(&config, &cache) == 0);
    CHECK(mmukit_cache_topup(cache, UINT32_MAX) == -EINVAL); /* above the capacity */
    CHECK(mmukit_cache_nr_free(cache) == 0);                 /* nothing taken */
    CHECK(mmukit_cache_alloc(cache, NULL) == -EINVAL);
    CHECK(mmukit_cache_alloc(cache, (uint64_t *)misaligned) == -EINVAL);
    uint64_t page;
    CHECK(mmukit_cache_alloc(cache, &page) == -ENOMEM); /* empty: no allocation */
    struct mmukit_cache_config huge = {sizeof(struct mmukit_cache_config), UINT32_MAX, false, 0, NULL};
    struct mmukit_cache *big = NULL;
    CHECK(mmukit_cache_new(&huge, &big) == 0);
    mmukit_cache_destroy(big);
    mmukit_cache_destroy(cache);

    /* Config structs that grow: an older, smaller struct is refused; a
     * newer, bigger one is taken when what this library does not know is
     * zero, and refused (-E2BIG) otherwise. */
    struct grown {
        struct mmukit_cache_config config;
        uint64_t future_field;
    } grown;
    memset(&grown, 0, sizeof grown);
    grown.config = config;
    grown.config.struct_size = 4;
    CHECK(mmukit_cache_new(&grown.config, &big) == -EINVAL);
    grown.config.struct_size = sizeof grown;
    CHECK(mmukit_cache_new(&grown.config, &big) == 0);
    mmukit_cache_destroy(big);
    grown.future_field = 1;
    CHECK(mmukit_cache_new(&grown.config, &big) == -E2BIG);
    CHECK(strlen(mmukit_strerror(-E2BIG)) > 0);

    /* The version, as the header says. */
    char expected[32];
    snprintf(expected, sizeof expected, "%d.%d.%d", MMUKIT_VERSION_MAJOR, MMUKIT_VERSION_MINOR,
             MMUKIT_VERSION_PATCH);
    CHECK(strcmp(mmukit_version(), expected) == 0);

    /* Guest memory. */
    struct mmukit_gmem *gmem = NULL;
    struct mmukit_gmem_config enormous = {sizeof(struct mmukit_gmem_config), MMUKIT_GMEM_MEMFD, UINT64_MAX & ~4095ull, 3, 0};
    CHECK(mmukit_gmem_create(&enormous, &gmem) < 0);
    struct mmukit_gmem_config bad_log2 = {sizeof(struct mmukit_gmem_config), MMUKIT_GMEM_HUGETLB, 2u << 20, 3, 63};
    CHECK(mmukit_gmem_create(&bad_log2, &gmem) == -EINVAL);
    struct mmukit_gmem_config config_gmem = {sizeof(struct mmukit_gmem_config), MMUKIT_GMEM_MEMFD, 1u << 20, 3, 0};
    CHECK(mmukit_gmem_create(&config_gmem, &gmem) == 0);
    CHECK(mmukit_gmem_fallocate(gmem, FALLOC_FL_KEEP_SIZE, UINT64_MAX & ~4095ull, 4096) == -EINVAL);
    CHECK(mmukit_gmem_fallocate(gmem, FALLOC_FL_KEEP_SIZE, 0, UINT64_MAX & ~4095ull) == -EINVAL);
    CHECK(mmukit_gmem_fallocate(gmem, -1, 0, 4096) == -EOPNOTSUPP);
    CHECK(mmukit_gmem_convert(gmem, 0, UINT64_MAX & ~4095ull, true) == -EINVAL);
    CHECK(mmukit_gmem_host_addr(gmem, (uint64_t *)misaligned) == -EINVAL);
    CHECK(mmukit_gmem_prefault(gmem, 4) == 0);
    mmukit_gmem_destroy(gmem);

    /* The MMU. */
    struct mmukit_tdp_mmu *mmu = NULL;
    CHECK(mmukit_tdp_mmu_new(4, true, (struct mmukit_tdp_mmu **)misaligned) == -EINVAL);
    CHECK(mmukit_tdp_mmu_new(4, true, &mmu) == 0);
    CHECK(mmukit_tdp_mmu_add_slot(mmu, 0, UINT64_MAX, 16, 0) == -EINVAL);
    CHECK(mmukit_tdp_mmu_add_slot(mmu, 0, 0, 0, 0) == -EINVAL);
    CHECK(mmukit_tdp_mmu_add_slot(mmu, 0, 0, 512, 1u << 20) == 0);
    CHECK(mmukit_tdp_mmu_fault(mmu, UINT64_MAX, true) < 0);
    uint64_t hpa;
    uint8_t level;
    CHECK(mmukit_tdp_mmu_translate(mmu, 0, (uint64_t *)misaligned, &level) == -EINVAL);
    CHECK(mmukit_tdp_mmu_translate(mmu, 0, &hpa, NULL) == -EINVAL);
    CHECK(mmukit_tdp_mmu_get_dirty_log(mmu, 0, NULL, 8) == -EINVAL);
    CHECK(mmukit_tdp_mmu_get_dirty_log(mmu, 7, (uint64_t *)buffer, 8) == -ENOENT);
    CHECK(mmukit_tdp_mmu_enable_dirty_log(mmu, UINT32_MAX) < 0);
    CHECK(mmukit_tdp_mmu_split(mmu, UINT32_MAX) == -ENOENT);
    CHECK(mmukit_tdp_mmu_stats(mmu, (struct mmukit_mmu_stats *)misaligned) == -EINVAL);
    mmukit_tdp_mmu_destroy(mmu);
    struct mmukit_tdx *tdx = NULL;
    CHECK(mmukit_tdx_new(9, 0, &tdx) == -EINVAL);
    CHECK(mmukit_tdx_counts(NULL, &hpa, &hpa) == -EINVAL);

    puts("bad_input_test: ok");
    return 0;
}
