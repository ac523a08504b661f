/*
 * runner.c - run a batch of metric actions through /bin/sh, with bounds.
 *
 * WHY C: every cycle runs one shell command per metric per VM (3000 for
 * perf-echo3 x 1000 domains). One thread dispatches, watches and finishes a
 * whole batch with poll(); Python only packs the jobs and unpacks the
 * results (~tens of us each). The caller releases the GIL (cffi does) and
 * runs this in a worker thread, so the daemon's event loop (virtio shares
 * it) stays responsive.
 *
 * WHY WORKER SHELLS: upstream runs each action with popen(), i.e. a fresh
 * `/bin/sh -c CMD`. On the 2-core VMs this daemon is measured on, an exec
 * costs ~0.75 ms of CPU before the shell reads a byte (a static no-op
 * binary already takes ~0.5 ms: glibc's start-up executes dozens of CPUID
 * instructions and each one traps to the hypervisor), so 3000 execs alone
 * overran the cycle budget (bench/README.md, Cycle). A fork of a running
 * shell skips exec and libc start-up (~0.3 ms). So each batch starts up to
 * max_running workers, `SHELL -s` reading commands from a pipe, and runs
 * every action in a subshell of one of them:
 *
 *     ( eval ' CMD' ) 2>'PREFIXNe' >'PREFIXNo' </dev/null; echo "$? N"
 *
 * The same /bin/sh parses and runs CMD exactly once (eval of one quoted
 * word is what `sh -c CMD` does with its argument), with the same
 * environment (the worker's, PATH from the config), no positional
 * parameters, $0 "sh", $PPID the daemon, and no state left by an earlier
 * action (each runs in its own subshell; the worker itself only ever runs
 * the line above). What differs from `sh -c`: $$ is the worker's pid (POSIX:
 * a subshell's $$ is its parent shell's), an exit status above 128 cannot
 * be told from death by signal 128+N, an action that kills $$ kills its
 * worker (reported with the worker's wait status, a new worker takes over),
 * and what an action leaves running in the background stays in the worker's
 * process group (a later action's timeout there ends it).
 *
 * Per action (the contract ActionRunner documents):
 *  - its worker leads a NEW SESSION (posix_spawn SETSID), so one killpg()
 *    reaches every process of the action (upstream's popen() left
 *    grandchildren running); SIGPIPE and SIGXFSZ back to default although
 *    Python ignores them (`virsh ... | head -1` must end as from a shell);
 *    empty signal mask; stdin /dev/null; stdout and stderr two fifos of our
 *    own, fresh per action (a straggler of an earlier action can never write
 *    into a later one's output) in the caller's private directory. Every fd
 *    we create is O_CLOEXEC: no worker inherits another one's pipes.
 *  - the first out_cap bytes of stdout and err_cap of stderr are kept; more
 *    is read and counted; past max_output on either, the group is killed
 *    (upstream read once and closed the pipe: such a command died of
 *    SIGPIPE and the metric was left out, as here).
 *  - timeout_ms after its start, SIGKILL to the worker's process group (the
 *    worker goes with it; the next action gets a new one).
 *  - done when both fifos are at EOF and the worker reported the status (or
 *    died and was reaped). Once the status is in, the fifos get linger_ms
 *    more: past that, a background child still holds the action's output
 *    (`sleep 1000 &` in the action: upstream's read() never returns), so the
 *    fifos are closed, what was read is the output, the status the action's
 *    own (VH_LINGERED), and the worker's process group is killed with what
 *    the action left in it. After a kill, at most kill_grace_ms more (a
 *    grandchild that called setsid() keeps a fifo open forever): then the
 *    fifos are closed, the worker reaped if it can be, else reported
 *    VH_UNREAPED for the caller to reap later.
 *  - the abort pipe: an index kills that job (or cancels it before start),
 *    VH_ABORT_ALL every job: the daemon stops within its 2 s budget.
 * Reaping uses waitpid(pid) on our own pids only (never -1), and a pidfd
 * (Linux >= 5.3) for a worker that died with its fifos already closed;
 * without pidfd_open we poll for it every millisecond. At the end of the
 * batch each worker gets EOF on its command pipe, exits, and is reaped.
 *
 * EOF on a fifo: poll() reports POLLHUP only once a writer has come and
 * gone, so a fifo whose writer never opened it (the subshell failed before
 * its redirections, or was killed first) is probed with one read() when the
 * status arrives or the worker dies: with no writer left, read() returns 0.
 */

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdint.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "runner.h"

