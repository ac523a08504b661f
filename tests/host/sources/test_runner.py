"""vhostmd_py.sources.shell.runner: real /bin/sh children, and substituted commands run by them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest
from helpers.procs import alive
from helpers.vms import vm_named
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhostmd_py.errors import ActionError
from vhostmd_py.sources.shell import VALUE_CAP
from vhostmd_py.sources.shell.runner import ActionResult, ActionRunner
from vhostmd_py.sources.shell.substitution import substitute

NASTY_NAMES = [
    "$(touch X)",
    "a;touch Y",
    "UUID",
    "NAME VMID",
    "it's",
    "back`touch Z`quote",
    "new\nline",
    'dq"$(touch W)"\\',
    "tab\there",
    "*",
    "~root",
    "-n",
    "ID",
    "",
]
PATH = "/usr/sbin:/sbin:/usr/bin:/bin"


def _run(command: str, runner: ActionRunner | None = None, cap: int = VALUE_CAP) -> ActionResult:
    runner = runner or ActionRunner(path=PATH, timeout=10)

    async def main() -> ActionResult:
        return await runner.run(command, cap=cap)

    return asyncio.run(main())


# --- substituted commands run by a real sh (substitution alone: test_substitution) ---


def test_eval_with_quoting_would_have_run_code(tmp_path: Path) -> None:
    """Why eval is refused: quoting for our sh alone does not stop eval from running the name."""
    quoted = "eval echo " + shlex.quote(f"a;touch {tmp_path}/INJECTED")
    assert _run(quoted).ok
    assert os.listdir(tmp_path) == ["INJECTED"]


@pytest.mark.parametrize("name", NASTY_NAMES)
def test_nasty_names_echo_exactly(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real sh: unquoted a name prints exactly; in quotes it prints or is refused; nothing runs."""
    monkeypatch.chdir(tmp_path)
    vm = vm_named(name)
    runner = ActionRunner(path=PATH, timeout=10, uri="test:///default")
    unquoted = ["printf '%s|' NAME", "printf '%s|' x-NAME-y", "(printf '%s|' NAME)"]
    quoted = [
        "printf '%s|' 'NAME'",
        "printf '%s|' \"NAME\"",
        "printf '%s|' 'pre NAME post'",
        "printf '%s|' \"pre NAME post\"",
    ]
    actions = list(unquoted)
    expected = [name, f"x-{name}-y", name]
    safe = substitute("NAME", vm, None) == name  # inserted verbatim, as upstream
    for action, want in zip(quoted, [name, name, f"pre {name} post", f"pre {name} post"]):
        if safe:
            actions.append(action)
            expected.append(want)
        else:
            with pytest.raises(ActionError, match="quoted text may be code"):
                substitute(action, vm, runner.uri)

    async def main() -> List[ActionResult]:
        return list(
            await asyncio.gather(
                *(runner.run(substitute(a, vm, runner.uri), cap=4096) for a in actions)
            )
        )

    results = asyncio.run(main())
    for action, want, result in zip(actions, expected, results):
        assert result.ok, (action, result)
        assert result.stdout == f"{want}|".encode(), action
    assert sorted(os.listdir(tmp_path)) == []


# --- running -----------------------------------------------------------------------


def test_exit_status_and_output() -> None:
    """stdout is captured; exit 0 is ok, anything else is a failure with its status."""
    ok = _run("echo 42")
    assert ok.ok and ok.returncode == 0 and ok.stdout == b"42\n" and ok.failure() is None
    bad = _run("echo partial; echo oops >&2; exit 3")
    assert not bad.ok
    assert bad.returncode == 3
    assert bad.failure() == "exit status 3"
    assert bad.stdout == b"partial\n"
    assert bad.stderr == b"oops\n"


def test_crash_reports_signal() -> None:
    """A child killed by a signal is a failure naming the signal."""
    result = _run("kill -SEGV $$")
    assert result.returncode == -signal.SIGSEGV
    assert result.failure() == "killed by SIGSEGV"


