/*
 * mdisk_read.h - declarations of csrc/tests/mdisk_read.c (tests and
 * benchmarks only). Declarations only, read by cffi's cdef after mdisk.h
 * (struct mdisk_header, MDISK_ALIGN, the MDISK_E_* statuses).
 */

/* Buffers suitable for O_DIRECT: MDISK_ALIGN-aligned, size rounded up to
 * a multiple of MDISK_ALIGN. NULL when out of memory. */
unsigned char *mdisk_buf_alloc(size_t size);
void mdisk_buf_free(unsigned char *buf);

/* One attempt of the guest's stable read. buf from mdisk_buf_alloc,
 * bufsize a multiple of MDISK_ALIGN; direct = fd was opened O_DIRECT
 * (else the page cache is dropped before each read). On MDISK_OK the
 * content is at buf + 16, out->length bytes. out is filled whenever a
 * header was read (every status but MDISK_E_SHORT and errors). */
int mdisk_read_stable(int fd, int direct, uint64_t dev_size,
                      unsigned char *buf, size_t bufsize,
                      struct mdisk_header *out);
