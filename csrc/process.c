/*
 * process.c - process-wide settings of the daemon.
 *
 * vh_malloc_arena_max: glibc gives each thread that allocates while
 * another holds the main arena an arena of its own, and memory freed in
 * one arena serves only that arena. The daemon's libvirt worker thread
 * allocates libvirt's copy of every domain (with 1000 domains, a few MB
 * per cycle) while the main thread allocates the cycle's Python objects;
 * two arenas then each keep their own high-water mark, about 4 MB more
 * resident memory at 1000 VMs than one shared arena (bench/README.md,
 * "Footprint beside upstream"). The threads take turns on the GIL, so
 * one arena costs them next to no lock contention.
 */

#include <errno.h>
#include <malloc.h>

#include "process.h"

int vh_malloc_arena_max(int n)
{
#ifdef M_ARENA_MAX
    if (n < 1)
        return -EINVAL;
    /* mallopt returns 1 on success, 0 on error. */
    return mallopt(M_ARENA_MAX, n) == 1 ? 0 : -EINVAL;
#else
    (void)n;
    return -ENOSYS;
#endif
}
