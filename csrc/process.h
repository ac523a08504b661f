/*
 * process.h - declarations of process-wide settings of the daemon (csrc/process.c).
 *
 * Declarations only: this file is read both by the C compiler and by
 * cffi's cdef (see build.py). The behaviour is described in process.c.
 */

/* Limit the C allocator to N arenas (glibc's M_ARENA_MAX); 0, or -errno:
 * -ENOSYS where the C library has no such setting, -EINVAL when refused. */
int vh_malloc_arena_max(int n);
