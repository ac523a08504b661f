/*
 * mdisk_read.c - one attempt of the guest's stable read of a metrics disk,
 * in C, for the tests and benchmarks only (never shipped: setup.py does not
 * build it; tests/helpers/cread.py compiles it with csrc/mdisk.c).
 *
 * Guests read with the pure Python of vhostmd_wire.disk (PyReadStrategy);
 * this is its C twin, so the tests can check both against each other and
 * the benchmarks can compare them. The retry policy is the wire's
 * (vhostmd_wire.disk.DiskReader): this file is one attempt.
 */

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "mdisk.h"
#include "mdisk_read.h"

/* ---- aligned buffers -------------------------------------------------- */

static size_t round_up(size_t n)
{
    return (n + (MDISK_ALIGN - 1)) & ~((size_t)MDISK_ALIGN - 1);
}

unsigned char *mdisk_buf_alloc(size_t size)
{
    void *p = NULL;

    if (size == 0)
        size = MDISK_ALIGN;
    if (size > SIZE_MAX - (MDISK_ALIGN - 1))
        return NULL; /* round_up() would wrap to 0 */
    if (posix_memalign(&p, MDISK_ALIGN, round_up(size)) != 0)
        return NULL;
    return p;
}

void mdisk_buf_free(unsigned char *buf)
{
    free(buf);
}

/* ---- reading (guest) -------------------------------------------------- */

/*
 * pread up to `want` bytes (a multiple of MDISK_ALIGN) at offset 0. With
 * O_DIRECT the kernel returns less at end of file; that is only an error
 * if it does not cover what the header says, which the caller checks.
 * Upstream insists on full 64 KiB blocks and so cannot read a disk
 * smaller than 64 KiB (FACTS.md section 3 small-1k): we accept the short read.
 */
static ssize_t pread_upto(int fd, unsigned char *buf, size_t want)
{
    size_t got = 0;

    while (got < want) {
        ssize_t n = pread(fd, buf + got, want - got, (off_t)got);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            break;
        got += (size_t)n;
        /* A short, unaligned O_DIRECT read means end of file; asking
         * again at an unaligned offset would fail with EINVAL. */
        if (got % MDISK_ALIGN != 0)
            break;
    }
    return (ssize_t)got;
}

static void drop_cache(int fd, int direct)
{
    /* Without O_DIRECT a guest would re-read its own stale page cache of
     * the block device forever; ask the kernel to forget it first. The
     * advice may be refused (e.g. on a pipe); then there is nothing to do. */
    if (!direct)
        (void)posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
}

/*
 * One attempt: header and content in one read, the header again, and the
 * checks upstream's reader does (busy, header unchanged) plus the ones it
 * does not (length within the device, checksum against the content:
 * a DEVIATION, docs/COMPATIBILITY.md). Retrying is the caller's job.
 */
int mdisk_read_stable(int fd, int direct, uint64_t dev_size,
                      unsigned char *buf, size_t bufsize,
                      struct mdisk_header *out)
{
    unsigned char *again;
    struct mdisk_header h2;
    uint64_t need;
    ssize_t n;
    int rc;

    if (bufsize < MDISK_ALIGN || bufsize % MDISK_ALIGN != 0 ||
        ((uintptr_t)buf % MDISK_ALIGN) != 0)
        return MDISK_E_ARG;

    drop_cache(fd, direct);
    n = pread_upto(fd, buf, bufsize);
    if (n < 0)
        return (int)n;
    if (n < MDISK_HEADER_SIZE)
        return MDISK_E_SHORT;
    mdisk_header_unpack(buf, out);
    if (out->signature != MDISK_SIGNATURE)
        return MDISK_E_SIGNATURE;
    if (out->busy != 0)
        return MDISK_E_BUSY;
    need = MDISK_HEADER_SIZE + (uint64_t)out->length;
    if (need > dev_size || need > MDISK_MAX_DISK_SIZE)
        return MDISK_E_LENGTH;
    if (need > bufsize)
        return MDISK_E_BUFFER;
    if (need > (uint64_t)n)
        /* The file ended before the content although its size said
         * otherwise: it shrank under us (re-created). Let the caller retry. */
        return MDISK_E_CHANGED;

    again = mdisk_buf_alloc(MDISK_ALIGN);
    if (again == NULL)
        return -ENOMEM;
    drop_cache(fd, direct);
    n = pread_upto(fd, again, MDISK_ALIGN);
    if (n < 0) {
        rc = (int)n;
    } else if (n < MDISK_HEADER_SIZE) {
        rc = MDISK_E_CHANGED;
    } else {
        mdisk_header_unpack(again, &h2);
        if (h2.busy != 0)
            rc = MDISK_E_BUSY;
        else if (memcmp(again, buf, MDISK_HEADER_SIZE) != 0)
            rc = MDISK_E_CHANGED;
        else if (mdisk_checksum(buf + MDISK_HEADER_SIZE, out->length) != out->checksum)
            rc = MDISK_E_CHECKSUM;
        else
            rc = MDISK_OK;
    }
    mdisk_buf_free(again);
    return rc;
}