def test_value_cap_and_total_size() -> None:
    """Only the first CAP bytes are kept (upstream's 255); the rest is read and counted."""
    result = _run("head -c 300000 /dev/zero | tr '\\0' x")
    assert result.ok
    assert result.stdout == b"x" * 255
    assert result.stdout_size == 300000


def test_megabytes_of_output_killed() -> None:
    """Output past max_output kills the action: no hang, no memory blow-up."""
    runner = ActionRunner(path=PATH, timeout=20, max_output=1 << 20)
    result = _run("yes xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx", runner)
    assert result.overflow and not result.ok
    assert len(result.stdout) == VALUE_CAP
    assert result.stdout_size > 1 << 20
    assert "output exceeds the limit" in (result.failure() or "")


def test_stderr_bounded() -> None:
    """stderr is captured up to stderr_cap bytes for the log."""
    runner = ActionRunner(path=PATH, timeout=10, stderr_cap=100)
    result = _run("head -c 50000 /dev/zero >&2; exit 1", runner)
    assert result.returncode == 1
    assert result.stderr == b"\0" * 100


def test_binary_output_is_bytes() -> None:
    """Binary garbage comes back byte for byte (the collector decides)."""
    result = _run("printf 'a\\000b\\377\\200'")
    assert result.stdout == b"a\x00b\xff\x80"


@pytest.mark.parametrize("max_concurrency", [1, 8])
def test_timeout_kills_whole_tree(max_concurrency: int, tmp_path: Path) -> None:
    """A hung action is killed at the timeout, its background children too."""
    runner = ActionRunner(path=PATH, timeout=0.5, max_concurrency=max_concurrency)
    pidfile = tmp_path / "child.pid"
    start = time.monotonic()
    result = _run(f"sleep 60 & echo $! > {pidfile}; wait", runner)
    elapsed = time.monotonic() - start
    assert result.timed_out and not result.ok
    assert result.returncode == -signal.SIGKILL
    assert "timed out" in (result.failure() or "")
    assert elapsed < 10  # safety bound only: 0.5 s timeout
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child)


@pytest.mark.slow  # over 1.5 s: not in the fast tier
def test_escaped_grandchild_does_not_hold_the_cycle(tmp_path: Path) -> None:
    """A grandchild that left the session keeps our pipe open: we give up after the grace."""
    runner = ActionRunner(path=PATH, timeout=0.5)
    pidfile = tmp_path / "escapee.pid"
    start = time.monotonic()
    result = _run(f"setsid sleep 60 & echo $! > {pidfile}; wait", runner)
    elapsed = time.monotonic() - start
    escapee = int(pidfile.read_text())
    try:
        assert result.timed_out and not result.ok
        assert elapsed < 10  # 0.5 s timeout + 2 s grace; safety bound only
    finally:
        os.kill(escapee, signal.SIGKILL)


