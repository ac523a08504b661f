"""vhostmd_py.cli: upstream's options, usage, exit codes and start-up checks (real processes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
from helpers import REPO
from lxml import etree

pytestmark = pytest.mark.integration


def vhostmd(args: List[str], *, timeout: float = 20, cwd: Path | None = None,
            user_env: dict | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run the real `vhostmd` command line in a child process."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if user_env:
        env.update(user_env)
    return subprocess.run(
        [sys.executable, "-c", "from vhostmd_py.cli import main; main()", *args],
        capture_output=True, timeout=timeout, cwd=cwd, env=env, check=False,
    )


def basic_config(upstream: Path, tmp_path: Path, *, name: str = "basic-1k.xml",
                 replace: List[tuple] | None = None) -> Path:
    """A golden upstream config with its disk moved under tmp_path (plus edits)."""
    text = (upstream / "configs" / name).read_text()
    start = text.index("<path>") + len("<path>")
    end = text.index("</path>", start)
    text = text[:start] + str(tmp_path / "disk" / "vhostmd0") + text[end:]
    for old, new in replace or []:
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / f"edited-{name}"
    path.write_text(text)
    return path


def test_version_on_stdout_exits_0() -> None:
    """--version (ours, not upstream's): the package's version on stdout, exit 0, nothing run."""
    import vhostmd_py

    proc = vhostmd(["--version", "-f", "/nonexistent/vhostmd.conf"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode() == f"vhostmd (vhostmd-py) {vhostmd_py.__version__}\n"
    assert proc.stderr == b""


def test_help_prints_upstream_usage_on_stderr_and_exits_2(upstream: Path) -> None:
    """-h and --help: upstream's usage lines, in order, on stderr; exit 2 (golden help)."""
    golden = (upstream / "daemon-cli" / "help.stderr").read_text().splitlines()
    assert (upstream / "daemon-cli" / "help.exit").read_text().strip() == "2"
    for flag in ("-h", "--help"):
        proc = vhostmd([flag])
        assert proc.returncode == 2
        assert proc.stdout == b""
        ours = proc.stderr.decode().splitlines()
        it = iter(ours)
        assert all(line in it for line in golden), ours
        assert ours[:12] == golden[:12]
        assert "   --once                 Run one update, publish it and exit." in ours


def test_help_wins_over_other_options() -> None:
    """-h with other options still only prints the usage (nothing is started)."""
    proc = vhostmd(["-d", "-f", "/nonexistent.conf", "-h"])
    assert proc.returncode == 2
    assert b"Usage:" in proc.stderr


@pytest.mark.parametrize(
    ("args", "first_line"),
    [
        (["-x"], "vhostmd: invalid option -- 'x'"),
        (["-d", "-x"], "vhostmd: invalid option -- 'x'"),
        (["--bogus"], "vhostmd: unrecognized option '--bogus'"),
        (["-f"], "vhostmd: option requires an argument -- 'f'"),
        (["--config"], "vhostmd: option '--config' requires an argument"),
    ],
)
def test_bad_options_exit_1_with_getopt_wording(upstream: Path, args: List[str],
                                                 first_line: str) -> None:
    """Option errors exit 1 as upstream (golden unknown-option), getopt's first line."""
    assert (upstream / "daemon-cli" / "unknown-option.exit").read_text().strip() == "1"
    proc = vhostmd(args)
    assert proc.returncode == 1
    lines = proc.stderr.decode().splitlines()
    assert lines[0] == first_line
    assert "   vhostmd [options]" in lines
    assert proc.stdout == b""


@pytest.mark.parametrize("args", [["--jobs", "0"], ["--jobs", "two"], ["--action-timeout", "0"],
                                  ["--once", "--dump"]])
def test_bad_values_of_new_options_exit_1(args: List[str]) -> None:
    """--jobs and --action-timeout need positive numbers; --once excludes --dump."""
    proc = vhostmd([*args, "-f", "/nonexistent.conf"])
    assert proc.returncode == 1
    assert proc.stderr.startswith(b"vhostmd: ")


def test_missing_config_names_the_file(tmp_path: Path) -> None:
    """A missing config file: message naming it, exit 1 (golden missing-config)."""
    missing = tmp_path / "nope.xml"
    proc = vhostmd(["-d", "-f", str(missing)])
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert str(missing) in err
    assert "No such file or directory" in err


@pytest.mark.parametrize(
    ("case", "edits", "expected"),
    [
        ("size-too-small", [('<size unit="k">1</size>', '<size unit="k">0</size>')],
         "Specified metrics disk size (0) not within supported range: (1024 - 268435456)"),
        ("size-bad-unit", [('<size unit="k">1</size>', '<size unit="b">1</size>')],
         "Specified metrics disk size (-1) not within supported range: (1024 - 268435456)"),
        ("size-too-big", [('<size unit="k">1</size>', '<size unit="m">257</size>')],
         "Specified metrics disk size (269484032) not within supported range: (1024 - 268435456)"),
        ("period-zero", [("<update_period>1<", "<update_period>0<")],
         "Specified update period (0) less than minimum supported (1)"),
        ("dtd-invalid", [("<transport>vbd</transport>", "<transport>vbd</transport><bogus/>")],
         "bogus"),
        ("xenstore", [("<transport>vbd</transport>", "<transport>xenstore</transport>")],
         "No support for xenstore transport in this vhostmd"),
        ("not-xml", [("</vhostmd>", "")], "XML syntax error"),
    ],
)
def test_invalid_configs_exit_1_naming_file_and_line(
    upstream: Path, tmp_path: Path, case: str, edits: List[tuple], expected: str
) -> None:
    """Each invalid config of golden daemon-cli/ exits 1 with upstream's reason, file and line."""
    if (upstream / "daemon-cli" / f"{case}.exit").exists():
        assert (upstream / "daemon-cli" / f"{case}.exit").read_text().strip() == "1"
    config = basic_config(upstream, tmp_path, replace=edits)
    proc = vhostmd(["-d", "-f", str(config), "-c", "test:///default"])
    assert proc.returncode == 1, proc.stderr
    err = proc.stderr.decode()
    assert expected in err
    assert f"{config}:" in err  # file:line
    assert not (tmp_path / "disk" / "vhostmd0").exists()  # nothing was started


def test_dump_prints_the_document_and_publishes_nothing(upstream: Path, tmp_path: Path) -> None:
    """--dump: one cycle's document on stdout, no disk created, exit 0."""
    config = basic_config(upstream, tmp_path)
    proc = vhostmd(["--dump", "-f", str(config), "-c", "test:///default"])
    assert proc.returncode == 0, proc.stderr
    root = etree.fromstring(proc.stdout)
    assert root.tag == "metrics"
    names = [m.findtext("name") for m in root.iter("metric")]
    assert names == ["First", "Second", "Greeting", "Answer", "VCpus", "Ident"]
    ident = next(m for m in root.iter("metric") if m.findtext("name") == "Ident")
    assert ident.findtext("value") == "test-1-6695eb01-f6a4-8304-79aa-97f2502e193f"
    assert not (tmp_path / "disk").exists()


def test_dump_matches_upstreams_single_domain_document(upstream: Path, tmp_path: Path) -> None:
    """--dump against test:///default equals upstream's basic-64k content (newlines stripped)."""
    from vhostmd_wire.disk import read_disk

    golden = read_disk(upstream / "disks" / "basic-64k.img")
    expected = golden.replace(b"\n</value>", b"</value>")
    config = basic_config(upstream, tmp_path, name="basic-64k.xml")
    proc = vhostmd(["--dump", "-f", str(config), "-c", "test:///default"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected


def test_unknown_user_is_refused(upstream: Path, tmp_path: Path) -> None:
    """-u with a user that does not exist: exit 1 naming it, no disk created."""
    config = basic_config(upstream, tmp_path)
    proc = vhostmd(["-d", "--once", "-u", "no-such-user-xyz", "-f", str(config)])
    assert proc.returncode == 1
    assert b"no-such-user-xyz" in proc.stderr
    assert b"no such user" in proc.stderr
    assert not (tmp_path / "disk").exists()


def test_root_user_is_refused(upstream: Path, tmp_path: Path) -> None:
    """-u root: refusing to run as root, exit 1."""
    config = basic_config(upstream, tmp_path)
    proc = vhostmd(["-d", "--once", "-u", "root", "-f", str(config)])
    assert proc.returncode == 1
    assert b"refusing to run as root" in proc.stderr


def test_disk_in_missing_directory_tree_exits_1(upstream: Path, tmp_path: Path) -> None:
    """A disk path that cannot be created: exit 1 with the path (golden disk-dir-missing)."""
    config = basic_config(upstream, tmp_path)
    text = config.read_text().replace(str(tmp_path / "disk"), "/proc/no/such/dir")
    config.write_text(text)
    proc = vhostmd(["-d", "--once", "-f", str(config), "-c", "test:///default"])
    assert proc.returncode == 1
    assert b"/proc/no/such/dir/vhostmd0" in proc.stderr


def test_long_options_abbreviate_as_upstreams(tmp_path: Path) -> None:
    """getopt_long's unique prefixes work (--conf for --config), and --ver is still --verbose."""
    missing = tmp_path / "nope.xml"
    proc = vhostmd(["--no", "--conf", str(missing), "--ver"])
    assert proc.returncode == 1
    assert str(missing) in proc.stderr.decode()
    proc = vhostmd(["--vers"])
    assert proc.returncode == 0
    assert proc.stdout.startswith(b"vhostmd (vhostmd-py) ")


@pytest.mark.parametrize(("args", "code"), [(["-h", "--bogus"], 2), (["--bogus", "-h"], 1),
                                            (["-dh", "-x"], 2), (["-f", "-h", "-x"], 1)])
def test_help_counts_only_before_a_bad_option(args: List[str], code: int) -> None:
    """As upstream acts on options in order: -h first prints the usage, after a bad option not."""
    proc = vhostmd(args)
    assert proc.returncode == code
    first = proc.stderr.decode().splitlines()[0 if code == 1 else 1]
    assert first.startswith("vhostmd: ") if code == 1 else first == "   Usage:"
