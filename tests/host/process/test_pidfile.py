"""vhostmd_py.process.pidfile: exclusive creation, stale take-over, removal only when ours."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from vhostmd_py.errors import PidFileError
from vhostmd_py.process.pidfile import PidFile


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_create_writes_pid_with_mode_0644(tmp_path: Path) -> None:
    """The file holds our pid and a newline, mode 0644 whatever the umask."""
    path = tmp_path / "vhostmd.pid"
    old = os.umask(0o077)
    try:
        pid_file = PidFile.create(path)
    finally:
        os.umask(old)
    assert path.read_text() == f"{os.getpid()}\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert pid_file.pid == os.getpid()


def test_existing_live_pid_is_refused_with_upstream_message(tmp_path: Path) -> None:
    """A file naming a live process refuses with upstream's wording (golden pidfile-exists)."""
    path = tmp_path / "p"
    path.write_text(f"{os.getppid()}\n")
    with pytest.raises(PidFileError) as info:
        PidFile.create(path)
    assert str(info.value) == (
        f"Failed to open pid file '{path}' : File exists (vhostmd pid {os.getppid()} is running)"
    )
    assert path.read_text() == f"{os.getppid()}\n"


@pytest.mark.parametrize("content", ["", "garbage\n", "0\n", "-5\n"])
def test_unparsable_pid_file_is_refused(tmp_path: Path, content: str) -> None:
    """An empty or unparsable file cannot be shown stale: refused, left untouched."""
    path = tmp_path / "p"
    path.write_text(content)
    with pytest.raises(PidFileError, match="File exists"):
        PidFile.create(path)
    assert path.read_text() == content


def test_stale_pid_file_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A file naming a process that is gone is replaced, with a warning."""
    path = tmp_path / "p"
    dead = _dead_pid()
    path.write_text(f"{dead}\n")
    PidFile.create(path)
    assert path.read_text() == f"{os.getpid()}\n"
    assert f"stale pid file '{path}' of process {dead}" in caplog.text


def test_alive_check_is_a_parameter(tmp_path: Path) -> None:
    """The liveness probe decides: reported alive means refused."""
    path = tmp_path / "p"
    path.write_text(f"{_dead_pid()}\n")
    with pytest.raises(PidFileError):
        PidFile.create(path, alive=lambda _pid: True)


def test_remove_deletes_our_file(tmp_path: Path) -> None:
    """remove() deletes the file that still holds our pid."""
    path = tmp_path / "p"
    PidFile.create(path).remove()
    assert not path.exists()


def test_remove_leaves_someone_elses_file(tmp_path: Path) -> None:
    """remove() never deletes a file rewritten by another daemon."""
    path = tmp_path / "p"
    pid_file = PidFile.create(path)
    path.write_text("1\n")
    pid_file.remove()
    assert path.read_text() == "1\n"


def test_missing_directory_is_a_typed_error(tmp_path: Path) -> None:
    """A pid file in a missing directory raises PidFileError naming the path."""
    path = tmp_path / "no" / "such" / "p"
    with pytest.raises(PidFileError) as info:
        PidFile.create(path)
    assert info.value.path == str(path)
    assert "No such file or directory" in str(info.value)
    assert isinstance(info.value.__cause__, FileNotFoundError)