@pytest.mark.parametrize("max_concurrency", [1, 8])
def test_child_environment(max_concurrency: int, tmp_path: Path) -> None:
    """New session, stdin /dev/null, PATH from the config, env inherited, SIGPIPE default."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "my-metric"
    script.write_text("#!/bin/sh\necho from-my-metric\n")
    script.chmod(0o755)
    runner = ActionRunner(
        path=f"{bindir}:{PATH}",
        timeout=10,
        environ={"VHOSTMD_TEST_VAR": "kept", "PATH": "/nowhere"},
        max_concurrency=max_concurrency,
    )
    command = (
        "my-metric; echo $PATH; echo $VHOSTMD_TEST_VAR; cat; "
        "echo $$ $(cut -d' ' -f6 /proc/$$/stat); grep SigIgn /proc/$$/status"
    )
    result = _run(command, runner, cap=4096)
    assert result.ok, result
    lines = result.stdout.decode().splitlines()
    assert lines[0] == "from-my-metric"
    assert lines[1] == f"{bindir}:{PATH}"
    assert lines[2] == "kept"
    pid, sid = lines[3].split()
    assert pid == sid  # the shell leads its own session: killpg reaches its tree
    ignored = int(lines[4].split()[1], 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1))


def test_sigpipe_ends_pipelines() -> None:
    """`yes | head -1` ends because yes dies of SIGPIPE (Python ignores it, children must not)."""
    result = _run("yes | head -1")
    assert result.ok and result.stdout == b"y\n"


@pytest.mark.slow  # over 1.5 s: not in the fast tier
def test_concurrency_bound_and_serial() -> None:
    """At most max_concurrency actions run at once; 1 runs them one after another."""

    async def main(limit: int) -> float:
        runner = ActionRunner(path=PATH, timeout=10, max_concurrency=limit)
        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, runner.running)
                await asyncio.sleep(0.01)

        watcher = asyncio.ensure_future(watch())
        start = time.monotonic()
        await asyncio.gather(*(runner.run("sleep 0.3") for _ in range(6)))
        elapsed = time.monotonic() - start
        watcher.cancel()
        assert peak <= limit
        return elapsed

    assert asyncio.run(main(1)) >= 1.8
    assert asyncio.run(main(2)) >= 0.9


def test_cancellation_kills_children(tmp_path: Path) -> None:
    """Cancelling running actions (daemon stop) kills every child promptly."""
    runner = ActionRunner(path=PATH, timeout=60)
    pids = [tmp_path / f"{i}.pid" for i in range(4)]

    async def main() -> None:
        tasks = [asyncio.ensure_future(runner.run(f"sleep 60 & echo $! > {p}; wait")) for p in pids]
        while not all(p.exists() and p.read_text() for p in pids):
            await asyncio.sleep(0.02)
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results)

    start = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - start < 10
    runner.close()
    for p in pids:
        child = int(p.read_text())
        deadline = time.monotonic() + 2
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not alive(child)


def test_cancel_all_fails_running_actions(tmp_path: Path) -> None:
    """cancel_all() kills running children; their results say cancelled."""
    runner = ActionRunner(path=PATH, timeout=60)

    async def main() -> ActionResult:
        task = asyncio.ensure_future(runner.run("sleep 60"))
        while runner.running == 0:
            await asyncio.sleep(0.01)
        runner.cancel_all()
        return await task

    result = asyncio.run(main())
    assert result.cancelled and not result.ok
    assert result.failure() == "cancelled (daemon stopping)"


@pytest.mark.parametrize("max_concurrency", [1, 8])
def test_spawn_failure_is_a_result(max_concurrency: int) -> None:
    """A missing shell gives a failed result, not an exception."""
    runner = ActionRunner(path=PATH, shell="/nonexistent/sh", max_concurrency=max_concurrency)
    result = _run("echo hi", runner)
    assert not result.ok
    assert "cannot run the shell" in (result.failure() or "")
    assert _run("echo a\x00b").spawn_error == "NUL character in command"


def test_no_fd_leak() -> None:
    """Many actions leave no file descriptors behind."""
    before = len(os.listdir("/proc/self/fd"))
    runner = ActionRunner(path=PATH, timeout=10)

    async def main() -> None:
        await asyncio.gather(*(runner.run("echo 1") for _ in range(50)))
        await asyncio.gather(*(runner.run("exit 1") for _ in range(10)))

    asyncio.run(main())
    runner.close()
    assert len(os.listdir("/proc/self/fd")) == before


def test_invalid_parameters() -> None:
    """Nonsense limits are refused at construction."""
    with pytest.raises(ValueError):
        ActionRunner(timeout=0)
    with pytest.raises(ValueError):
        ActionRunner(max_concurrency=0)


@pytest.mark.slow  # over 1.5 s: not in the fast tier
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    name=st.text(
        alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
        max_size=24,
    )
)
def test_any_name_is_data_never_code(name: str, tmp_path: Path) -> None:
    """Property: whatever the name, unquoted it prints exactly; quoted it prints or is refused."""
    vm = vm_named(name)
    action = "cd CWD && printf '%s|' NAME x-NAME-y".replace("CWD", str(tmp_path))
    try:
        command = substitute(action, vm, None)
    except ActionError:
        pytest.fail(f"refused unquoted, a sure context: {name!r}")
    result = _run(command, cap=4096)
    assert result.ok, (name, result)
    assert result.stdout.decode("utf-8") == f"{name}|x-{name}-y|"
    in_quotes = action + " 'NAME' \"NAME\""
    try:
        command = substitute(in_quotes, vm, None)
    except ActionError as err:
        assert "quoted text may be code" in err.reason
    else:
        result = _run(command, cap=4096)
        assert result.stdout.decode("utf-8") == f"{name}|x-{name}-y|{name}|{name}|"
    assert os.listdir(tmp_path) == []


# --- the C batch runner (csrc/runner.c) -------------------------------------------


def _zombies() -> List[int]:
    """Our children that exited and were never reaped."""
    me = str(os.getpid())
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z" and fields[1] == me:
            found.append(int(entry))
    return found


def _gone(pid: int, within: float = 3.0) -> bool:
    """True when PID no longer exists (killed AND reaped) within WITHIN seconds."""
    deadline = time.monotonic() + within
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.02)
    return not os.path.exists(f"/proc/{pid}")


def test_cancel_all_kills_running_and_skips_queued(tmp_path: Path) -> None:
    """cancel_all(): running children killed and reaped, queued ones never start."""
    runner = ActionRunner(path=PATH, timeout=60, max_concurrency=2)
    log_file = tmp_path / "started"
    cmd = f"echo $$ >> {log_file}; sleep 60 & wait"

    async def main() -> List[ActionResult]:
        tasks = [asyncio.ensure_future(runner.run(cmd)) for _ in range(6)]
        while not (log_file.exists() and len(log_file.read_text().split()) == 2):
            await asyncio.sleep(0.01)
        runner.cancel_all()
        return list(await asyncio.gather(*tasks))

    start = time.monotonic()
    results = asyncio.run(main())
    assert time.monotonic() - start < 10  # safety bound only
    assert all(r.cancelled and not r.ok for r in results)
    assert sum(r.returncode == -signal.SIGKILL for r in results) == 2
    assert sum(r.returncode is None for r in results) == 4  # never started
    shells = [int(p) for p in log_file.read_text().split()]
    assert len(shells) == 2
    assert all(_gone(pid) for pid in shells)
    assert runner.running == 0
    runner.close()


def test_cancelling_one_action_leaves_the_others(tmp_path: Path) -> None:
    """A cancelled run() kills its own child only; the batch's others finish normally."""
    runner = ActionRunner(path=PATH, timeout=30)
    pidfile = tmp_path / "victim.pid"

    async def main() -> List[ActionResult]:
        victim = asyncio.ensure_future(runner.run(f"echo $$ > {pidfile}; exec sleep 60"))
        others = [asyncio.ensure_future(runner.run(f"sleep 0.3; echo {i}")) for i in range(3)]
        while not (pidfile.exists() and pidfile.read_text()):
            await asyncio.sleep(0.01)
        victim.cancel()
        with pytest.raises(asyncio.CancelledError):
            await victim
        return list(await asyncio.gather(*others))

    results = asyncio.run(main())
    assert [r.stdout for r in results] == [b"0\n", b"1\n", b"2\n"]
    assert all(r.ok for r in results)
    assert _gone(int(pidfile.read_text()))
    runner.close()


