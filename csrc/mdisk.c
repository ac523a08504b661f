/*
 * mdisk.c - the vhostmd metrics disk ("mvbd"), wire-compatible with
 * vhostmd 1.2 (docs/COMPATIBILITY.md).
 *
 * The binary layout is described once, in the docstring of
 * guest/vhostmd_wire/disk.py (the wire format both sides import; its pure
 * Python is the tests' oracle for this file): a 16-byte header of four
 * big-endian uint32 (signature "mvbd", busy, checksum, length), then the
 * content, then zeros up to the disk size. The checksum sums the content
 * as SIGNED chars because upstream packs it on x86-64, where `char` is
 * signed (FACTS.md: utf8-1k sums to 18185, not the unsigned 20745).
 *
 * Everything here works on a file descriptor the caller opened: the
 * paths and modes are vhostmd_py/publish/diskfile.py's business. Only the
 * host's side is here (it is what ships); the stable read the tests and
 * benchmarks compare against the wire's pure Python is csrc/tests/mdisk_read.c.
 * Functions return MDISK_OK, a positive MDISK_E_* status, or -errno.
 */

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "mdisk.h"

/* ---- checksum ------------------------------------------------------- */

/*
 * Signed-char sum modulo 2^32, computed as sum(b ^ 0x80) - 128 * len:
 * b ^ 0x80 is the signed value plus 128, always 0..255, so the sum can use
 * unsigned byte arithmetic (psadbw on x86, uint16 lanes elsewhere) and stay
 * equal to upstream's `unsigned int += char` modulo 2^32. This keeps the
 * checksum well below the cost of the content pwrite (bench/README.md).
 * MDISK_NO_SIMD forces the portable loop (tests build it that way too).
 */
#if defined(__SSE2__) && !defined(MDISK_NO_SIMD)
#include <emmintrin.h>

static uint32_t biased_sum(const unsigned char *buf, size_t len, size_t *done)
{
    const __m128i bias = _mm_set1_epi8((char)0x80);
    const __m128i zero = _mm_setzero_si128();
    __m128i acc = zero;
    uint64_t lanes[2];
    size_t i = 0;

    /* psadbw against zero adds 8 bytes into each 64-bit lane: no overflow
     * below 2^56 bytes. */
    for (; i + 16 <= len; i += 16) {
        __m128i x = _mm_loadu_si128((const __m128i *)(const void *)(buf + i));
        acc = _mm_add_epi64(acc, _mm_sad_epu8(_mm_xor_si128(x, bias), zero));
    }
    _mm_storeu_si128((__m128i *)(void *)lanes, acc);
    *done = i;
    return (uint32_t)(lanes[0] + lanes[1]);
}
#else
#define SUM_BLOCK 256

static uint32_t biased_sum(const unsigned char *buf, size_t len, size_t *done)
{
    uint32_t sum = 0;
    size_t i = 0;

    /* 256 values of at most 255 fit a uint16: gcc -O2 vectorises this
     * fixed-length inner loop with 16-bit lanes. */
    for (; i + SUM_BLOCK <= len; i += SUM_BLOCK) {
        uint16_t s = 0;
        int j;
        for (j = 0; j < SUM_BLOCK; j++)
            s = (uint16_t)(s + (uint8_t)(buf[i + j] ^ 0x80));
        sum += s;
    }
    *done = i;
    return sum;
}
#endif

uint32_t mdisk_checksum(const unsigned char *buf, size_t len)
{
    size_t done = 0;
    uint32_t sum = biased_sum(buf, len, &done);
    size_t i;

    sum -= (uint32_t)(128u * (uint32_t)done); /* modulo 2^32, like the sum */
    for (i = done; i < len; i++)
        sum += (uint32_t)(int32_t)(signed char)buf[i];
    return sum;
}

/* ---- header ----------------------------------------------------------- */

static void put_be32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

static uint32_t get_be32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) |
           ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

void mdisk_header_pack(const struct mdisk_header *h, unsigned char *out16)
{
    put_be32(out16 + 0, h->signature);
    put_be32(out16 + 4, h->busy);
    put_be32(out16 + 8, h->checksum);
    put_be32(out16 + 12, h->length);
}

