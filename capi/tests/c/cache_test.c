/* The cache rules through C, with a C page allocator that counts calls. */
#include <assert.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "mmukit.h"
#include "check.h"

struct counting {
    unsigned gets, frees, limit;
};

static uint64_t counting_get(void *opaque) {
    struct counting *c = opaque;
    if (c->limit && c->gets >= c->limit)
        return 0;
    void *page = aligned_alloc(4096, 4096);
    if (!page)
        return 0;
    c->gets++;
    return (uint64_t)(uintptr_t)page;
}

static void counting_free(void *opaque, uint64_t page) {
    struct counting *c = opaque;
    c->frees++;
    free((void *)(uintptr_t)page);
}


int main(void) {
    struct counting counts = {0, 0, 0};
    struct mmukit_page_allocator allocator = {&counts, counting_get, counting_free};
    struct mmukit_cache_config config = {sizeof(struct mmukit_cache_config), 0, false, 0, &allocator};
    struct mmukit_cache *cache = NULL;

    CHECK(mmukit_cache_new(&config, &cache) == 0);
    CHECK(mmukit_cache_topup(cache, 5) == 0);
    CHECK(counts.gets == 40);
    CHECK(mmukit_cache_nr_free(cache) == 40);
    CHECK(mmukit_cache_topup(cache, 5) == 0);
    CHECK(counts.gets == 40); /* enough cached: no call */

    uint64_t page = 0;
    CHECK(mmukit_cache_alloc(cache, &page) == 0);
    CHECK(page != 0 && page % 4096 == 0);
    CHECK(counts.gets == 40); /* alloc never calls the allocator */
    counting_free(&counts, page); /* the page is ours now */

    mmukit_cache_destroy(cache);
    CHECK(counts.frees == 40); /* 39 cached pages plus ours */

    /* init_value fills every word; with zero too it is refused. */
    struct counting fill_counts = {0, 0, 0};
    struct mmukit_page_allocator fill_allocator = {&fill_counts, counting_get, counting_free};
    struct mmukit_cache_config fill = {sizeof(struct mmukit_cache_config), 8, false, 0x8000000000000000ull, &fill_allocator};
    CHECK(mmukit_cache_new(&fill, &cache) == 0);
    CHECK(mmukit_cache_topup(cache, 1) == 0);
    CHECK(fill_counts.gets == 8);
    CHECK(mmukit_cache_alloc(cache, &page) == 0);
    const uint64_t *words = (const uint64_t *)(uintptr_t)page;
    for (int i = 0; i < 512; i++)
        CHECK(words[i] == 0x8000000000000000ull);
    counting_free(&fill_counts, page);
    mmukit_cache_destroy(cache);
    CHECK(fill_counts.frees == fill_counts.gets);

    struct mmukit_cache_config both = {sizeof(struct mmukit_cache_config), 0, true, 1, NULL};
    CHECK(mmukit_cache_new(&both, &cache) == 0);
    CHECK(mmukit_cache_topup(cache, 1) == -EINVAL);
    mmukit_cache_destroy(cache);

    /* A failing allocator: -ENOMEM when min is not met; what it got stays. */
    struct counting poor = {0, 0, 3};
    struct mmukit_page_allocator poor_allocator = {&poor, counting_get, counting_free};
    struct mmukit_cache_config poor_config = {sizeof(struct mmukit_cache_config), 0, true, 0, &poor_allocator};
    CHECK(mmukit_cache_new(&poor_config, &cache) == 0);
    CHECK(mmukit_cache_topup(cache, 5) == -ENOMEM);
    CHECK(mmukit_cache_nr_free(cache) == 3);
    CHECK(mmukit_cache_topup(cache, 2) == 0);
    CHECK(mmukit_cache_free_all(cache) == 0);
    CHECK(poor.frees == 3);
    mmukit_cache_destroy(cache);

    /* The built-in allocator: the cache lends its pages; they go back with
     * mmukit_cache_free_page (or with the cache), and a loop of 50000
     * allocations and frees does not grow the process. */
    struct mmukit_cache_config builtin = {sizeof(struct mmukit_cache_config), 0, true, 0, NULL};
    CHECK(mmukit_cache_new(&builtin, &cache) == 0);
    CHECK(mmukit_cache_topup(cache, 1) == 0);
    CHECK(mmukit_cache_alloc(cache, &page) == 0);
    CHECK(mmukit_cache_pages_lent(cache) == 1);
    memset((void *)(uintptr_t)page, 0xab, 4096);
    CHECK(mmukit_cache_free_page(cache, page) == 0);
    CHECK(mmukit_cache_free_page(cache, page) == -EINVAL);
    CHECK(mmukit_cache_free_page(cache, 0x1000) == -EINVAL);
    CHECK(mmukit_cache_pages_lent(cache) == 0);
    struct rusage before, after;
    getrusage(RUSAGE_SELF, &before);
    for (int i = 0; i < 50000; i++) {
        CHECK(mmukit_cache_topup(cache, 1) == 0);
        CHECK(mmukit_cache_alloc(cache, &page) == 0);
        *(volatile uint64_t *)(uintptr_t)page = (uint64_t)i;
        CHECK(mmukit_cache_free_page(cache, page) == 0);
    }
    getrusage(RUSAGE_SELF, &after);
    CHECK(after.ru_maxrss - before.ru_maxrss < 16 * 1024); /* KiB */
    /* Pages still lent go with the cache. */
    CHECK(mmukit_cache_alloc(cache, &page) == 0);
    CHECK(mmukit_cache_pages_lent(cache) == 1);
    mmukit_cache_destroy(cache);
    /* A page of the caller's own allocator is not the cache's to free. */
    struct mmukit_page_allocator own = {&counts, counting_get, counting_free};
    struct mmukit_cache_config own_config = {sizeof(struct mmukit_cache_config), 0, false, 0, &own};
    CHECK(mmukit_cache_new(&own_config, &cache) == 0);
    CHECK(mmukit_cache_topup(cache, 1) == 0);
    CHECK(mmukit_cache_alloc(cache, &page) == 0);
    CHECK(mmukit_cache_free_page(cache, page) == -EINVAL);
    CHECK(mmukit_cache_pages_lent(cache) == 0);
    counting_free(&counts, page);
    mmukit_cache_destroy(cache);

    /* NULL and bad arguments. */
    CHECK(mmukit_cache_free_page(NULL, 0) == -EINVAL);
    CHECK(mmukit_cache_pages_lent(NULL) == 0);
    CHECK(mmukit_cache_new(NULL, &cache) == -EINVAL);
    CHECK(mmukit_cache_new(&config, NULL) == -EINVAL);
    CHECK(mmukit_cache_topup(NULL, 1) == -EINVAL);
    CHECK(mmukit_cache_alloc(NULL, &page) == -EINVAL);
    CHECK(mmukit_cache_nr_free(NULL) == 0);
    CHECK(mmukit_cache_free_all(NULL) == -EINVAL);
    mmukit_cache_destroy(NULL);
    struct mmukit_page_allocator half = {NULL, counting_get, NULL};
    struct mmukit_cache_config half_config = {sizeof(struct mmukit_cache_config), 0, false, 0, &half};
    CHECK(mmukit_cache_new(&half_config, &cache) == -EINVAL);
    CHECK(strlen(mmukit_strerror(-EINVAL)) > 0);

    puts("cache_test: ok");
    return 0;
}