@pytest.mark.slow  # over 1.5 s: not in the fast tier
def test_many_concurrent_timeouts(tmp_path: Path) -> None:
    """40 hung actions at once all time out together and take their trees with them."""
    runner = ActionRunner(path=PATH, timeout=0.5, max_concurrency=40)

    async def main() -> List[ActionResult]:
        return list(
            await asyncio.gather(
                *(runner.run(f"sleep 60 & echo $! > {tmp_path}/{i}; wait") for i in range(40))
            )
        )

    start = time.monotonic()
    results = asyncio.run(main())
    elapsed = time.monotonic() - start
    assert all(r.timed_out and r.returncode == -signal.SIGKILL for r in results)
    assert elapsed < 8  # 0.5 s in parallel, not 40 x 0.5 s; generous safety bound
    assert all(0.45 <= r.duration < 5 for r in results)
    assert all(_gone(int((tmp_path / str(i)).read_text())) for i in range(40))
    runner.close()


def test_no_fd_or_zombie_leak_after_failures() -> None:
    """Timeouts, overflows, crashes, spawn failures and cancels leave no fd and no zombie."""
    before = sorted(os.listdir("/proc/self/fd"))
    runner = ActionRunner(path=PATH, timeout=0.5, max_output=4096)
    broken = ActionRunner(path=PATH, shell="/nonexistent/sh")

    async def main() -> None:
        commands = ["echo ok", "exit 7", "kill -SEGV $$", "sleep 30", "yes", "cat /dev/zero >&2"]
        results = await asyncio.gather(*(runner.run(c) for c in commands * 3))
        assert [r.ok for r in results[:6]] == [True, False, False, False, False, False]
        assert results[3].timed_out and results[4].overflow and results[5].overflow
        assert not (await broken.run("echo x")).ok
        task = asyncio.ensure_future(runner.run("sleep 30"))
        while runner.running == 0:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    runner.close()
    broken.close()
    assert sorted(os.listdir("/proc/self/fd")) == before
    assert _zombies() == []


