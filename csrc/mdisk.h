/*
 * mdisk.h - declarations of the vhostmd metrics disk ("mvbd") hot path.
 *
 * Declarations only: this file is read both by the C compiler and by
 * cffi's cdef (see build_mdisk.py), so it holds no preprocessor logic
 * beyond what cffi accepts. The on-disk layout is described once, in
 * mdisk.c, where it is packed.
 */

struct mdisk_header {
    uint32_t signature;
    uint32_t busy;
    uint32_t checksum;
    uint32_t length;
};

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

uint32_t mdisk_checksum(const unsigned char *buf, size_t len);
void mdisk_header_pack(const struct mdisk_header *h, unsigned char *out16);
void mdisk_header_unpack(const unsigned char *in16, struct mdisk_header *h);

int mdisk_set_busy(int fd, uint32_t busy);
int mdisk_publish(int fd, const unsigned char *content, size_t len,
                  uint64_t disk_size, uint64_t clear_to);
int mdisk_read_stable(int fd, int direct, uint64_t dev_size,
                      unsigned char *buf, size_t bufsize,
                      struct mdisk_header *out);
