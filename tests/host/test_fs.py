"""vhostmd_py.fs, the filesystem boundary: atomic writes, create-once files, OSError translation."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from vhostmd_py import fs
from vhostmd_py.errors import IdentityError, PidFileError, StateFileError
from vhostmd_py.history.errors import HistoryError


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_write_atomic_replaces_with_exact_mode_and_no_temporaries(tmp_path: Path) -> None:
    """The new content replaces the old, mode as asked whatever the umask; nothing else stays."""
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    old_umask = os.umask(0o077)
    try:
        fs.write_atomic(target, b"new\n", mode=0o644)
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"new\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert _leftovers(tmp_path) == []


def test_write_json_atomic_round_trips(tmp_path: Path) -> None:
    """JSON written by write_json_atomic reads back with read_json; a missing file is None."""
    target = tmp_path / "sub" / "alarms.json"
    fs.write_json_atomic(target, {"b": [1, 2], "a": "x"})
    assert fs.read_json(target) == {"a": "x", "b": [1, 2]}
    assert target.read_text() == '{\n "a": "x",\n "b": [\n  1,\n  2\n ]\n}\n'
    assert fs.read_json(tmp_path / "missing.json") is None


def test_failed_write_keeps_nothing_and_names_path_and_step(tmp_path: Path) -> None:
    """A rename that fails (the target is a directory) leaves no temporary file and raises
    the asked kind with the path, the step and errno."""
    target = tmp_path / "index.json"
    target.mkdir()
    with pytest.raises(HistoryError) as info:
        fs.write_atomic(target, b"{}", kind=HistoryError, make_parent=False)
    assert info.value.path == str(target)
    assert info.value.errno == errno.EISDIR
    assert info.value.reason == f"cannot write: {os.strerror(errno.EISDIR)}"
    assert _leftovers(tmp_path) == []


def test_parent_not_a_directory_is_a_state_file_error(tmp_path: Path) -> None:
    """No temporary file can be made under a regular file: StateFileError (the default kind)."""
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(StateFileError) as info:
        fs.write_json_atomic(blocker / "state.json", {})
    assert info.value.errno in (errno.EEXIST, errno.ENOTDIR)  # makedirs finds the file
    assert str(info.value).startswith(
        f"state file {blocker / 'state.json'}: cannot create a temporary file: "
    )


def test_translated_wording_and_bare_strerror(tmp_path: Path) -> None:
    """translated() says "DOING: strerror"; an empty DOING keeps the bare strerror
    (the pid file's upstream wording)."""
    missing = tmp_path / "missing"
    with pytest.raises(StateFileError) as info, fs.translated(StateFileError, missing, "cannot x"):
        os.stat(missing)
    assert info.value.reason == f"cannot x: {os.strerror(errno.ENOENT)}"
    assert isinstance(info.value.__cause__, FileNotFoundError)
    with pytest.raises(PidFileError) as pid_info, fs.translated(PidFileError, missing, ""):
        os.stat(missing)
    assert str(pid_info.value) == f"Failed to open pid file '{missing}' : No such file or directory"


def test_create_once_never_overwrites(tmp_path: Path) -> None:
    """The first value is kept (mode 0600); a file that appears meanwhile wins over ours."""
    key = tmp_path / "dir" / "key"
    assert fs.create_once(key, lambda: b"first", IdentityError) == b"first"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert fs.create_once(key, lambda: b"second", IdentityError) == b"first"

    other = tmp_path / "dir" / "raced"

    def racing() -> bytes:
        other.write_bytes(b"theirs")  # a second daemon creates it while we write ours
        return b"ours"

    assert fs.create_once(other, racing, IdentityError) == b"theirs"
    assert _leftovers(tmp_path / "dir") == []


def test_read_small_refuses_a_symlink(tmp_path: Path) -> None:
    """read_small never follows a symlink (the identity key lives where others may write)."""
    real = tmp_path / "real"
    real.write_bytes(b"secret")
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(IdentityError) as info:
        fs.read_small(link, IdentityError)
    assert info.value.errno == errno.ELOOP
    assert info.value.reason.startswith("cannot open: ")
    assert fs.read_small(real, IdentityError) == b"secret"
    assert fs.read_small(tmp_path / "none", IdentityError) is None


def test_make_dirs_and_remove(tmp_path: Path) -> None:
    """make_dirs creates with the mode asked (less the umask); remove says whether it removed."""
    target = tmp_path / "a" / "b"
    fs.make_dirs(target, HistoryError, mode=0o750)
    assert target.is_dir()
    assert stat.S_IMODE(target.stat().st_mode) == 0o750 & ~_umask()
    file = target / "f"
    file.write_bytes(b"")
    assert fs.remove(file, HistoryError) is True
    assert fs.remove(file, HistoryError) is False
    with pytest.raises(HistoryError) as info:
        fs.remove(target, HistoryError)  # a directory: unlink refuses it
    assert info.value.reason.startswith("cannot remove: ")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
