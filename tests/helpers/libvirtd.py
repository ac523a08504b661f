"""A private, unprivileged libvirtd serving libvirt's test driver, so tests can change it.

``test:///default`` opened in-process is private to that process; served by a
libvirtd of our own (``test+unix:///default?socket=...``) it is one shared
state that the daemon under test reads and the test changes (``setMemory``,
as ``virsh setmem``) while the daemon runs. The libvirtd runs in session mode
(as ``nobody`` when we are root: a privileged libvirtd would start the QEMU
driver), all its files in one directory; only the process started here is
stopped.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

LIBVIRTD = "/usr/sbin/libvirtd"


def start() -> Iterator[str]:
    """Run libvirtd in a new directory of its own; yield the test driver's URI; stop it."""
    if not os.path.exists(LIBVIRTD) or shutil.which("setpriv") is None:
        import pytest

        pytest.skip("libvirtd or setpriv is not installed")
    # Not under pytest's tmp_path: that is private to root, and libvirtd runs as nobody.
    base = Path(tempfile.mkdtemp(prefix="vhostmd-libvirtd-"))
    os.chmod(base, 0o755)
    env = dict(os.environ, HOME=str(base), XDG_RUNTIME_DIR=str(base / "run"),
               XDG_CONFIG_HOME=str(base / "config"), XDG_CACHE_HOME=str(base / "cache"))
    argv = [LIBVIRTD]
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        for sub in ("run", "config", "cache"):
            (base / sub).mkdir(exist_ok=True)
            os.chown(base / sub, nobody.pw_uid, nobody.pw_gid)
        argv = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}",
                "--clear-groups", *argv]
    log = open(base / "libvirtd.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                            start_new_session=True)
    sock = base / "run" / "libvirt" / "libvirt-sock"
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    "private libvirtd did not start: " + (base / "libvirtd.log").read_text())
            time.sleep(0.05)
        yield f"test+unix:///default?socket={sock}"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        log.close()
        shutil.rmtree(base, ignore_errors=True)