void mdisk_header_unpack(const unsigned char *in16, struct mdisk_header *h)
{
    h->signature = get_be32(in16 + 0);
    h->busy = get_be32(in16 + 4);
    h->checksum = get_be32(in16 + 8);
    h->length = get_be32(in16 + 12);
}

/* ---- writing (host) --------------------------------------------------- */

/* pwrite all of it, restarting after EINTR (a signal to the daemon must
 * not abandon a half-written disk) and after short writes. */
static int pwrite_full(int fd, const unsigned char *p, size_t len, uint64_t off)
{
    while (len > 0) {
        ssize_t n = pwrite(fd, p, len, (off_t)off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return -EIO;
        p += n;
        len -= (size_t)n;
        off += (uint64_t)n;
    }
    return MDISK_OK;
}

static const unsigned char zeros[65536];

static int pwrite_zeros(int fd, uint64_t off, uint64_t end)
{
    while (off < end) {
        size_t chunk = sizeof(zeros);
        int rc;
        if (end - off < chunk)
            chunk = (size_t)(end - off);
        rc = pwrite_full(fd, zeros, chunk, off);
        if (rc != MDISK_OK)
            return rc;
        off += chunk;
    }
    return MDISK_OK;
}

int mdisk_set_busy(int fd, uint32_t busy)
{
    unsigned char b[4];

    put_be32(b, busy);
    return pwrite_full(fd, b, sizeof(b), 4);
}

/*
 * The publish sequence, all on one fd:
 *   1. header with busy=1 and the NEW checksum and length;
 *   2. the content at 16;
 *   3. zeros over the previous document's longer tail (upstream leaves it,
 *      FACTS.md section 2 basic-1k.after-sigterm: a DEVIATION);
 *   4. header with busy=0 (identical to 1. but for the busy word, so a
 *      reader's torn header read cannot pair an old length with new data
 *      without also seeing busy or a changed header).
 * Upstream issues six write() calls per update (busy, signature, checksum,
 * length, content, busy); three pwrite()s give readers the same protocol.
 * A document that does not fit is refused before anything is written, so
 * the previous one stays readable and busy is never set (upstream sets
 * busy first and then leaves it set forever, hanging every reader).
 * When a write fails midway we still try to clear busy: a reader then
 * sees a checksum mismatch and retries, which beats a disk stuck busy.
 * No fdatasync: the disk lives in /dev/shm or is read by a guest through
 * the host page cache, and a sync per cycle costs more than it protects.
 */
int mdisk_publish(int fd, const unsigned char *content, size_t len,
                  uint64_t disk_size, uint64_t clear_to)
{
    struct mdisk_header h;
    unsigned char raw[MDISK_HEADER_SIZE];
    uint64_t end;
    int rc;

    if (disk_size < MDISK_HEADER_SIZE || (uint64_t)len > disk_size - MDISK_HEADER_SIZE ||
        (uint64_t)len > UINT32_MAX)
        return MDISK_E_TOOLARGE;
    end = MDISK_HEADER_SIZE + (uint64_t)len;
    if (clear_to > disk_size)
        clear_to = disk_size;

    h.signature = MDISK_SIGNATURE;
    h.busy = 1;
    h.checksum = mdisk_checksum(content, len);
    h.length = (uint32_t)len;
    mdisk_header_pack(&h, raw);
    rc = pwrite_full(fd, raw, sizeof(raw), 0);
    if (rc != MDISK_OK)
        goto fail;
    rc = pwrite_full(fd, content, len, MDISK_HEADER_SIZE);
    if (rc != MDISK_OK)
        goto fail;
    if (clear_to > end) {
        rc = pwrite_zeros(fd, end, clear_to);
        if (rc != MDISK_OK)
            goto fail;
    }
    h.busy = 0;
    mdisk_header_pack(&h, raw);
    rc = pwrite_full(fd, raw, sizeof(raw), 0);
    if (rc != MDISK_OK)
        goto fail;
    return MDISK_OK;

fail:
    (void)mdisk_set_busy(fd, 0);
    return rc;
}
