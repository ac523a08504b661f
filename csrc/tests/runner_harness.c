/*
 * runner_harness.c - drives csrc/runner.c's vh_run_batch() from C, for
 * tests/host/sources/test_runner_sanitized.py, which builds it with
 * AddressSanitizer and UndefinedBehaviorSanitizer (test-only: not shipped).
 *
 * One batch of every kind of ending (exit 0, exit status, timeout, output
 * overflow, lingering background child, an action killing its worker), one
 * batch whose shell cannot be spawned, and an empty batch. Prints one line
 * per job: "JOB FLAGS EXIT-STATUS FIRST-LINE" (FLAGS without VH_STARTED, EXIT-STATUS
 * -1 when not exited); exits 0 when every call returned 0 and the shared
 * counter is back where it started.
 */

#include <signal.h>
#include <stdint.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "runner.h"

extern char **environ;

#define MAX_JOBS 8

static int run(const char *root, const char *shell, const char **cmds, size_t n)
{
    struct vh_job jobs[MAX_JOBS];
    struct vh_result res[MAX_JOBS];
    static unsigned char out[MAX_JOBS][256], err[MAX_JOBS][64];
    struct vh_shared shared = {4, 0};
    struct vh_limits lim = {2000, 200, 5000, 2, 100};
    char dir[4096], prefix[4200];
    int rc;

    snprintf(dir, sizeof dir, "%s/fifosXXXXXX", root);
    if (!mkdtemp(dir))
        return -1;
    snprintf(prefix, sizeof prefix, "%s/", dir);
    for (size_t i = 0; i < n; i++) {
        jobs[i].command = cmds[i];
        jobs[i].envp = environ;
        jobs[i].out = out[i];
        jobs[i].out_cap = sizeof out[i];
        jobs[i].err = err[i];
        jobs[i].err_cap = sizeof err[i];
    }
    rc = vh_run_batch(shell, prefix, jobs, n, &shared, &lim, -1, res);
    for (size_t i = 0; i < n; i++) {
        int code = (res[i].flags & VH_REAPED) && WIFEXITED(res[i].status)
                       ? WEXITSTATUS(res[i].status) : -1;
        size_t len = res[i].out_len;
        for (size_t k = 0; k < len; k++) {
            if (out[i][k] == '\n') {
                len = k;  /* the first line only */
                break;
            }
        }
        printf("%zu %d %d %.*s\n", i, res[i].flags & ~VH_STARTED, code, (int)len,
               (char *)out[i]);
    }
    if (shared.running != 0 || shared.slots != 4)
        rc = -1000;  /* the shared counter must be back where it started */
    rmdir(dir);
    return rc;
}

int main(int argc, char **argv)
{
    const char *cmds[] = {
        "echo one", "exit 3", "sleep 5", "yes | head -c 100000",
        "sleep 100 & echo bg", "kill -9 $$", "echo seven",
    };
    int rc = 0;

    if (argc != 2)
        return 2;
    signal(SIGPIPE, SIG_IGN);  /* as the Python daemon has it */
    rc |= run(argv[1], "/bin/sh", cmds, 7);
    rc |= run(argv[1], "/nonexistent/shell", cmds, 2);
    rc |= run(argv[1], "/bin/sh", cmds, 0);
    return rc != 0;
}
