/*
 * runner.c - run a batch of metric actions (`/bin/sh -c CMD`) with bounds.
 *
 * WHY C: every cycle runs one shell per metric per VM (3000 for perf-echo3
 * x 1000 domains). Each child costs ~0.7 ms of CPU (exec + dash); the
 * asyncio/ctypes path cost ~450 us more per action in our own process, so
 * parent + children overran 2 cores' budget (bench/README.md, Actions).
 * Here one thread spawns, watches and reaps a whole batch with poll(), and
 * Python only packs the jobs and unpacks the results (~tens of us each).
 * The caller releases the GIL (cffi does) and runs this in a worker thread,
 * so the daemon's event loop (virtio shares it) stays responsive.
 *
 * Per action (the contract ActionRunner documents):
 *  - posix_spawn(shell, {"sh", "-c", cmd}, envp) in a NEW SESSION, so one
 *    killpg() reaches every process it started (upstream's popen() left
 *    grandchildren running); SIGPIPE and SIGXFSZ back to default although
 *    Python ignores them (`virsh ... | head -1` must end as from a shell);
 *    empty signal mask; stdin /dev/null; stdout/stderr pipes. Every fd we
 *    create is O_CLOEXEC, so no child inherits another action's pipes (a
 *    leaked write end would hold that action's EOF back).
 *  - the first out_cap bytes of stdout and err_cap of stderr are kept; more
 *    is read and counted; past max_output on either, the group is killed
 *    (upstream read once and closed the pipe: such a command died of
 *    SIGPIPE and the metric was left out, as here).
 *  - timeout_ms after the spawn, SIGKILL to the process group.
 *  - done when both pipes are at EOF and the shell is reaped; after a kill,
 *    at most kill_grace_ms more (a grandchild that called setsid() keeps the
 *    pipe open forever): then the pipes are closed, the shell reaped if it
 *    can be, else reported VH_UNREAPED for the caller to reap later.
 *  - the abort pipe: an index kills that job (or cancels it before start),
 *    VH_ABORT_ALL every job: the daemon stops within its 2 s budget.
 * Reaping uses waitpid(pid) on our own pids only (never -1), and a pidfd
 * (Linux >= 5.3) for the rare shell that closed its pipes before exiting;
 * without pidfd_open we poll for it every millisecond.
 */

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "runner.h"

#define READ_CHUNK 65536
#define STARVED_TICK_MS 2   /* other batches hold every slot: look again    */
#define PIDFD_TICK_MS 1     /* no pidfd_open: how often to retry waitpid    */

enum { ST_PENDING = 0, ST_RUNNING = 1, ST_DONE = 2 };