def test_event_loop_stays_responsive_while_actions_run() -> None:
    """The batch runs outside the loop (GIL released): timers keep firing meanwhile."""
    runner = ActionRunner(path=PATH, timeout=10, max_concurrency=4)

    async def main() -> float:
        loop_cmd = "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done"
        work = asyncio.gather(*(runner.run(loop_cmd) for _ in range(8)))
        worst = 0.0
        last = time.monotonic()
        while not work.done():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            worst = max(worst, now - last)
            last = now
        assert all(r.ok for r in await work)
        return worst

    worst = asyncio.run(main())
    runner.close()
    assert worst < 0.5  # 10 ms ticks; a loop blocked by the batch would stall for seconds


def test_separate_batches_share_the_concurrency_bound() -> None:
    """run() calls from different loop iterations form batches that share max_concurrency."""
    runner = ActionRunner(path=PATH, timeout=10, max_concurrency=2)

    async def main() -> int:
        peak = 0
        tasks = []
        for _ in range(3):
            tasks.extend(asyncio.ensure_future(runner.run("sleep 0.2")) for _ in range(2))
            await asyncio.sleep(0)  # next loop iteration: a new batch
        while not all(t.done() for t in tasks):
            peak = max(peak, runner.running)
            await asyncio.sleep(0.005)
        assert all(t.result().ok for t in tasks)
        return peak

    assert asyncio.run(main()) == 2
    runner.close()


def test_unencodable_command_is_a_result() -> None:
    """A command with a lone surrogate cannot be exec'd: a failed result, no exception."""
    result = _run("echo \ud800")
    assert not result.ok and "not encodable" in (result.spawn_error or "")


def test_shell_that_closes_its_pipes_before_exiting() -> None:
    """Pipes at EOF while the shell still runs: its exit status is still collected."""
    result = _run("echo early; exec >&- 2>&-; sleep 0.3; exit 4")
    assert result.returncode == 4
    assert result.stdout == b"early\n"
    assert result.duration >= 0.3


# --- worker shells: each action as `sh -c` would run it --------------------------

