/*
 * runner.h - declarations of the action batch runner (csrc/runner.c).
 *
 * Declarations only: this file is read both by the C compiler and by
 * cffi's cdef (see build.py), so it holds no preprocessor logic
 * beyond integer #defines, which cffi accepts. Callers include
 * <stdint.h> and <stddef.h> first. The behaviour is described in runner.c.
 */

/* One action: COMMAND run by a `shell -s` worker started with envp (as
 * `shell -c command` would run it, see runner.c), stdout kept up to out_cap
 * bytes in out, stderr up to err_cap bytes in err (buffers owned by the
 * caller). */
struct vh_job {
    const char *command;
    char *const *envp;
    unsigned char *out;
    size_t out_cap;
    unsigned char *err;
    size_t err_cap;
};

/* What one action did; filled for every job of a batch. */
struct vh_result {
    int pid;             /* the worker shell's pid (its process group); 0 when
                            never started                                 */
    int status;          /* wait status, valid with VH_REAPED             */
    int flags;           /* VH_* below                                    */
    int error;           /* errno of a VH_SPAWN_ERROR                     */
    size_t out_len;      /* bytes kept in out (<= out_cap)                */
    uint64_t out_total;  /* stdout bytes seen (kept + read and discarded) */
    size_t err_len;      /* bytes kept in err (<= err_cap)                */
    uint64_t err_total;
    int64_t start_ns;    /* CLOCK_MONOTONIC at spawn / at the end          */
    int64_t end_ns;
};

/* Shared between the batches of one runner that run at the same time (one
 * per thread): the concurrency bound and a gauge, updated atomically. */
struct vh_shared {
    int slots;    /* actions that may still start (max_concurrency - running) */
    int running;  /* actions running now                                       */
};

struct vh_limits {
    int timeout_ms;        /* per action, from its spawn; then SIGKILL to its group */
    int kill_grace_ms;     /* after SIGKILL, how long to wait for pipes and exit    */
    uint64_t max_output;   /* bytes read from stdout or stderr before SIGKILL       */
    unsigned max_running;  /* at most this many of THIS batch at once (>= 1)        */
    int linger_ms;         /* after the action's exit status arrived, how long its
                              fifos may stay open (a background child holding its
                              stdout); then they are closed, what was read is the
                              output, and the worker's process group is killed.
                              < 0: wait for EOF until the timeout (upstream hangs) */
};

#define VH_REAPED      1    /* status is valid                                  */
#define VH_TIMEOUT     2    /* killed at the timeout                            */
#define VH_OVERFLOW    4    /* killed: output beyond max_output                 */
#define VH_ABORTED     8    /* killed or never started: abort requested         */
#define VH_SPAWN_ERROR 16   /* worker spawn, fifo or pipe failed: see error     */
#define VH_UNREAPED    32   /* gave up waiting after the kill grace: pid lives  */
#define VH_STARTED     64   /* the child was spawned                            */
#define VH_LINGERED    128  /* exited, but its output stayed open linger_ms: the
                               fifos were closed, its process group killed; status
                               is the action's own exit status                  */

/* Written (native-endian uint32) to the abort pipe: a job index, or this. */
#define VH_ABORT_ALL   4294967295

/* prctl(PR_SET_CHILD_SUBREAPER, on): what an action leaves running when its
 * parent exits (setsid, double fork) is reparented to us instead of init, so
 * the daemon can reap and end it. 0, or -errno. */
int vh_set_child_subreaper(int on);

/* Runs njobs actions, at most lim->max_running (and shared->slots) at a
 * time, until every job has a result. fifo_prefix: a path prefix in a
 * private directory, unique to this batch, where the actions' output fifos
 * are made (PREFIX<job>o, PREFIX<job>e) and removed. abort_fd: read end of a
 * pipe the caller writes job indexes (or VH_ABORT_ALL) to; -1 for none.
 * Returns 0, or -errno when the batch could not be set up (no result is
 * then valid). */
int vh_run_batch(const char *shell, const char *fifo_prefix,
                 const struct vh_job *jobs, size_t njobs,
                 struct vh_shared *shared, const struct vh_limits *lim,
                 int abort_fd, struct vh_result *results);
