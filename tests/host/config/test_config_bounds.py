"""Every integer of vhostmd.conf is bounded at load time (docs/man/vhostmd.conf.5, LIMITS).

A fuzzer found that `update_period` or `expiration_time` of 10**309 passed
`--dump`, raised OverflowError in daemon mode, and that a SIGHUP to such a
config killed a running daemon. These tests go through load_config and
through real `vhostmd` processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest
from helpers import REPO
from helpers import config as helpers_config
from helpers.daemon import try_read, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhostmd_py.config import (
    EXPIRATION_TIME_RANGE,
    MAX_CHANNELS_RANGE,
    UPDATE_PERIOD_RANGE,
    load_config,
    parse_config,
)
from vhostmd_py.errors import ConfigError

HUGE = str(10**309)

# Line numbers matter: the error must name the element's line (helpers.config's layout
# with a <virtio> block).
LINES = {"size": 8, "max_channels": 11, "expiration_time": 12, "update_period": 14}
DEFAULTS = {"disk": "/dev/shm/unused", "unit": "k", "size": "64", "max_channels": "16",
            "expiration_time": "15", "update_period": "1", "action": "echo one"}


def config_text(**values: str) -> str:
    """The test config with some values replaced."""
    v = {**DEFAULTS, **values}
    return helpers_config.config_text(
        v["disk"], [("Stamp", "string", "host", v["action"])],
        size=v["size"], unit=v["unit"], period=v["update_period"],
        virtio={"max_channels": v["max_channels"], "expiration_time": v["expiration_time"]},
    )


def write(path: Path, **values: str) -> Path:
    """Write the test config to PATH."""
    path.write_text(config_text(**values))
    return path


def test_lines_name_the_elements() -> None:
    """LINES really are where the config puts each element."""
    lines = config_text().splitlines()
    for element, line in LINES.items():
        assert lines[line - 1].lstrip().startswith(f"<{element}"), (element, lines[line - 1])


@pytest.mark.parametrize("element", ["update_period", "expiration_time", "max_channels", "size"])
def test_huge_numbers_are_refused_with_file_line_and_range(tmp_path: Path, element: str) -> None:
    """10**309 in any numeric element: ConfigError naming the file, line, element and range."""
    path = write(tmp_path / "vhostmd.conf", **{element: HUGE})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert err.file == str(path)
    assert err.line == LINES[element]
    assert str(err).startswith(f"{path}:{LINES[element]}: ")
    word = "disk size" if element == "size" else element
    assert word in err.reason
    assert "(310 characters)" in err.reason  # shortened, not 310 digits
    assert len(str(err)) < 300
    if element == "size":
        assert "(1024 - 268435456)" in err.reason
    else:
        assert "allowed: 1 to" in err.reason


@pytest.mark.parametrize(
    ("element", "bounds", "below"),
    [
        ("update_period", UPDATE_PERIOD_RANGE, "Specified update period"),
        ("expiration_time", EXPIRATION_TIME_RANGE, "Specified expiration_time"),
        ("max_channels", MAX_CHANNELS_RANGE, "Specified max_channels"),
    ],
)
def test_ranges_are_closed_and_documented_in_the_message(
    element: str, bounds: Tuple[int, int], below: str
) -> None:
    """The minimum and maximum load; one past either side is refused naming the range."""
    low, high = bounds
    for good in (low, high):
        config = parse_config(config_text(**{element: str(good)}).encode())
        got = {"update_period": config.update_period,
               "max_channels": config.virtio.max_channels,
               "expiration_time": config.virtio.expiration_time}[element]
        assert got == good or (element == "expiration_time" and got == 3)  # raised to 3 x period
    for bad, wording in ((low - 1, below), (high + 1, f"{element} {high + 1} is out of range")):
        with pytest.raises(ConfigError) as info:
            parse_config(config_text(**{element: str(bad)}).encode(), file="f.conf")
        assert wording in info.value.reason
        assert f"allowed: {low} to {high}" in info.value.reason
        assert info.value.line == LINES[element]


@pytest.mark.parametrize("text", ["1_000", "\u0661\u0662", "0x10", "1e3", "12 3", " "])
def test_only_plain_ascii_integers(text: str) -> None:
    """Python's int() accepts '1_000' and Arabic-Indic digits; upstream's strtol does not."""
    with pytest.raises(ConfigError, match="is not an integer"):
        parse_config(config_text(update_period=text).encode())


def test_size_bounds_keep_upstream_wording() -> None:
    """<size> keeps upstream's message at both ends of 1024 .. 256 MiB."""
    assert parse_config(config_text(unit="m", size="256").encode()).disk_size == 256 * 2**20
    assert parse_config(config_text(unit="", size="1024").encode()).disk_size == 1024
    for unit, size in (("m", "257"), ("", "1023"), ("k", "-1")):
        with pytest.raises(ConfigError, match="not within supported range"):
            parse_config(config_text(unit=unit, size=size).encode())


