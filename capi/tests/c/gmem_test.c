/* Guest memory through C: the guest_memfd error codes. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mmukit.h"
#include "check.h"


#define KEEP FALLOC_FL_KEEP_SIZE
#define PUNCH (FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE)

int main(void) {
    const uint64_t page = 4096, total = 4 * 4096;
    struct mmukit_gmem *gmem = NULL;
    struct mmukit_gmem_config bad = {sizeof(struct mmukit_gmem_config), MMUKIT_GMEM_MEMFD, 4095, 3, 0};
    CHECK(mmukit_gmem_create(&bad, &gmem) == -EINVAL);
    struct mmukit_gmem_config config = {sizeof(struct mmukit_gmem_config), MMUKIT_GMEM_MEMFD, total, 3, 0};
    CHECK(mmukit_gmem_create(&config, &gmem) == 0);
    CHECK(mmukit_gmem_fd(gmem) >= 0);

    /* The kernel selftest's fallocate table. */
    CHECK(mmukit_gmem_fallocate(gmem, KEEP, 0, total) == 0);
    CHECK(mmukit_gmem_fallocate(gmem, KEEP, page - 1, page) == -EINVAL);
    CHECK(mmukit_gmem_fallocate(gmem, KEEP, total, page) == -EINVAL);
    CHECK(mmukit_gmem_fallocate(gmem, KEEP, total + page, page) == -EINVAL);
    CHECK(mmukit_gmem_fallocate(gmem, PUNCH, total, page) == 0);
    CHECK(mmukit_gmem_fallocate(gmem, PUNCH, total + page, page) == 0);
    CHECK(mmukit_gmem_fallocate(gmem, PUNCH, page, page - 1) == -EINVAL);
    CHECK(mmukit_gmem_fallocate(gmem, PUNCH, page, page) == 0);
    CHECK(mmukit_gmem_fallocate(gmem, KEEP, page, page) == 0);
    CHECK(mmukit_gmem_fallocate(gmem, 0, 0, page) == -EOPNOTSUPP);
    CHECK(mmukit_gmem_fallocate(gmem, PUNCH, 1, page) == -EINVAL);

    /* The host view: write, punch, read back zero. */
    uint64_t addr = 0;
    CHECK(mmukit_gmem_host_addr(gmem, &addr) == 0);
    memset((void *)(uintptr_t)addr, 0xaa, total);
    CHECK(mmukit_gmem_fallocate(gmem, PUNCH, 0, page) == 0);
    CHECK(((unsigned char *)(uintptr_t)addr)[0] == 0);
    CHECK(((unsigned char *)(uintptr_t)addr)[page] == 0xaa);
    CHECK(mmukit_gmem_convert(gmem, page, page, true) == 0);
    CHECK(mmukit_gmem_convert(gmem, page, page, false) == 0);
    CHECK(((unsigned char *)(uintptr_t)addr)[page] == 0xaa);
    CHECK(mmukit_gmem_convert(gmem, 1, page, true) == -EINVAL);
    CHECK(mmukit_gmem_prefault(gmem, 2) == 0);
    CHECK(mmukit_gmem_prefault(gmem, 0) == -EINVAL);
    mmukit_gmem_destroy(gmem);

    /* Without MMAP there is no host view. */
    struct mmukit_gmem_config unmappable = {sizeof(struct mmukit_gmem_config), MMUKIT_GMEM_ANONYMOUS, total, 2, 0};
    CHECK(mmukit_gmem_create(&unmappable, &gmem) == 0);
    CHECK(mmukit_gmem_host_addr(gmem, &addr) == -ENODEV);
    CHECK(mmukit_gmem_fd(gmem) == -ENOTSUP);
    mmukit_gmem_destroy(gmem);

    /* Private anonymous memory: the same file contract, and no private page. */
    struct mmukit_gmem_config plain = {sizeof(struct mmukit_gmem_config),
                                       MMUKIT_GMEM_PRIVATE_ANONYMOUS, total, 3, 0};
    CHECK(mmukit_gmem_create(&plain, &gmem) == 0);
    CHECK(mmukit_gmem_host_addr(gmem, &addr) == 0);
    memset((void *)(uintptr_t)addr, 0x5a, total);
    CHECK(mmukit_gmem_fallocate(gmem, PUNCH, page, page) == 0);
    CHECK(((unsigned char *)(uintptr_t)addr)[page] == 0);
    CHECK(((unsigned char *)(uintptr_t)addr)[0] == 0x5a);
    CHECK(mmukit_gmem_convert(gmem, page, page, true) == -EOPNOTSUPP);
    CHECK(mmukit_gmem_convert(gmem, page, page, false) == 0);
    CHECK(mmukit_gmem_prefault(gmem, 2) == 0);
    CHECK(mmukit_gmem_fd(gmem) == -ENOTSUP);
    mmukit_gmem_destroy(gmem);
    struct mmukit_gmem_config created_private = {sizeof(struct mmukit_gmem_config),
                                                 MMUKIT_GMEM_PRIVATE_ANONYMOUS, total, 1, 0};
    CHECK(mmukit_gmem_create(&created_private, &gmem) == -EOPNOTSUPP);

    CHECK(mmukit_gmem_create(NULL, &gmem) == -EINVAL);
    struct mmukit_gmem_config unknown = {sizeof(struct mmukit_gmem_config), 99, total, 3, 0};
    CHECK(mmukit_gmem_create(&unknown, &gmem) == -EINVAL);
    CHECK(mmukit_gmem_fallocate(NULL, KEEP, 0, page) == -EINVAL);
    mmukit_gmem_destroy(NULL);
    puts("gmem_test: ok");
    return 0;
}
