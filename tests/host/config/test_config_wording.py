"""Wording of config errors an operator can act on (a raw `&&`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO
from helpers.config import config_text, metric_xml

from vhostmd_py.config import load_config
from vhostmd_py.errors import ConfigError


def config(tmp_path: Path, action: str) -> str:
    """A config without DOCTYPE whose one metric has ACTION as written (not escaped)."""
    metric = metric_xml("Both", "string", "host", action, escaped=False)
    return config_text(tmp_path / "d", [metric], doctype=False)


ACTION_LINE = 16  # the <action> line of config()


@pytest.mark.parametrize("action", ["true && echo yes", "sleep 1 & wait", "echo a &amp b"])
def test_raw_ampersand_gets_a_hint_with_file_and_line(tmp_path: Path, action: str) -> None:
    """A raw `&` in an action: the error names file:line and says to write `&amp;&amp;`."""
    path = tmp_path / "vhostmd.conf"
    path.write_text(config(tmp_path, action))
    assert path.read_text().splitlines()[ACTION_LINE - 1] == f"      <action>{action}</action>"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.line == ACTION_LINE
    assert str(info.value).startswith(f"{path}:{ACTION_LINE}: XML syntax error: ")
    assert "'&&' as '&amp;&amp;'" in info.value.reason


def test_other_syntax_errors_get_no_ampersand_hint(tmp_path: Path) -> None:
    """The hint is only given where the line really holds a raw `&`."""
    path = tmp_path / "vhostmd.conf"
    path.write_text(config(tmp_path, "echo <b>"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "&amp;" not in info.value.reason


def test_escaped_ampersands_work(tmp_path: Path) -> None:
    """Written as the hint says, the action is the shell's `&&`."""
    path = tmp_path / "vhostmd.conf"
    path.write_text(config(tmp_path, "true &amp;&amp; echo yes"))
    assert load_config(path).metrics[0].action == "true && echo yes"


def test_the_daemon_prints_the_hint(tmp_path: Path) -> None:
    """`vhostmd --dump` with a raw `&&`: exit 1, one line with file:line and the hint."""
    path = tmp_path / "vhostmd.conf"
    path.write_text(config(tmp_path, "true && echo yes"))
    proc = subprocess.run(
        [sys.executable, "-c", "from vhostmd_py.cli import main; main()",
         "--dump", "-f", str(path), "-c", "test:///default"],
        capture_output=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO)), check=False,
    )
    err = proc.stderr.decode()
    assert proc.returncode == 1
    assert err.count("\n") == 1, err
    assert f"{path}:{ACTION_LINE}: " in err and "&amp;&amp;" in err