struct slot {
    size_t job;
    pid_t pid;
    int out_fd;
    int err_fd;
    int pid_fd;        /* -1 until the pipes closed before the shell exited */
    int p_out, p_err;  /* their index in this round's pollfd array, or -1  */
    int killed;
    int64_t deadline;  /* timeout, then (killed) end of the grace          */
};

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int take_slot(struct vh_shared *sh)
{
    int n = __atomic_load_n(&sh->slots, __ATOMIC_ACQUIRE);
    while (n > 0) {
        if (__atomic_compare_exchange_n(&sh->slots, &n, n - 1, 0,
                                        __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            __atomic_add_fetch(&sh->running, 1, __ATOMIC_RELEASE);
            return 1;
        }
    }
    return 0;
}

static void give_slot(struct vh_shared *sh)
{
    __atomic_sub_fetch(&sh->running, 1, __ATOMIC_RELEASE);
    __atomic_add_fetch(&sh->slots, 1, __ATOMIC_RELEASE);
}

static void close_fd(int *fd)
{
    if (*fd >= 0) {
        close(*fd);
        *fd = -1;
    }
}

static int open_pidfd(pid_t pid)
{
#ifdef SYS_pidfd_open
    long fd = syscall(SYS_pidfd_open, pid, 0);
    if (fd >= 0) {
        /* pidfds are close-on-exec by default (kernel), nothing to set. */
        return (int)fd;
    }
#else
    (void)pid;
#endif
    return -1;
}

/* Returns 0 or an errno value; on success out_r and err_r hold the read ends. */
static int spawn_one(const char *shell, const struct vh_job *job,
                     const posix_spawnattr_t *attr, int devnull, pid_t *pid,
                     int *out_r, int *err_r)
{
    int out[2], err[2];
    posix_spawn_file_actions_t fa;
    char *argv[4];
    int rc;

    if (pipe2(out, O_CLOEXEC) != 0)
        return errno;
    if (pipe2(err, O_CLOEXEC) != 0) {
        rc = errno;
        close(out[0]);
        close(out[1]);
        return rc;
    }
    rc = posix_spawn_file_actions_init(&fa);
    if (rc == 0) {
        /* dup2s before the open of fd 0: if our own fd 0 was closed, a pipe
         * end may be fd 0 and must be moved before /dev/null replaces it. */
        rc = posix_spawn_file_actions_adddup2(&fa, out[1], 1);
        if (rc == 0)
            rc = posix_spawn_file_actions_adddup2(&fa, err[1], 2);
        /* One /dev/null per batch, dup'ed: saves every child an open(). */
        if (rc == 0 && devnull >= 0)
            rc = posix_spawn_file_actions_adddup2(&fa, devnull, 0);
        else if (rc == 0)
            rc = posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
        if (rc == 0) {
            argv[0] = (char *)"sh";
            argv[1] = (char *)"-c";
            argv[2] = (char *)job->command;
            argv[3] = NULL;
            rc = posix_spawn(pid, shell, &fa, attr, argv, job->envp);
        }
        posix_spawn_file_actions_destroy(&fa);
    }
    close(out[1]);
    close(err[1]);
    if (rc != 0) {
        close(out[0]);
        close(err[0]);
        return rc;
    }
    *out_r = out[0];
    *err_r = err[0];
    return 0;
}

/* After an abort (the daemon is stopping) we wait at most this long for the
 * pipes of a killed action: a grandchild that escaped with setsid() may hold
 * them for ever, and the daemon must stop within 2 s (SPEC section 7). */
#define ABORT_GRACE_MS 100

static void kill_group(struct slot *s, int64_t now, int grace_ms)
{
    if (s->killed)
        return;
    s->killed = 1;
    s->deadline = now + (int64_t)grace_ms * 1000000;
    if (killpg(s->pid, SIGKILL) != 0 && errno == EPERM) {
        /* A setuid program in the group: kill at least our shell. */
        kill(s->pid, SIGKILL);
    }
}

/* One read from a readable pipe; closes it at EOF or error. */
static void drain(int *fd, unsigned char *scratch, unsigned char *keep, size_t cap,
                  size_t *kept, uint64_t *total)
{
    ssize_t n = read(*fd, scratch, READ_CHUNK);
    if (n < 0) {
        if (errno == EINTR || errno == EAGAIN)
            return;
        close_fd(fd);
        return;
    }
    if (n == 0) {
        close_fd(fd);
        return;
    }
    if (*kept < cap) {
        size_t room = cap - *kept;
        size_t take = (size_t)n < room ? (size_t)n : room;
        memcpy(keep + *kept, scratch, take);
        *kept += take;
    }
    *total += (uint64_t)n;
}

/* Try to reap the shell; 1 when it is gone (status recorded if we got it). */
static int reap(struct slot *s, struct vh_result *r)
{
    int status;
    pid_t got;
    do {
        got = waitpid(s->pid, &status, WNOHANG);
    } while (got < 0 && errno == EINTR);
    if (got == s->pid) {
        r->status = status;
        r->flags |= VH_REAPED;
        return 1;
    }
    /* ECHILD: reaped by someone else; the status is lost, the job is over. */
    return got < 0;
}

static void finish(struct slot *slots, unsigned *nrun, unsigned i,
                   struct vh_result *results, unsigned char *state,
                   struct vh_shared *sh, int64_t now)
{
    struct slot *s = &slots[i];
    close_fd(&s->out_fd);
    close_fd(&s->err_fd);
    close_fd(&s->pid_fd);
    state[s->job] = ST_DONE;
    give_slot(sh);
    /* Last, and atomically: a cancelled caller polls end_ns != 0 to know
     * that the child is dead and reaped (and the gauge already down). */
    __atomic_store_n(&results[s->job].end_ns, now, __ATOMIC_RELEASE);
    slots[i] = slots[*nrun - 1];
    (*nrun)--;
}

static int setup_attr(posix_spawnattr_t *attr)
{
    sigset_t def, mask;
    int rc = posix_spawnattr_init(attr);
    if (rc != 0)
        return rc;
    sigemptyset(&def);
    sigaddset(&def, SIGPIPE);
    sigaddset(&def, SIGXFSZ);
    sigemptyset(&mask);
    rc = posix_spawnattr_setsigdefault(attr, &def);
    if (rc == 0)
        rc = posix_spawnattr_setsigmask(attr, &mask);
    if (rc == 0)
        rc = posix_spawnattr_setflags(attr, POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGDEF
                                                | POSIX_SPAWN_SETSIGMASK);
    if (rc != 0)
        posix_spawnattr_destroy(attr);
    return rc;
}

/* Reads abort requests; returns 1 when every job is to be aborted. */
static int read_aborts(int *abort_fd, const unsigned char *state, size_t njobs,
                       unsigned char *abort_req)
{
    uint32_t buf[256];
    int all = 0;
    for (;;) {
        ssize_t n = read(*abort_fd, buf, sizeof buf);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            break;  /* EAGAIN: drained */
        }
        if (n == 0) {
            /* Writer gone: stop watching (POLLHUP would spin otherwise). */
            *abort_fd = -1;
            break;
        }
        for (size_t k = 0; k < (size_t)n / sizeof buf[0]; k++) {
            if (buf[k] == (uint32_t)VH_ABORT_ALL) {
                all = 1;
            } else if (buf[k] < njobs && state[buf[k]] != ST_DONE) {
                abort_req[buf[k]] = 1;
            }
        }
    }
    return all;
}

