"""The man pages: clean roff, every option of both commands, every config element and range."""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Callable, List, Sequence

import pytest
from helpers import REPO
from lxml import etree
from vhostmd_guest import cli as guest_cli
from vhostmd_wire.disk import MAX_DISK_SIZE, MIN_DISK_SIZE

from vhostmd_py import cli as host_cli
from vhostmd_py import config as host_config

MAN = REPO / "docs" / "man"
PAGES = ["vhostmd.8", "vhostmd.conf.5", "vhostmdctl.1", "vm-dump-metrics.1"]


def render(page: str) -> str:
    """The page as plain text (groff, tbl), failing on any groff warning."""
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed (Debian: groff-base)")
    proc = subprocess.run(
        ["groff", "-man", "-t", "-ww", "-Tutf8", "-P-cbou", str(MAN / page)],
        capture_output=True, text=True, check=False,
        env={"LC_ALL": "C.UTF-8", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    # groff may print U+2010 (hyphen) or U+2212 (minus) for "-".
    return proc.stdout.replace("\u2010", "-").replace("\u2212", "-")


@pytest.mark.parametrize("page", PAGES)
def test_page_renders_without_warnings(page: str) -> None:
    """groff -ww says nothing, and the title line names the page."""
    name, section = page.rsplit(".", 1)
    assert f"{name.upper()}({section})" in render(page)


def _getopt_options(short: str, long_options: Sequence[str]) -> List[str]:
    """A command's options from its getopt_long tables."""
    return [f"-{c}" for c in short if c != ":"] + [f"--{n.rstrip('=')}" for n in long_options]


@pytest.mark.parametrize(
    ("page", "options_of"),
    [
        ("vhostmd.8", lambda: _getopt_options(
            host_cli.SHORT, host_cli.UPSTREAM_LONG + host_cli.OUR_LONG)),
        ("vm-dump-metrics.1", lambda: _getopt_options(guest_cli._SHORT, guest_cli._LONG)),
    ],
)
def test_every_option_is_described(page: str, options_of: Callable[[], List[str]]) -> None:
    """Each option of the command (from its getopt_long tables) is in OPTIONS."""
    text = render(page)
    options = text.split("OPTIONS", 1)[1].split("\nEXIT STATUS", 1)[0]
    names = options_of()
    assert len(names) >= 10
    missing = [n for n in names if not re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", options)]
    assert not missing


def test_every_config_element_and_attribute_is_described() -> None:
    """Each element and attribute of the shipped vhostmd.dtd appears in vhostmd.conf(5)."""
    text = render("vhostmd.conf.5")
    dtd = etree.DTD(str(host_config.default_dtd_path()))
    for element in dtd.iterelements():
        assert f"<{element.name}>" in text or f"<{element.name} " in text, element.name
        for attribute in element.iterattributes():
            assert f"{attribute.name}=" in text, (element.name, attribute.name)


def test_limits_match_the_loader() -> None:
    """The LIMITS table states the ranges config.py enforces."""
    limits = render("vhostmd.conf.5").split("LIMITS", 1)[1].split("EXAMPLE", 1)[0]
    for element, (low, high) in (
        ("update_period", host_config.UPDATE_PERIOD_RANGE),
        ("max_channels", host_config.MAX_CHANNELS_RANGE),
        ("expiration_time", host_config.EXPIRATION_TIME_RANGE),
        ("size", (MIN_DISK_SIZE, MAX_DISK_SIZE)),
        ("metrics_endpoint", host_config.ENDPOINT_PORT_RANGE),
    ):
        assert re.search(rf"<{element}>\s+{low} to {high}\b", limits), element


def test_install_host_installs_every_page() -> None:
    """scripts/install-host copies docs/man/*.N into $ROOT/usr/local/share/man/manN."""
    script = (REPO / "scripts" / "install-host").read_text()
    assert "usr/local/share/man/man$section" in script
    assert sorted(p.name for p in MAN.iterdir() if p.suffix in (".1", ".5", ".8")) == sorted(PAGES)