#define READ_CHUNK 65536
#define STARVED_TICK_MS 2   /* other batches hold every slot: look again     */
#define PIDFD_TICK_MS 1     /* no pidfd_open: how often to retry waitpid     */
#define RETIRE_WAIT_MS 50   /* an idle worker given EOF this long to exit, then
                               SIGKILL (it holds no job; stopped, say)        */
/* After an abort (the daemon is stopping) we wait at most this long for the
 * fifos of a killed action: a grandchild that escaped with setsid() may hold
 * them for ever, and the daemon must stop within 2 s (docs/COMPATIBILITY.md). */
#define ABORT_GRACE_MS 100

enum { ST_PENDING = 0, ST_RUNNING = 1, ST_DONE = 2 };

struct worker {
    pid_t pid;            /* 0: no worker in this slot                      */
    char *const *envp;    /* the environment it was started with            */
    int in_fd;            /* its stdin: commands, ours non-blocking         */
    int st_fd;            /* its stdout: one exit status line per action    */
    int pid_fd;           /* -1 until needed (died with its fifos closed)   */
    char *wbuf;           /* command text not yet written to in_fd          */
    size_t wlen, woff;
    char line[48];        /* status line being read: "STATUS JOB"           */
    size_t line_len;
    int gone;             /* st_fd at EOF: the worker exited or is exiting  */
    int has_job;
    size_t job;
    int out_fd, err_fd;   /* the job's fifos (read ends)                    */
    int have_status;      /* the worker reported the job's exit status      */
    int status;
    int killed;
    int64_t deadline;     /* timeout, then (killed) end of the grace        */
    int64_t linger_at;    /* 0, or: status in, fifos still open; close them
                             and kill the group at this time (linger_ms)    */
    int lingered;         /* ended so: report the status line's status      */
    int p_in, p_st, p_out, p_err, p_pid;  /* this round's pollfd indexes    */
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

/* Moves fd above 2 (our own stdio may be closed): the worker's dup2()s onto
 * 0, 1 and 2 must not clobber one another's source. Returns fd or -1. */
static int above_stdio(int fd)
{
    int moved;
    if (fd > 2)
        return fd;
    moved = fcntl(fd, F_DUPFD_CLOEXEC, 3);
    close(fd);
    return moved;
}

/* Appends s to out as one single-quoted shell word (with a blank before s
 * inside the quotes when blank is set); returns the new end. */
static char *put_quoted(char *out, const char *s, int blank)
{
    *out++ = '\'';
    if (blank)
        *out++ = ' ';
    for (; *s; s++) {
        if (*s == '\'') {
            memcpy(out, "'\\''", 4);
            out += 4;
        } else {
            *out++ = *s;
        }
    }
    *out++ = '\'';
    return out;
}

static size_t quoted_len(const char *s)
{
    size_t n = 2;
    for (; *s; s++)
        n += *s == '\'' ? 4 : 1;
    return n;
}

static void fifo_path(char *buf, size_t size, const char *prefix, size_t job, char kind)
{
    snprintf(buf, size, "%s%zu%c", prefix, job, kind);
}

/* Adds fd (if open) to this round's poll set; its index there, or -1. */
static int watch(struct pollfd *pfds, nfds_t *np, int fd, short events)
{
    if (fd < 0)
        return -1;
    pfds[*np].fd = fd;
    pfds[*np].events = events;
    pfds[*np].revents = 0;
    return (int)(*np)++;
}

/* Starts a worker for envp; returns 0 or an errno value. */
static int spawn_worker(struct worker *w, const char *shell, char *const *envp,
                        const posix_spawnattr_t *attr, int devnull)
{
    int cmd[2], st[2], rc;
    posix_spawn_file_actions_t fa;
    char *argv[3];

    if (pipe2(cmd, O_CLOEXEC) != 0)
        return errno;
    if (pipe2(st, O_CLOEXEC) != 0) {
        rc = errno;
        close(cmd[0]);
        close(cmd[1]);
        return rc;
    }
    cmd[0] = above_stdio(cmd[0]);
    st[1] = above_stdio(st[1]);
    if (cmd[0] < 0 || st[1] < 0) {
        rc = errno ? errno : EMFILE;
        goto fail;
    }
    rc = posix_spawn_file_actions_init(&fa);
    if (rc != 0)
        goto fail;
    rc = posix_spawn_file_actions_adddup2(&fa, cmd[0], 0);
    if (rc == 0)
        rc = posix_spawn_file_actions_adddup2(&fa, st[1], 1);
    /* One /dev/null per batch (above 2, see vh_run_batch): saves an open(). */
    if (rc == 0 && devnull >= 0)
        rc = posix_spawn_file_actions_adddup2(&fa, devnull, 2);
    else if (rc == 0)
        rc = posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
    if (rc == 0) {
        argv[0] = (char *)"sh";
        argv[1] = (char *)"-s";
        argv[2] = NULL;
        rc = posix_spawn(&w->pid, shell, &fa, attr, argv, envp);
    }
    posix_spawn_file_actions_destroy(&fa);
    if (rc != 0)
        goto fail;
    close(cmd[0]);
    close(st[1]);
    /* Ours non-blocking: a long command is written as the worker reads it,
     * a status line read as it comes; the worker's ends stay blocking. */
    fcntl(cmd[1], F_SETFL, O_NONBLOCK);
    fcntl(st[0], F_SETFL, O_NONBLOCK);
    w->in_fd = cmd[1];
    w->st_fd = st[0];
    w->pid_fd = -1;
    w->envp = envp;
    w->gone = 0;
    w->line_len = 0;
    return 0;
fail:
    w->pid = 0;
    if (cmd[0] >= 0)
        close(cmd[0]);
    close(cmd[1]);
    close(st[0]);
    if (st[1] >= 0)
        close(st[1]);
    return rc;
}

/* Writes what the worker's pipe takes of the pending command. */
static void push_command(struct worker *w)
{
    while (w->wbuf && w->woff < w->wlen) {
        ssize_t n = write(w->in_fd, w->wbuf + w->woff, w->wlen - w->woff);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                return;
            break;  /* EPIPE: the worker is gone; its st_fd says so */
        }
        w->woff += (size_t)n;
    }
    free(w->wbuf);
    w->wbuf = NULL;
}