int vh_run_batch(const char *shell, const struct vh_job *jobs, size_t njobs,
                 struct vh_shared *shared, const struct vh_limits *lim,
                 int abort_fd, struct vh_result *results)
{
    unsigned max_local, nrun = 0;
    size_t next = 0, ndone = 0;
    struct slot *slots;
    struct pollfd *pfds;
    unsigned char *scratch, *state, *abort_req;
    posix_spawnattr_t attr;
    int rc, all_aborted = 0, abort_ready = 1, devnull;

    memset(results, 0, njobs * sizeof *results);
    if (njobs == 0)
        return 0;
    max_local = lim->max_running ? lim->max_running : 1;
    if (max_local > njobs)
        max_local = (unsigned)njobs;
    rc = setup_attr(&attr);
    if (rc != 0)
        return -rc;
    slots = calloc(max_local, sizeof *slots);
    pfds = calloc(3 * (size_t)max_local + 1, sizeof *pfds);
    scratch = malloc(READ_CHUNK);
    state = calloc(njobs, 2);
    if (!slots || !pfds || !scratch || !state) {
        free(slots);
        free(pfds);
        free(scratch);
        free(state);
        posix_spawnattr_destroy(&attr);
        return -ENOMEM;
    }
    abort_req = state + njobs;
    /* -1: each child opens it. Below 3 (our own stdio was closed) the
     * child's dup2 onto 1 or 2 would clobber it first: do not use it. */
    devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (devnull >= 0 && devnull < 3) {
        close(devnull);
        devnull = -1;
    }

    while (ndone < njobs) {
        int64_t now, wake;
        int timeout_ms, starved = 0, tick = 0, reaped, abort_at;
        nfds_t np = 0;

        /* Only when poll() said so (or first round): saves a failing read
         * per wake-up, ~3 per action. */
        if (abort_fd >= 0 && abort_ready && read_aborts(&abort_fd, state, njobs, abort_req))
            all_aborted = 1;
        abort_ready = 0;
        now = now_ns();

        /* Aborts, timeouts, and the end of kill graces. */
        for (unsigned i = 0; i < nrun;) {
            struct slot *s = &slots[i];
            struct vh_result *r = &results[s->job];
            if (!s->killed && (all_aborted || abort_req[s->job])) {
                r->flags |= VH_ABORTED;
                kill_group(s, now,
                           lim->kill_grace_ms < ABORT_GRACE_MS ? lim->kill_grace_ms
                                                               : ABORT_GRACE_MS);
            } else if (!s->killed && now >= s->deadline) {
                r->flags |= VH_TIMEOUT;
                kill_group(s, now, lim->kill_grace_ms);
            } else if (s->killed && now >= s->deadline) {
                /* Grace over: stop waiting for pipes a stray process holds. */
                if (!reap(s, r))
                    r->flags |= VH_UNREAPED;
                finish(slots, &nrun, i, results, state, shared, now);
                ndone++;
                continue;
            }
            i++;
        }

        /* Start what the bounds allow. */
        while (next < njobs && nrun < max_local) {
            struct vh_result *r = &results[next];
            struct slot *s;
            if (all_aborted || abort_req[next]) {
                r->flags |= VH_ABORTED;
                r->start_ns = r->end_ns = now;
                state[next++] = ST_DONE;
                ndone++;
                continue;
            }
            if (!take_slot(shared)) {
                starved = 1;
                break;
            }
            s = &slots[nrun];
            memset(s, 0, sizeof *s);
            s->job = next;
            s->pid_fd = -1;
            r->start_ns = now_ns();
            rc = spawn_one(shell, &jobs[next], &attr, devnull, &s->pid, &s->out_fd,
                           &s->err_fd);
            if (rc != 0) {
                r->flags |= VH_SPAWN_ERROR;
                r->error = rc;
                r->end_ns = r->start_ns;
                give_slot(shared);
                state[next++] = ST_DONE;
                ndone++;
                continue;
            }
            r->pid = s->pid;
            r->flags |= VH_STARTED;
            s->deadline = r->start_ns + (int64_t)lim->timeout_ms * 1000000;
            state[next++] = ST_RUNNING;
            nrun++;
        }

        /* Pipes at EOF: reap, or wait for the exit on a pidfd. */
        now = now_ns();
        reaped = 0;
        for (unsigned i = 0; i < nrun;) {
            struct slot *s = &slots[i];
            if (s->out_fd < 0 && s->err_fd < 0) {
                if (reap(s, &results[s->job])) {
                    finish(slots, &nrun, i, results, state, shared, now);
                    ndone++;
                    reaped = 1;
                    continue;
                }
                if (s->pid_fd < 0)
                    s->pid_fd = open_pidfd(s->pid);
                if (s->pid_fd < 0)
                    tick = 1;
            }
            i++;
        }
        if (ndone >= njobs)
            break;
        if (reaped && next < njobs)
            continue;  /* slots were freed: start the next jobs first */

        /* Sleep until output, an exit, an abort or the next deadline. */
        wake = INT64_MAX;
        for (unsigned i = 0; i < nrun; i++) {
            struct slot *s = &slots[i];
            if (s->deadline < wake)
                wake = s->deadline;
            s->p_out = s->p_err = -1;
            if (s->out_fd >= 0) {
                s->p_out = (int)np;
                pfds[np].fd = s->out_fd;
                pfds[np++].events = POLLIN;
            }
            if (s->err_fd >= 0) {
                s->p_err = (int)np;
                pfds[np].fd = s->err_fd;
                pfds[np++].events = POLLIN;
            }
            if (s->pid_fd >= 0) {
                /* Readable = exited: the reap pass collects it next round. */
                pfds[np].fd = s->pid_fd;
                pfds[np++].events = POLLIN;
            }
        }
        if (abort_fd >= 0) {
            pfds[np].fd = abort_fd;
            pfds[np++].events = POLLIN;
        }
        abort_at = abort_fd >= 0 ? (int)np - 1 : -1;
        if (wake == INT64_MAX) {
            timeout_ms = -1;
        } else if (wake <= now) {
            timeout_ms = 0;
        } else {
            int64_t ms = (wake - now + 999999) / 1000000;
            timeout_ms = ms > 60000 ? 60000 : (int)ms;
        }
        if (starved && (timeout_ms < 0 || timeout_ms > STARVED_TICK_MS))
            timeout_ms = STARVED_TICK_MS;
        if (tick && (timeout_ms < 0 || timeout_ms > PIDFD_TICK_MS))
            timeout_ms = PIDFD_TICK_MS;
        if (np == 0 && timeout_ms < 0)
            timeout_ms = STARVED_TICK_MS;  /* cannot happen; never block forever */
        if (poll(pfds, np, timeout_ms) <= 0)
            continue;  /* timeout or EINTR: the checks above run again */

        if (abort_at >= 0 && pfds[abort_at].revents)
            abort_ready = 1;

        /* Read what is ready. */
        for (unsigned i = 0; i < nrun; i++) {
            struct slot *s = &slots[i];
            const struct vh_job *j = &jobs[s->job];
            struct vh_result *r = &results[s->job];
            if (s->p_out >= 0 && pfds[s->p_out].revents)
                drain(&s->out_fd, scratch, j->out, j->out_cap, &r->out_len, &r->out_total);
            if (s->p_err >= 0 && pfds[s->p_err].revents)
                drain(&s->err_fd, scratch, j->err, j->err_cap, &r->err_len, &r->err_total);
            if (!s->killed && (r->out_total > lim->max_output
                               || r->err_total > lim->max_output)) {
                r->flags |= VH_OVERFLOW;
                kill_group(s, now_ns(), lim->kill_grace_ms);
            }
        }
    }

    if (devnull >= 0)
        close(devnull);
    free(slots);
    free(pfds);
    free(scratch);
    free(state);
    posix_spawnattr_destroy(&attr);
    return 0;
}