# Not here: a command starting with '-', which dash's `sh -c` (popen) takes as
# its own options ("-c requires an argument"); ours runs it as a command.
SH_EQUIVALENT = [
    "echo 42",
    "echo 'single' \"double $HOME\" back\\\\slash",
    "echo \"it's\"; echo 'a'\\''b'",
    "printf '%s|' $0 $#; echo",
    "echo a\necho b\n\n",
    "exit 7",
    "exit 200",
    "(",
    "if true; then echo yes; fi # comment ) ; echo no",
    "cat <<EOF\nhere $PATH\nEOF",
    "f() { echo fn \"$@\"; }; f 1 2",
    "",
    "   ",
    "echo $(echo nested) `echo tick`",
    "set -- a b; echo $# $1",
    "false | true; echo $?",
    "echo x >&2",
]


@pytest.mark.parametrize("command", SH_EQUIVALENT)
def test_same_as_sh_dash_c(command: str) -> None:
    """Output and status match a fresh `/bin/sh -c` for quoting, syntax errors, here-docs."""
    expected = subprocess.run(  # as popen(3) runs it: argv[0] "sh"
        ["sh", "-c", command],
        executable="/bin/sh",
        capture_output=True,
        env={"PATH": PATH, "HOME": "/home/x"},
        stdin=subprocess.DEVNULL,
        check=False,
    )
    runner = ActionRunner(path=PATH, timeout=10, environ={"HOME": "/home/x"})
    result = _run(command, runner, cap=4096)
    runner.close()
    assert result.returncode == expected.returncode
    assert result.stdout == expected.stdout
    # dash names eval in its messages: `sh: 1: eval: Syntax error` for `sh: 1: Syntax error`.
    assert result.stderr.replace(b"eval: ", b"") == expected.stderr


def test_no_state_leaks_between_actions(tmp_path: Path) -> None:
    """Variables, cwd, umask, traps and exports of one action never reach the next."""
    runner = ActionRunner(path=PATH, timeout=10, max_concurrency=1, batch_threads=1)
    first = f"X=1; export Y=2; cd {tmp_path}; umask 077; trap 'echo trapped' EXIT; alias e=echo"
    second = "echo ${X-unset} ${Y-unset} $(pwd) $(umask); e 2>/dev/null || echo no-alias; echo $$"

    async def main() -> List[ActionResult]:
        return list(await asyncio.gather(runner.run("echo $$"), runner.run(first),
                                         runner.run(second)))

    mask = os.umask(0)
    os.umask(mask)
    pid, one, two = asyncio.run(main())
    runner.close()
    assert one.ok and one.stdout == b"trapped\n"
    lines = two.stdout.decode().splitlines()
    assert lines[0] == f"unset unset {os.getcwd()} {mask:04o}"
    assert lines[1] == "no-alias"
    # One worker ran all three (max_concurrency 1): a subshell each, not a new shell.
    assert lines[2] == pid.stdout.decode().strip()


def test_worker_killed_by_its_action_is_replaced() -> None:
    """An action that kills $$ (its worker) fails; the next action gets a new worker."""
    runner = ActionRunner(path=PATH, timeout=10, max_concurrency=1, batch_threads=1)

    async def main() -> List[ActionResult]:
        return list(await asyncio.gather(
            runner.run("echo $$"), runner.run("kill -9 $$; echo survived"), runner.run("echo $$")
        ))

    before, killed, after = asyncio.run(main())
    runner.close()
    assert killed.returncode == -signal.SIGKILL and not killed.ok
    assert after.ok and before.stdout != after.stdout


def test_each_job_gets_its_own_path() -> None:
    """Jobs of one batch with different PATHs each run with their own."""
    runner = ActionRunner(path=PATH, timeout=10, max_concurrency=1, batch_threads=1)

    async def main() -> List[ActionResult]:
        return list(await asyncio.gather(
            *(runner.run("echo $PATH", path=f"/p{i}:{PATH}") for i in (1, 2, 1))
        ))

    results = asyncio.run(main())
    runner.close()
    assert [r.stdout for r in results] == [f"/p{i}:{PATH}\n".encode() for i in (1, 2, 1)]