/* Gives job (already holding a slot) to worker w: fifos, then the command.
 * Returns 0 or an errno value (nothing left behind). */
static int start_job(struct worker *w, size_t job, const struct vh_job *j,
                     const char *prefix, char *path_o, char *path_e, size_t path_size)
{
    size_t len;
    char *p;
    int rc;

    fifo_path(path_o, path_size, prefix, job, 'o');
    fifo_path(path_e, path_size, prefix, job, 'e');
    if (mkfifo(path_o, 0600) != 0)
        return errno;
    if (mkfifo(path_e, 0600) != 0) {
        rc = errno;
        unlink(path_o);
        return rc;
    }
    /* Read ends first, non-blocking: the subshell's open for writing then
     * succeeds at once instead of waiting for us. */
    w->out_fd = open(path_o, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    w->err_fd = w->out_fd < 0 ? -1 : open(path_e, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    /* + the fixed text (~35 bytes) and the job index (<= 20 digits). */
    len = quoted_len(j->command) + 1 + quoted_len(path_o) + quoted_len(path_e) + 96;
    w->wbuf = w->err_fd < 0 ? NULL : malloc(len);
    if (!w->wbuf) {
        rc = w->err_fd < 0 ? errno : ENOMEM;
        close_fd(&w->out_fd);
        close_fd(&w->err_fd);
        unlink(path_o);
        unlink(path_e);
        return rc;
    }
    p = w->wbuf;
    /* The blank: an action starting with '-' must not be an option of
     * eval (bash's eval takes options); leading blanks mean nothing. */
    memcpy(p, "( eval ", 7);
    p = put_quoted(p + 7, j->command, 1);
    memcpy(p, " ) 2>", 5);
    p = put_quoted(p + 5, path_e, 0);
    *p++ = '>';
    p = put_quoted(p, path_o, 0);
    /* The job index with the status: a line some action forged on the
     * worker's stdout (/proc/$$/fd/1) cannot end another job. */
    p += sprintf(p, " </dev/null; echo \"$? %zu\"\n", job);
    w->wlen = (size_t)(p - w->wbuf);
    w->woff = 0;
    w->has_job = 1;
    w->job = job;
    w->have_status = 0;
    w->status = 0;
    w->killed = 0;
    w->linger_at = 0;
    w->lingered = 0;
    push_command(w);
    return 0;
}

/* Kills the worker's process group: the action, its children, the worker. */
static void kill_worker(struct worker *w, int64_t now, int grace_ms)
{
    if (w->killed)
        return;
    w->killed = 1;
    w->deadline = now + (int64_t)grace_ms * 1000000;
    free(w->wbuf);
    w->wbuf = NULL;
    close_fd(&w->in_fd);
    if (killpg(w->pid, SIGKILL) != 0 && errno == EPERM) {
        /* A setuid program in the group: kill at least our shells. */
        kill(w->pid, SIGKILL);
    }
}

/* One read from a readable fifo/pipe; closes it at EOF or error. */
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

static void drain_job(struct worker *w, const struct vh_job *j, struct vh_result *r,
                      unsigned char *scratch)
{
    if (w->out_fd >= 0)
        drain(&w->out_fd, scratch, j->out, j->out_cap, &r->out_len, &r->out_total);
    if (w->err_fd >= 0)
        drain(&w->err_fd, scratch, j->err, j->err_cap, &r->err_len, &r->err_total);
}

/* Reads status lines; at EOF marks the worker gone. */
static void read_status(struct worker *w)
{
    char buf[64];
    int status;
    size_t job;
    for (;;) {
        ssize_t n = read(w->st_fd, buf, sizeof buf);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                return;
            n = 0;
        }
        if (n == 0) {
            close_fd(&w->st_fd);
            w->gone = 1;
            return;
        }
        for (ssize_t k = 0; k < n; k++) {
            if (buf[k] != '\n') {
                if (w->line_len < sizeof w->line - 1)
                    w->line[w->line_len++] = buf[k];
                continue;
            }
            w->line[w->line_len] = '\0';
            w->line_len = 0;
            if (w->has_job && !w->have_status
                && sscanf(w->line, "%d %zu", &status, &job) == 2 && job == w->job) {
                w->have_status = 1;
                w->status = status & 0xff;
            }
        }
    }
}

/* Try to reap the worker; 1 when it is gone (status recorded if we got it). */
static int reap(struct worker *w, struct vh_result *r)
{
    int status;
    pid_t got;
    do {
        got = waitpid(w->pid, &status, WNOHANG);
    } while (got < 0 && errno == EINTR);
    if (got == w->pid) {
        if (r) {
            r->status = status;
            r->flags |= VH_REAPED;
        }
        return 1;
    }
    /* ECHILD: reaped by someone else; the status is lost, the worker is over. */
    return got < 0;
}

/* Forgets a dead (or abandoned) worker: its slot can start a new one. */
static void drop_worker(struct worker *w)
{
    free(w->wbuf);
    w->wbuf = NULL;
    close_fd(&w->in_fd);
    close_fd(&w->st_fd);
    close_fd(&w->pid_fd);
    w->pid = 0;
}

/* A job ended by its linger: the result is the action's own exit status (the
 * one its status line gave), not the worker's SIGKILL. */
static void settle_lingered(const struct worker *w, struct vh_result *r)
{
    if (w->lingered) {
        r->status = w->status << 8;
        r->flags |= VH_REAPED;
    }
}

/* Ends w's job: fifos removed and closed, result published. */
static void finish_job(struct worker *w, struct vh_result *results, unsigned char *state,
                       struct vh_shared *sh, const char *prefix, char *path,
                       size_t path_size, int64_t now)
{
    /* Unlink before closing: a late opener then fails (ENOENT) instead of
     * blocking for ever on a fifo nobody reads. */
    fifo_path(path, path_size, prefix, w->job, 'o');
    unlink(path);
    fifo_path(path, path_size, prefix, w->job, 'e');
    unlink(path);
    close_fd(&w->out_fd);
    close_fd(&w->err_fd);
    w->has_job = 0;
    state[w->job] = ST_DONE;
    give_slot(sh);
    /* Last, and atomically: a cancelled caller polls end_ns != 0 to know
     * that the action is over (its worker killed and reaped if it was
     * killed) and the gauge already down. */
    __atomic_store_n(&results[w->job].end_ns, now, __ATOMIC_RELEASE);
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

/* End of the batch: every worker gets EOF on its commands and is reaped. */
static void retire_workers(struct worker *ws, unsigned n)
{
    int64_t give_up = now_ns() + (int64_t)RETIRE_WAIT_MS * 1000000;
    unsigned left;

    for (unsigned i = 0; i < n; i++) {
        close_fd(&ws[i].in_fd);
        close_fd(&ws[i].st_fd);
    }
    do {
        left = 0;
        for (unsigned i = 0; i < n; i++) {
            if (ws[i].pid && reap(&ws[i], NULL))
                drop_worker(&ws[i]);
            if (ws[i].pid)
                left++;
        }
        if (left) {
            struct timespec ms = {0, 1000000};
            nanosleep(&ms, NULL);
        }
    } while (left && now_ns() < give_up);
    for (unsigned i = 0; i < n; i++) {
        if (!ws[i].pid)
            continue;
        /* Stopped or wedged: it holds no job. The worker only, not its
         * group: what earlier actions left running is not ours to end,
         * as with upstream's popen(). */
        kill(ws[i].pid, SIGKILL);
        while (waitpid(ws[i].pid, NULL, 0) < 0 && errno == EINTR)
            ;
        drop_worker(&ws[i]);
    }
}

/* The idle worker for envp, else a free slot, else an idle worker with
 * another environment (retired: the jobs of one batch rarely differ). */
static struct worker *pick_worker(struct worker *ws, unsigned n, char *const *envp)
{
    struct worker *empty = NULL, *other = NULL;
    for (unsigned i = 0; i < n; i++) {
        struct worker *w = &ws[i];
        if (w->pid && w->gone && !w->has_job && reap(w, NULL))
            drop_worker(w);  /* died between actions (killed from outside) */
        if (!w->pid) {
            if (!empty)
                empty = w;
        } else if (!w->has_job && !w->gone && !w->wbuf) {
            if (w->envp == envp)
                return w;
            if (!other)
                other = w;
        }
    }
    if (empty)
        return empty;
    if (other)
        retire_workers(other, 1);
    return other;
}

/* ---- the batch, in phases ---------------------------------------------
 *
 * vh_run_batch() is prepare, then rounds of (deadlines, start, collect,
 * wait, events) until every job is done, then release: the one cleanup
 * path, also taken when prepare fails halfway. */

struct batch {
    const char *shell, *prefix;
    const struct vh_job *jobs;
    size_t njobs;
    struct vh_shared *shared;
    const struct vh_limits *lim;
    int abort_fd;
    struct vh_result *results;

    unsigned max_local;       /* worker slots of this batch                   */
    unsigned nbusy;           /* slots with a job                             */
    size_t next, ndone;       /* next job to start; jobs done                 */
    struct worker *ws;
    struct pollfd *pfds;
    unsigned char *scratch;   /* one read's buffer                            */
    unsigned char *state;     /* ST_* per job                                 */
    unsigned char *abort_req; /* per job: abort requested                     */
    char *path_o, *path_e;    /* fifo path buffers                            */
    size_t path_size;
    posix_spawnattr_t attr;
    int have_attr;
    int devnull;              /* -1: each worker opens it                     */
    int all_aborted, abort_ready;
    int abort_at;             /* this round's pollfd index of abort_fd        */
};

/* Allocations, spawn attributes, /dev/null; 0 or -errno. What was set up
 * is released by batch_release() either way. */
static int batch_prepare(struct batch *b)
{
    int rc;

    b->devnull = -1;
    b->abort_ready = 1;
    b->max_local = b->lim->max_running ? b->lim->max_running : 1;
    if (b->max_local > b->njobs)
        b->max_local = (unsigned)b->njobs;
    rc = setup_attr(&b->attr);
    if (rc != 0)
        return -rc;
    b->have_attr = 1;
    b->path_size = strlen(b->prefix) + 32;
    b->ws = calloc(b->max_local, sizeof *b->ws);
    if (b->ws) {
        for (unsigned i = 0; i < b->max_local; i++) {
            struct worker *w = &b->ws[i];
            w->in_fd = w->st_fd = w->pid_fd = w->out_fd = w->err_fd = -1;
        }
    }
    b->pfds = calloc(5 * (size_t)b->max_local + 1, sizeof *b->pfds);
    b->scratch = malloc(READ_CHUNK);
    b->state = calloc(b->njobs, 2);
    b->path_o = malloc(2 * b->path_size);
    if (!b->ws || !b->pfds || !b->scratch || !b->state || !b->path_o)
        return -ENOMEM;
    b->path_e = b->path_o + b->path_size;
    b->abort_req = b->state + b->njobs;
    /* Below 3 (our own stdio was closed) the worker's dup2 onto 0 or 1
     * would clobber it first: do not use it. */
    b->devnull = open("/dev/null", O_WRONLY | O_CLOEXEC);
    if (b->devnull >= 0 && b->devnull < 3) {
        close(b->devnull);
        b->devnull = -1;
    }
    return 0;
}

/* The one cleanup: workers retired and reaped, everything freed. */
static void batch_release(struct batch *b)
{
    if (b->ws)
        retire_workers(b->ws, b->max_local);
    if (b->devnull >= 0)
        close(b->devnull);
    free(b->ws);
    free(b->pfds);
    free(b->scratch);
    free(b->state);
    free(b->path_o);
    if (b->have_attr)
        posix_spawnattr_destroy(&b->attr);
}

/* Job done (its fifos closed): result published, slot given back. */
static void batch_job_done(struct batch *b, struct worker *w, int64_t now)
{
    finish_job(w, b->results, b->state, b->shared, b->prefix, b->path_o, b->path_size, now);
    b->nbusy--;
    b->ndone++;
}

/* Aborts, timeouts, lingering output, and the end of kill graces. */
static void batch_deadlines(struct batch *b, int64_t now)
{
    const struct vh_limits *lim = b->lim;

    for (unsigned i = 0; i < b->max_local; i++) {
        struct worker *w = &b->ws[i];
        struct vh_result *r;
        if (!w->has_job)
            continue;
        r = &b->results[w->job];
        if (!w->killed && (b->all_aborted || b->abort_req[w->job])) {
            r->flags |= VH_ABORTED;
            kill_worker(w, now,
                        lim->kill_grace_ms < ABORT_GRACE_MS ? lim->kill_grace_ms
                                                            : ABORT_GRACE_MS);
        } else if (!w->killed && now >= w->deadline) {
            r->flags |= VH_TIMEOUT;
            kill_worker(w, now, lim->kill_grace_ms);
        } else if (!w->killed && w->linger_at && now >= w->linger_at) {
            /* The action has exited but something it started still holds
             * its output open (`sleep 1000 &`, 50 background children).
             * Upstream's read() would wait for ever; we take what was read,
             * close the fifos (a writer that escaped the group dies of
             * SIGPIPE at its next write) and kill what it left in the
             * worker's process group, the worker with it (the next action
             * gets a fresh one). */
            drain_job(w, &b->jobs[w->job], r, b->scratch);
            close_fd(&w->out_fd);
            close_fd(&w->err_fd);
            r->flags |= VH_LINGERED;
            w->lingered = 1;
            kill_worker(w, now, lim->kill_grace_ms);
        } else if (w->killed && now >= w->deadline) {
            /* Grace over: stop waiting for fifos a stray process holds. */
            if (!reap(w, r))
                r->flags |= VH_UNREAPED;
            settle_lingered(w, r);
            batch_job_done(b, w, now);
            drop_worker(w);
        }
    }
}

/* The next job never runs (aborted before its start, or its spawn failed). */
static void batch_skip(struct batch *b)
{
    b->state[b->next++] = ST_DONE;
    b->ndone++;
}

/* Starts what the bounds allow; 1 when starved (no worker or no slot yet). */
static int batch_start(struct batch *b, int64_t now)
{
    while (b->next < b->njobs && b->nbusy < b->max_local) {
        size_t job = b->next;
        struct vh_result *r = &b->results[job];
        struct worker *w;
        int rc;
        if (b->all_aborted || b->abort_req[job]) {
            r->flags |= VH_ABORTED;
            r->start_ns = r->end_ns = now;
            batch_skip(b);
            continue;
        }
        w = pick_worker(b->ws, b->max_local, b->jobs[job].envp);
        if (!w)
            return 1;  /* the free slot's worker died, not reaped yet: look again */
        if (!take_slot(b->shared))
            return 1;
        r->start_ns = now_ns();
        rc = w->pid ? 0 : spawn_worker(w, b->shell, b->jobs[job].envp, &b->attr, b->devnull);
        if (rc == 0)
            rc = start_job(w, job, &b->jobs[job], b->prefix, b->path_o, b->path_e,
                           b->path_size);
        if (rc != 0 && b->nbusy > 0
            && (rc == EMFILE || rc == ENFILE || rc == EAGAIN || rc == ENOMEM)) {
            /* Out of fds or processes for now: the running actions free
             * some as they end. Retry then rather than fail the rest. */
            give_slot(b->shared);
            return 1;
        }
        if (rc != 0) {
            r->flags |= VH_SPAWN_ERROR;
            r->error = rc;
            r->end_ns = r->start_ns;
            give_slot(b->shared);
            batch_skip(b);
            continue;
        }
        r->pid = w->pid;
        r->flags |= VH_STARTED;
        w->deadline = r->start_ns + (int64_t)b->lim->timeout_ms * 1000000;
        b->state[b->next++] = ST_RUNNING;
        b->nbusy++;
    }
    return 0;
}

/* Jobs whose fifos are at EOF: done once the status is in, or once the
 * worker (dead, or killed) is reaped. Returns 1 when a job finished; sets
 * *tick when a dead worker must be polled for (no pidfd). */
static int batch_collect(struct batch *b, int *tick)
{
    int64_t now = now_ns();
    int finished = 0;

    for (unsigned i = 0; i < b->max_local; i++) {
        struct worker *w = &b->ws[i];
        struct vh_result *r;
        if (!w->has_job || w->out_fd >= 0 || w->err_fd >= 0)
            continue;
        r = &b->results[w->job];
        if (w->have_status && !w->killed) {
            /* The same wait status `sh -c` exiting with $? would give. */
            r->status = w->status << 8;
            r->flags |= VH_REAPED;
            batch_job_done(b, w, now);
        } else if (w->gone || w->killed) {
            if (!reap(w, r)) {
                if (w->pid_fd < 0)
                    w->pid_fd = open_pidfd(w->pid);
                if (w->pid_fd < 0)
                    *tick = 1;
                continue;
            }
            settle_lingered(w, r);
            drop_worker(w);
            batch_job_done(b, w, now);
        } else {
            continue;
        }
        finished = 1;
    }
    return finished;
}

/* Sleeps until output, a status, an exit, an abort or a deadline; 1 when
 * poll() reported events (they are in b->pfds). */
static int batch_wait(struct batch *b, int starved, int tick)
{
    int64_t now = now_ns(), wake = INT64_MAX;
    int timeout_ms;
    nfds_t np = 0;

    for (unsigned i = 0; i < b->max_local; i++) {
        struct worker *w = &b->ws[i];
        w->p_in = w->p_st = w->p_out = w->p_err = w->p_pid = -1;
        if (!w->pid)
            continue;
        if (w->has_job && w->deadline < wake)
            wake = w->deadline;
        if (w->has_job && !w->killed && w->linger_at && w->linger_at < wake)
            wake = w->linger_at;
        w->p_in = w->wbuf ? watch(b->pfds, &np, w->in_fd, POLLOUT) : -1;
        w->p_st = watch(b->pfds, &np, w->st_fd, POLLIN);
        w->p_out = watch(b->pfds, &np, w->out_fd, POLLIN);
        w->p_err = watch(b->pfds, &np, w->err_fd, POLLIN);
        /* Readable = exited: the collect phase reaps it next round. */
        w->p_pid = watch(b->pfds, &np, w->pid_fd, POLLIN);
    }
    b->abort_at = watch(b->pfds, &np, b->abort_fd, POLLIN);
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
    return poll(b->pfds, np, timeout_ms) > 0;  /* timeout or EINTR: checks run again */
}

/* What poll() reported: commands pushed, status lines, output, overflow. */
static void batch_events(struct batch *b)
{
    const struct vh_limits *lim = b->lim;
    struct pollfd *pfds = b->pfds;

    if (b->abort_at >= 0 && pfds[b->abort_at].revents)
        b->abort_ready = 1;
    for (unsigned i = 0; i < b->max_local; i++) {
        struct worker *w = &b->ws[i];
        const struct vh_job *j;
        struct vh_result *r;
        int probe = 0;
        if (!w->pid)
            continue;
        if (w->p_in >= 0 && pfds[w->p_in].revents)
            push_command(w);
        if (w->p_st >= 0 && pfds[w->p_st].revents) {
            int had = w->have_status, was_gone = w->gone;
            read_status(w);
            /* The subshell has ended (status) or the worker has: a fifo
             * it never opened will never report EOF by itself. */
            probe = (w->have_status && !had) || (w->gone && !was_gone);
            if (w->have_status && !had && w->has_job && lim->linger_ms >= 0)
                w->linger_at = now_ns() + (int64_t)lim->linger_ms * 1000000;
        }
        if (!w->has_job)
            continue;
        j = &b->jobs[w->job];
        r = &b->results[w->job];
        if (probe) {
            drain_job(w, j, r, b->scratch);
        } else {
            if (w->p_out >= 0 && pfds[w->p_out].revents)
                drain(&w->out_fd, b->scratch, j->out, j->out_cap, &r->out_len, &r->out_total);
            if (w->p_err >= 0 && pfds[w->p_err].revents)
                drain(&w->err_fd, b->scratch, j->err, j->err_cap, &r->err_len, &r->err_total);
        }
        if (!w->killed && (r->out_total > lim->max_output || r->err_total > lim->max_output)) {
            r->flags |= VH_OVERFLOW;
            kill_worker(w, now_ns(), lim->kill_grace_ms);
        }
    }
}

int vh_run_batch(const char *shell, const char *fifo_prefix,
                 const struct vh_job *jobs, size_t njobs,
                 struct vh_shared *shared, const struct vh_limits *lim,
                 int abort_fd, struct vh_result *results)
{
    struct batch b;
    int rc;

    memset(results, 0, njobs * sizeof *results);
    if (njobs == 0)
        return 0;
    memset(&b, 0, sizeof b);
    b.shell = shell;
    b.prefix = fifo_prefix;
    b.jobs = jobs;
    b.njobs = njobs;
    b.shared = shared;
    b.lim = lim;
    b.abort_fd = abort_fd;
    b.results = results;
    rc = batch_prepare(&b);
    while (rc == 0 && b.ndone < b.njobs) {
        int starved, tick = 0;
        int64_t now;
        /* Only when poll() said so (or first round): saves a failing read
         * per wake-up. */
        if (b.abort_fd >= 0 && b.abort_ready
            && read_aborts(&b.abort_fd, b.state, b.njobs, b.abort_req))
            b.all_aborted = 1;
        b.abort_ready = 0;
        now = now_ns();
        batch_deadlines(&b, now);
        starved = batch_start(&b, now);
        if (batch_collect(&b, &tick) && b.ndone < b.njobs && b.next < b.njobs)
            continue;  /* workers were freed: start the next jobs first */
        if (b.ndone >= b.njobs)
            break;
        if (batch_wait(&b, starved, tick))
            batch_events(&b);
    }
    batch_release(&b);
    return rc;
}

int vh_set_child_subreaper(int on)
{
    if (prctl(PR_SET_CHILD_SUBREAPER, on ? 1 : 0, 0, 0, 0) != 0)
        return -errno;
    return 0;
}