_NUMBERS = st.one_of(
    st.integers(min_value=-(10**400), max_value=10**400).map(str),
    st.integers(min_value=-5, max_value=300000).map(str),
    st.text(alphabet="0123456789+-_ .eEx\u0661\u00b2", max_size=30),
    st.text(max_size=12).filter(lambda t: all(c not in t for c in "<&]")),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    element=st.sampled_from(["update_period", "expiration_time", "max_channels", "size"]),
    value=_NUMBERS,
    unit=st.sampled_from(["", "k", "K", "m", "M", "b"]),
)
def test_mutated_numbers_raise_only_config_error(element: str, value: str, unit: str) -> None:
    """Fuzz: any mutated number either loads within its range or raises ConfigError."""
    text = config_text(unit=unit, **{element: value})
    try:
        config = parse_config(text.encode("utf-8"), file="fuzz.conf")
    except ConfigError as err:
        assert err.file == "fuzz.conf"
        return
    assert UPDATE_PERIOD_RANGE[0] <= config.update_period <= UPDATE_PERIOD_RANGE[1]
    assert MAX_CHANNELS_RANGE[0] <= config.virtio.max_channels <= MAX_CHANNELS_RANGE[1]
    assert EXPIRATION_TIME_RANGE[0] <= config.virtio.expiration_time <= EXPIRATION_TIME_RANGE[1]
    assert 1024 <= config.disk_size <= 256 * 2**20


# --- through the real daemon ----------------------------------------------------


def vhostmd(*args: str, **kwargs: object) -> subprocess.CompletedProcess[bytes]:
    """Run the `vhostmd` command of this checkout to completion."""
    return subprocess.run(
        [sys.executable, "-c", "from vhostmd_py.cli import main; main()", *args],
        capture_output=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO)),
        check=False, **kwargs,  # type: ignore[call-overload]
    )


@pytest.mark.parametrize("element", ["update_period", "expiration_time"])
@pytest.mark.parametrize("mode", [["--once"], ["--dump"], []])
def test_daemon_refuses_huge_values_at_start_up(
    shm_dir: Path, element: str, mode: List[str]
) -> None:
    """`vhostmd -d [--once|--dump]` with 10**309: exit 1 at once, file:line, no traceback."""
    config = write(shm_dir / "vhostmd.conf", disk=str(shm_dir / "vhostmd0"), **{element: HUGE})
    pid = ["-p", str(shm_dir / "vhostmd.pid")]  # as root, -d alone takes /var/run's
    proc = vhostmd("-d", "-f", str(config), "-c", "test:///default", *pid, *mode)
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert f"{config}:{LINES[element]}: " in err
    assert "Traceback" not in err and "OverflowError" not in err
    assert not (shm_dir / "vhostmd0").exists()  # refused before anything was created


@pytest.fixture
def running(tmp_path: Path) -> Iterator[List[subprocess.Popen[bytes]]]:
    """Daemons started by a test, killed at its end."""
    procs: List[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize("element", ["update_period", "expiration_time"])
@pytest.mark.integration  # a daemon process, SIGHUP
def test_sighup_to_a_huge_value_keeps_the_running_config(
    shm_dir: Path, element: str, running: List[subprocess.Popen[bytes]]
) -> None:
    """SIGHUP to a config with 10**309: logged with file:line, old config kept, still publishing."""
    disk = shm_dir / "vhostmd0"
    log_path = shm_dir / "stderr.log"
    # A value that changes every cycle proves cycles go on after the refused reload.
    action = "date +%s%N"
    config = write(shm_dir / "vhostmd.conf", disk=str(disk), action=action)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from vhostmd_py.cli import main; main()",
             "-d", "-f", str(config), "-c", "test:///default", "-p", str(log_path) + ".pid"],
            stdout=subprocess.DEVNULL, stderr=log, env=dict(os.environ, PYTHONPATH=str(REPO)),
        )
    running.append(proc)
    first = wait_for(lambda: try_read(disk), 15, "the first publish")
    write(config, disk=str(disk), action=action, **{element: HUGE})
    proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "keeping the previous configuration" in log_path.read_text(), 10,
              "the refused reload")
    later = wait_for(lambda: (c := try_read(disk)) and c != first and c, 5, "a later cycle")
    time.sleep(2.5)  # two more periods of the old config (update_period 1)
    assert proc.poll() is None, log_path.read_text()
    assert try_read(disk) not in (None, later)
    text = log_path.read_text()
    assert f"{config}:{LINES[element]}: " in text
    assert "Traceback" not in text and "OverflowError" not in text
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
