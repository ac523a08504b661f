/*
 * mdisk.h - declarations of the vhostmd metrics disk ("mvbd") hot path.
 *
 * Declarations only: this file is read both by the C compiler and by
 * cffi's cdef (see build.py), so it holds no preprocessor logic
 * beyond integer #defines, which cffi accepts. The on-disk layout is
 * described once, in guest/vhostmd_wire/disk.py. Callers include
 * <stdint.h> and <stddef.h> first.
 */

struct mdisk_header {
    uint32_t signature;
    uint32_t busy;
    uint32_t checksum;
    uint32_t length;
};

#define MDISK_SIGNATURE     0x6d766264  /* "mvbd"                              */
#define MDISK_HEADER_SIZE   16
#define MDISK_MAX_DISK_SIZE 268435456   /* 256 MiB, upstream's limit           */
#define MDISK_ALIGN         4096        /* O_DIRECT buffer/offset/size alignment */

/* Status codes returned by the functions below (negative errno values
 * are returned as is for OS failures). */
#define MDISK_OK          0
#define MDISK_E_TOOLARGE  1   /* content does not fit the disk          */
#define MDISK_E_BUSY      2   /* busy flag set (before or after read)    */
#define MDISK_E_SIGNATURE 3   /* signature is not "mvbd"                 */
#define MDISK_E_LENGTH    4   /* length field beyond the device/file     */
#define MDISK_E_CHANGED   5   /* header changed while reading (torn)     */
#define MDISK_E_CHECKSUM  6   /* checksum does not match the content     */
#define MDISK_E_SHORT     7   /* file shorter than the header            */
#define MDISK_E_BUFFER    8   /* caller buffer too small: see out->length */
#define MDISK_E_ARG       9   /* invalid argument (misaligned buffer...) */

uint32_t mdisk_checksum(const unsigned char *buf, size_t len);
void mdisk_header_pack(const struct mdisk_header *h, unsigned char *out16);
void mdisk_header_unpack(const unsigned char *in16, struct mdisk_header *h);

int mdisk_set_busy(int fd, uint32_t busy);
/* clear_to: end offset (exclusive) of what the previous publish wrote,
 * i.e. 16 + previous length; bytes between the new end and it are zeroed. */
int mdisk_publish(int fd, const unsigned char *content, size_t len,
                  uint64_t disk_size, uint64_t clear_to);
