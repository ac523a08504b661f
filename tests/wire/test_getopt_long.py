"""vhostmd_wire.getopt_long: getopt_long's parsing and wording."""

from __future__ import annotations

from typing import List

import pytest
from vhostmd_wire import getopt_long

SHORT = "c:df:p:u:vh"
UPSTREAM = ("verbose", "no-daemonize", "config=", "pid-file=", "user=", "connect=", "help")
OURS = ("once", "dump", "jobs=", "action-timeout=", "version")


def parse(args: List[str]) -> list:
    return getopt_long.parse(args, SHORT, UPSTREAM, OURS)[0]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--conf", "x.xml"], [("--config", "x.xml")]),
        (["--conf=x.xml", "--no"], [("--config", "x.xml"), ("--no-daemonize", "")]),
        # Upstream's abbreviation of --verbose, not ambiguous with our --version:
        (["--ver"], [("--verbose", "")]),
        (["--v"], [("--verbose", "")]),
        (["--ve", "--once"], [("--verbose", ""), ("--once", "")]),
        (["--vers"], [("--version", "")]),
        (["--j", "4"], [("--jobs", "4")]),
        # A value that looks like an option is still the value:
        (["-f", "--ver"], [("-f", "--ver")]),
        (["--config", "--ver"], [("--config", "--ver")]),
        (["-vdf", "--ver"], [("-v", ""), ("-d", ""), ("-f", "--ver")]),
        (["-vd", "--ver"], [("-v", ""), ("-d", ""), ("--verbose", "")]),
        (["--", "--ver"], []),
    ],
)
def test_parses_as_getopt_long(args: List[str], expected: list) -> None:
    assert parse(args) == expected


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-x"], "invalid option -- 'x'"),
        (["-f"], "option requires an argument -- 'f'"),
        (["--bogus"], "unrecognized option '--bogus'"),
        (["--config"], "option '--config' requires an argument"),
        (["--help=1"], "option '--help' doesn't allow an argument"),
        (["--c", "x"], "option '--c' is ambiguous; possibilities: '--config' '--connect'"),
    ],
)
def test_errors_are_worded_as_glibc(args: List[str], message: str) -> None:
    with pytest.raises(getopt_long.OptionError) as err:
        parse(args)
    assert str(err.value) == message
