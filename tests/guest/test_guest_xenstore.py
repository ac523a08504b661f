"""Tests of the xenstore source (-x) with a stand-in xenstore-read placed first in PATH."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Dict, Type

import pytest
from vhostmd_guest.errors import (
    DocumentError,
    MetricsError,
    XenstoreError,
    XenstoreUnavailableError,
)
from vhostmd_guest.reader import fetch_xenstore_metrics
from vhostmd_guest.xenstore import find_tool, read_xenstore_metrics

DOC = (
    "<metrics>\n  <metric type='int32' context='host'>\n    <name>Answer</name>\n"
    "    <value>42</value>\n  </metric>\n</metrics>"
)


def _fake_xenstore(bin_dir: Path, store: Dict[str, str], log: Path) -> Path:
    """A real xenstore-read executable answering from ``store`` and logging its argv."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    data = bin_dir / "store.py"
    data.write_text(repr(store))
    script = bin_dir / "xenstore-read"
    script.write_text(
        f"#!{sys.executable}\n"
        "import ast, sys\n"
        f"store = ast.literal_eval(open({str(data)!r}).read())\n"
        f"open({str(log)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
        "key = sys.argv[-1]\n"
        "if key not in store:\n"
        "    sys.stderr.write('xenstore-read: couldn\\'t read path ' + key + '\\n')\n"
        "    sys.exit(1)\n"
        "sys.stdout.write(store[key] + '\\n')\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return script


def _env(bin_dir: Path) -> Dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}:/usr/bin:/bin"
    return env


def test_reads_domid_then_domain_metrics(tmp_path: Path) -> None:
    """Like upstream: domid, then /local/domain/<domid>/metrics, raw (-R)."""
    log = tmp_path / "argv.log"
    _fake_xenstore(tmp_path / "bin", {"domid": "7", "/local/domain/7/metrics": DOC}, log)
    value = read_xenstore_metrics(env=_env(tmp_path / "bin"))
    assert value == DOC.encode()
    assert log.read_text().splitlines() == ["-R domid", "-R /local/domain/7/metrics"]


def test_output_is_declaration_plus_document(tmp_path: Path) -> None:
    """The dump is upstream-like: an XML declaration, the document, a newline."""
    _fake_xenstore(tmp_path / "bin", {"domid": "7", "/local/domain/7/metrics": DOC}, tmp_path / "l")
    out = fetch_xenstore_metrics(env=_env(tmp_path / "bin"))
    assert out.startswith(b'<?xml version="1.0"?>\n<metrics>')
    assert out.endswith(b"</metrics>\n")
    assert b"<value>42</value>" in out


def test_tools_missing_is_a_clear_error(tmp_path: Path) -> None:
    """Without xenstore-read in PATH the error says so."""
    env = {"PATH": str(tmp_path)}
    assert find_tool(env) is None
    with pytest.raises(XenstoreUnavailableError, match="xenstore tools not found"):
        read_xenstore_metrics(env=env)


@pytest.mark.parametrize(
    ("store", "error"),
    [
        ({}, XenstoreError),  # no domid key
        ({"domid": "abc"}, XenstoreError),
        ({"domid": "3"}, XenstoreError),  # no metrics key
        ({"domid": "3", "/local/domain/3/metrics": "<metrics><oops></metrics>"}, DocumentError),
        (
            {"domid": "3", "/local/domain/3/metrics": "<!DOCTYPE x [<!ENTITY a 'b'>]><metrics/>"},
            DocumentError,
        ),
    ],
)
def test_bad_store_contents_fail_typed(
    tmp_path: Path, store: Dict[str, str], error: Type[MetricsError]
) -> None:
    """Missing keys, a bad domid and bad or hostile documents are typed errors."""
    _fake_xenstore(tmp_path / "bin", store, tmp_path / "l")
    with pytest.raises(error):
        fetch_xenstore_metrics(env=_env(tmp_path / "bin"))


def _tool() -> list[str]:
    script = Path(sys.executable).parent / "vm-dump-metrics"
    return [str(script)] if script.exists() else [sys.executable, "-m", "vhostmd_guest"]


def test_cli_x_uses_the_tools(tmp_path: Path) -> None:
    """vm-dump-metrics -x prints the xenstore metrics, exit 0."""
    _fake_xenstore(tmp_path / "bin", {"domid": "1", "/local/domain/1/metrics": DOC}, tmp_path / "l")
    proc = subprocess.run(
        [*_tool(), "-x"], capture_output=True, env=_env(tmp_path / "bin"), timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(b'<?xml version="1.0"?>\n<metrics>')


def test_cli_x_without_tools_exits_1(tmp_path: Path) -> None:
    """vm-dump-metrics -x without the tools: exit 1, clear message."""
    env = dict(os.environ)
    env["PATH"] = str(tmp_path)
    proc = subprocess.run([*_tool(), "-x"], capture_output=True, text=True, env=env, timeout=30)
    assert proc.returncode == 1
    assert "xenstore tools not found" in proc.stderr


def test_cli_default_order_ends_with_xenstore(tmp_path: Path) -> None:
    """No flag, no disk, no port: xenstore (present) answers last, exit 0."""
    _fake_xenstore(tmp_path / "bin", {"domid": "1", "/local/domain/1/metrics": DOC}, tmp_path / "l")
    args = [
        "--sys-root",
        str(tmp_path / "nosys"),
        "--port",
        str(tmp_path / "noport"),
    ]
    proc = subprocess.run(
        [*_tool(), *args], capture_output=True, env=_env(tmp_path / "bin"), timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    assert b"<value>42</value>" in proc.stdout
    assert b"Unable to read metrics disk" in proc.stderr
    assert b"get_virtio_metrics(): Unable to read metrics" in proc.stderr
