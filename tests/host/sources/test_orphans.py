"""Tests of vhostmd_py.sources.shell.orphans: a real subreaper process adopting real orphans."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from helpers import REPO

# Run in a child interpreter: pytest itself must not become a subreaper.
SCRIPT = """
import json, os, subprocess, sys, time
from vhostmd_py.sources.shell.orphans import OrphanReaper, enable_subreaper

marker = os.environ["MARKER"]

def alive():
    n = 0
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                with open(f"/proc/{e}/cmdline", "rb") as fh:
                    n += marker.encode() in fh.read()
            except OSError:
                pass
    return n

assert enable_subreaper()
# Our own child in our session (as libvirt's ssh would be): never an orphan.
own = subprocess.Popen(["sleep", marker])
# Six detached descendants (their parent sh exits: they are reparented to us): first
# a double-forked shell with a child of its own (the oldest), then five setsid sleeps.
subprocess.run(["sh", "-c", f"(setsid sh -c 'sleep {marker}; :' >/dev/null 2>&1 &); sleep 0.05;"
                f" for i in 1 2 3 4 5; do setsid sleep {marker} >/dev/null 2>&1 & done"],
               check=True)
time.sleep(0.3)
reaper = OrphanReaper(max_age=100, limit=2)
out = {"start": alive()}
out["first_sweep_killed"] = reaper.sweep(set())  # seen once: nothing done yet
out["second_sweep_killed"] = reaper.sweep(set())
time.sleep(0.2)
reaper.sweep(set())  # reaps the killed ones (zombies)
out["after_limit"] = alive()
old = OrphanReaper(max_age=0, limit=100)
old.sweep(set())
out["aged_killed"] = old.sweep(set())
time.sleep(0.2)
out["end_all"] = reaper.end_all()
out["left"] = alive()
out["own_alive"] = own.poll() is None
own.kill()
own.wait()
print(json.dumps(out))
"""


def test_orphans_bounded_aged_and_ended() -> None:
    """Orphans past the limit are killed, past max_age too, all at the end; our own child never."""
    marker = f"77.{os.getpid()}{time.monotonic_ns() % 1000000:06d}"
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO), MARKER=marker))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["start"] == 8  # our own sleep + the shell and its sleep + 5 setsid sleeps
    assert out["first_sweep_killed"] == 0
    assert out["second_sweep_killed"] == 4  # 6 orphans, at most 2 may run: the oldest stay
    assert out["after_limit"] == 4  # our own + the shell with its child + one sleep
    assert out["aged_killed"] == 2  # the shell's group (its child with it) and the sleep
    assert out["end_all"] == 0  # nothing left to kill: the aged ones went
    assert out["left"] == 1 and out["own_alive"]  # only our own child, untouched


def test_no_proc_means_no_orphans_and_no_os_error(tmp_path: Path) -> None:
    """Without a readable /proc (a sandbox) sweeps and the stop find nothing: no OSError leaves
    the module for the daemon to catch."""
    from vhostmd_py.sources.shell.orphans import OrphanReaper

    reaper = OrphanReaper(max_age=0, limit=0, proc=str(tmp_path / "no-proc"))
    assert reaper.sweep(()) == 0
    assert reaper.end_all((), budget=0.01) == 0
    assert reaper.killed == 0
