"""Running vhostmd and reading metrics documents, for daemon tests (configs: helpers.config)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple, TypeVar

from lxml import etree
from vhostmd_wire.disk import read_disk

from helpers import REPO

T = TypeVar("T")


def metrics_of(content: bytes) -> Dict[Tuple[str, str], str]:
    """{(name, context or vm id): value} of a metrics document (strict XML parse)."""
    root = etree.fromstring(content)
    assert root.tag == "metrics"
    out = {}
    for metric in root.iter("metric"):
        where = metric.get("id") or metric.get("context")
        out[(metric.findtext("name"), where)] = metric.findtext("value")
    return out


def wait_for(probe: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll PROBE every 20 ms until it returns something truthy; fail after TIMEOUT s."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def try_read(disk: Path) -> bytes | None:
    """The disk's content when it is there and published, else None."""
    try:
        content = read_disk(disk, busy_timeout=0.2)
    except Exception:
        return None
    return content or None


class Vhostmd:
    """A running `vhostmd` child; its stderr goes to a file we can read while it runs."""

    def __init__(self, args: List[str], tmp_path: Path, *, env: Dict[str, str] | None = None,
                 cwd: Path | None = None, own_pid_file: bool = True):
        self.log_path = tmp_path / f"vhostmd-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the child
        full_env = dict(os.environ, PYTHONPATH=str(REPO))
        full_env.update(env or {})
        if own_pid_file and "-p" not in args and "--once" not in args:
            # As root the daemon takes /var/run/vhostmd.pid without -p (upstream's
            # default): tests running side by side must not share it.
            args = [*args, "-p", str(tmp_path / f"vhostmd-{time.monotonic_ns()}.pid")]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from vhostmd_py.cli import main; main()", *args],
            stdout=subprocess.DEVNULL, stderr=self._log, env=full_env, cwd=cwd,
        )

    @property
    def pid(self) -> int:
        """The daemon's pid."""
        return self.proc.pid

    def log(self) -> str:
        """Everything it logged so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> Tuple[int, float]:
        """Send SIG; (exit status, seconds until it exited)."""
        start = time.monotonic()
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        return code, time.monotonic() - start

    def close(self) -> None:
        """Kill it if still running."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()