def test_command_longer_than_the_pipe_buffer() -> None:
    """A 300 KB action (sh -c would hit E2BIG at 128 KiB) is written as the worker reads it."""
    payload = "x" * 300_000
    result = _run(f": '{payload}'; echo ok; printf %s '{payload}' | wc -c")
    assert result.ok and result.stdout == b"ok\n300000\n"


@pytest.mark.slow  # over 1.5 s: not in the fast tier
def test_escaped_writer_never_reaches_the_next_action(tmp_path: Path) -> None:
    """A setsid() grandchild still writing after its action is given up on cannot touch
    a later action's output (fifos are per action) and dies of SIGPIPE once we stop reading."""
    runner = ActionRunner(path=PATH, timeout=0.5, kill_grace=0.3, max_concurrency=1,
                          batch_threads=1)
    pidfile = tmp_path / "writer.pid"
    chatty = f"setsid sh -c 'echo $$ > {pidfile}; while :; do echo junk; sleep 0.02; done' & echo a"

    async def main() -> List[ActionResult]:
        return list(await asyncio.gather(runner.run(chatty), runner.run("sleep 0.3; echo b")))

    first, second = asyncio.run(main())
    runner.close()
    writer = int(pidfile.read_text())
    try:
        assert first.timed_out
        assert first.stdout.startswith(b"a\njunk\n")
        assert second.ok and second.stdout == b"b\n"
        assert _gone(writer, within=5)  # SIGPIPE: nobody reads its fifo any more
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(writer, signal.SIGKILL)


def test_fifo_directory_private_and_removed(tmp_path: Path) -> None:
    """Each batch's fifos live in a 0700 directory under runtime_dir, gone afterwards."""
    runner = ActionRunner(path=PATH, timeout=10, runtime_dir=str(tmp_path))
    seen = _run(f"stat -c %a {tmp_path}/vhostmd-actions.*; ls {tmp_path}/vhostmd-actions.*",
                runner, cap=4096)
    runner.close()
    assert seen.ok
    mode, *names = seen.stdout.decode().split()
    assert mode == "700"
    assert sorted(names) == ["0e", "0o"]  # this action's own two fifos
    assert list(tmp_path.iterdir()) == []


def test_unusable_runtime_dir_fails_the_actions_clearly(tmp_path: Path) -> None:
    """No place for fifos: every action fails with the reason; nothing hangs."""
    runner = ActionRunner(path=PATH, timeout=10, runtime_dir=str(tmp_path / "missing"))
    result = _run("echo 1", runner)
    runner.close()
    assert not result.ok and result.returncode is None
    failure = result.failure() or ""
    assert "cannot start the batch" in failure and "missing" in failure


def test_run_many_keeps_order_and_marks_unrunnable() -> None:
    """run_many(): one result per command, in order; an unrunnable one fails in its place."""
    runner = ActionRunner(path=PATH, timeout=10)

    async def main() -> List[ActionResult]:
        return await runner.run_many(
            [("echo a", 255), ("bad\x00command", 255), ("printf 12345", 3), ("exit 4", 255)]
        )

    results = asyncio.run(main())
    runner.close()
    assert [r.stdout for r in results] == [b"a\n", b"", b"123", b""]
    assert results[1].failure() == "cannot run the shell: NUL character in command"
    assert [r.returncode for r in results] == [0, None, 0, 4]


def test_forged_status_line_cannot_end_another_job() -> None:
    """A line an action writes on its worker's status pipe is not taken as any job's status."""
    runner = ActionRunner(path=PATH, timeout=10, max_concurrency=1, batch_threads=1)

    async def main() -> List[ActionResult]:
        # Job 0 writes what would be job 1's status line, then exits 7.
        forger = "echo '5 1' >/proc/$$/fd/1; sleep 0.2; exit 7"
        return list(await asyncio.gather(runner.run(forger), runner.run("echo next; exit 3")))

    forged, after = asyncio.run(main())
    runner.close()
    assert forged.returncode == 7
    assert after.returncode == 3 and after.stdout == b"next\n"


