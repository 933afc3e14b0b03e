/*
 * How a C hypervisor uses mmukit: its own page allocator feeds the memory
 * cache (topped up before its MMU lock, popped under it), and the software
 * TDP MMU runs a fault / dirty-log / split cycle.
 *
 * Build (after `cargo build -p mmukit-capi`):
 *        cc -std=c11 -I include capi/examples/hypervisor.c target/debug/libmmukit.a \
 *        -lpthread -ldl -lm -lrt -lutil
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>

#include "mmukit.h"

/* The hypervisor's allocator: here, a fixed arena of 64 pages. */
struct arena {
    unsigned char *base;
    unsigned used;
    unsigned char taken[64];
};

static uint64_t arena_get(void *opaque) {
    struct arena *a = opaque;
    for (unsigned i = 0; i < 64; i++) {
        if (!a->taken[i]) {
            a->taken[i] = 1;
            a->used++;
            return (uint64_t)(uintptr_t)(a->base + (size_t)i * 4096);
        }
    }
    return 0; /* out of pages */
}

static void arena_free(void *opaque, uint64_t page) {
    struct arena *a = opaque;
    unsigned i = (unsigned)((page - (uint64_t)(uintptr_t)a->base) / 4096);
    a->taken[i] = 0;
    a->used--;
}

int main(void) {
    struct arena arena = {0};
    arena.base = aligned_alloc(4096, 64 * 4096);
    if (!arena.base)
        return 1;
    struct mmukit_page_allocator allocator = {&arena, arena_get, arena_free};
    struct mmukit_cache_config config = {sizeof(struct mmukit_cache_config), 16, false, 0x8000000000000000ull, &allocator};
    struct mmukit_cache *cache;
    int err = mmukit_cache_new(&config, &cache);
    if (err) {
        fprintf(stderr, "cache: %s\n", mmukit_strerror(err));
        return 1;
    }
    /* Before taking the MMU lock: make sure 5 page-table pages are there. */
    err = mmukit_cache_topup(cache, 5);
    printf("topup: %s, %u pages cached, arena uses %u\n", mmukit_strerror(err),
           mmukit_cache_nr_free(cache), arena.used);
    /* Under the lock: pop one; no allocation happens here. */
    uint64_t table;
    err = mmukit_cache_alloc(cache, &table);
    printf("alloc: %s, first word %#llx\n", mmukit_strerror(err),
           (unsigned long long)((uint64_t *)(uintptr_t)table)[0]);
    arena_free(&arena, table); /* the page was ours */
    mmukit_cache_destroy(cache);
    printf("after destroy the arena uses %u pages\n", arena.used);

    /* The software MMU: 16 MiB of guest memory, faulted, logged, split. */
    struct mmukit_tdp_mmu *mmu;
    if (mmukit_tdp_mmu_new(4, true, &mmu))
        return 1;
    mmukit_tdp_mmu_add_slot(mmu, 0, 0, 4096, 1u << 20);
    for (uint64_t gpa = 0; gpa < (16u << 20); gpa += 4096)
        mmukit_tdp_mmu_fault(mmu, gpa, true);
    struct mmukit_mmu_stats stats;
    mmukit_tdp_mmu_stats(mmu, &stats);
    printf("faulted: %llu 2M leaves\n", (unsigned long long)stats.pages_2m);
    mmukit_tdp_mmu_enable_dirty_log(mmu, 0);
    mmukit_tdp_mmu_stats(mmu, &stats);
    printf("dirty logging on: %llu 4K leaves, %llu 2M\n", (unsigned long long)stats.pages_4k,
           (unsigned long long)stats.pages_2m);
    mmukit_tdp_mmu_fault(mmu, 0x7000, true);
    uint64_t log[64];
    mmukit_tdp_mmu_get_dirty_log(mmu, 0, log, 64);
    printf("dirty log word 0: %#llx\n", (unsigned long long)log[0]);
    mmukit_tdp_mmu_destroy(mmu);
    free(arena.base);
    return arena.used == 0 && log[0] == (1u << 7) ? 0 : 1;
}