def test_out_of_fds_actions_wait_for_others() -> None:
    """With too few fds for the concurrency, actions wait for running ones instead of failing."""
    script = f"""
import asyncio, os, resource
from vhostmd_py.sources.shell.runner import ActionRunner
runner = ActionRunner(path={PATH!r}, timeout=10, max_concurrency=8, batch_threads=1)
open_now = len(os.listdir("/proc/self/fd"))
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + 14, hard))  # ~2 of 8 slots fit
async def main():
    return await runner.run_many([(f"echo {{i}}", 255) for i in range(40)])
results = asyncio.run(main())
runner.close()
print(sum(r.ok for r in results), sorted({{r.failure() for r in results if not r.ok}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.split(" ", 1) == ["40", "[]\n"], out.stdout + out.stderr


def test_no_worker_left_after_a_batch() -> None:
    """Every worker shell exits and is reaped when its batch ends."""
    runner = ActionRunner(path=PATH, timeout=10, max_concurrency=8)

    async def main() -> List[ActionResult]:
        return list(await asyncio.gather(*(runner.run(f"echo {i}") for i in range(50))))

    assert all(r.ok for r in asyncio.run(main()))
    runner.close()
    assert _children() == []


def _children() -> List[int]:
    """Our live or zombie children."""
    me = str(os.getpid())
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    if fh.read().rsplit(")", 1)[1].split()[1] == me:
                        found.append(int(entry))
            except OSError:
                continue
    return found


# --- actions that outlive their output, results before the batch ends -------

@pytest.mark.parametrize("action", ["sleep 60 & echo bg",
                                    "for i in $(seq 50); do sleep 60 & done; echo fifty"])
def test_background_child_holding_stdout_lingers_then_is_killed(action: str) -> None:
    """Exited, but children hold its stdout: the value after `linger`, the children killed."""
    runner = ActionRunner(path=PATH, timeout=30, linger=0.3)
    marker = f"60.{os.getpid()}{time.monotonic_ns() % 1000000:06d}"
    start = time.monotonic()
    result = _run(action.replace("60", marker), runner)
    elapsed = time.monotonic() - start
    runner.close()
    assert result.ok and result.lingered and not result.timed_out
    assert result.stdout in (b"bg\n", b"fifty\n")
    assert 0.3 <= elapsed < 5  # not the 30 s timeout (upstream: for ever)
    deadline = time.monotonic() + 2
    while _with_marker(marker) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _with_marker(marker) == []


def test_linger_none_waits_for_eof_until_the_timeout() -> None:
    """linger=None keeps the old rule: the held output is waited for until the timeout."""
    runner = ActionRunner(path=PATH, timeout=0.5, linger=None)
    result = _run("sleep 5 & echo bg", runner)
    runner.close()
    assert result.timed_out and not result.lingered


def test_collect_ready_hands_out_results_while_the_batch_runs() -> None:
    """A finished job's result is available while another job of its batch still runs."""
    runner = ActionRunner(path=PATH, timeout=10, batch_threads=1)

    async def main() -> tuple:
        jobs = runner.submit_many([("sleep 3", 255), ("echo quick", 255)])
        await asyncio.sleep(0.5)
        assert not any(j.done() for j in jobs)  # the batch has not ended
        runner.collect_ready(jobs)
        slow, quick = jobs
        got = (slow.done(), quick.done() and runner.result_of(quick))
        await runner.cancel(jobs)
        return got

    slow_done, quick = asyncio.run(main())
    runner.close()
    assert not slow_done
    assert quick and quick.ok and quick.stdout == b"quick\n"


def _with_marker(marker: str) -> List[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    if marker.encode() in fh.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found
