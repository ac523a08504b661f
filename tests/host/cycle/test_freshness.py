"""Freshness and identity host metrics (host side)."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import time
from pathlib import Path

import pytest
from helpers.pervm import write_conf
from lxml import etree
from vhostmd_wire.disk import read_disk
from vhostmd_wire.protocol import FRESHNESS_PERIOD, FRESHNESS_TIME, HOST_IDENTITY

from vhostmd_py.config import FreshnessConfig, load_config
from vhostmd_py.cycle.freshness import Freshness, host_identity
from vhostmd_py.daemon import Daemon
from vhostmd_py.errors import ConfigError, IdentityError
from vhostmd_py.sources.shell.runner import ActionRunner


def _host(doc: bytes) -> dict[str, etree._Element]:
    return {str(m.findtext("name")): m for m in etree.fromstring(doc).iter("metric")
            if m.get("context") == "host"}


def _cfg(tmp: Path, key: str = "key", machine: str = "machine-id") -> FreshnessConfig:
    return FreshnessConfig(identity_key=str(tmp / "state" / key), machine_id=str(tmp / machine))


def test_metrics_names_types_units(tmp_path: Path) -> None:
    """The three elements, typed as protocol.py says, the time with 3 decimals."""
    (tmp_path / "machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    fresh = Freshness(_cfg(tmp_path), 5, wall=lambda: 1700000000.12345)
    host = _host(b"<metrics>" + fresh.render() + b"</metrics>")
    assert [(m.get("type"), m.get("unit"), m.findtext("value")) for m in host.values()] == [
        ("real64", "s", "1700000000.123"),
        ("uint32", "s", "5"),
        ("string", None, fresh.identity),
    ]
    assert list(host) == [FRESHNESS_TIME, FRESHNESS_PERIOD, HOST_IDENTITY]
    assert fresh.identity is not None and len(fresh.identity) == 32
    assert int(fresh.identity, 16) >= 0 and fresh.identity == fresh.identity.lower()


def test_identity_stable_keyed_and_anonymous(tmp_path: Path) -> None:
    """Same key + machine-id: same identity; another key or machine-id: another; no hostname."""
    (tmp_path / "machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    (tmp_path / "other-id").write_text("fedcba9876543210fedcba9876543210\n")
    first = host_identity(_cfg(tmp_path))
    key = tmp_path / "state" / "key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(key.read_bytes()) == 32
    assert host_identity(_cfg(tmp_path)) == first  # a restart: the key is reused
    assert host_identity(_cfg(tmp_path, key="key2")) != first
    assert host_identity(_cfg(tmp_path, machine="other-id")) != first
    assert first is not None
    for secret in (socket.gethostname(), "0123456789abcdef0123456789abcdef"):
        assert secret.lower() not in first
    assert sorted(os.listdir(tmp_path / "state")) == ["key", "key2"]  # no temporaries


def test_identity_without_machine_id_uses_a_stored_random_id(tmp_path: Path) -> None:
    """No /etc/machine-id: a random host id beside the key, stable across restarts."""
    one = host_identity(_cfg(tmp_path))
    assert (tmp_path / "state" / "host-id").is_file()
    assert host_identity(_cfg(tmp_path)) == one
    os.unlink(tmp_path / "state" / "host-id")
    assert host_identity(_cfg(tmp_path)) != one  # a new host


def test_identity_off_and_bad_key(tmp_path: Path) -> None:
    """identity="no": no HostIdentity; a short key file is an IdentityError naming it."""
    fresh = Freshness(FreshnessConfig(identity_key=None), 1)
    assert fresh.identity is None and HOST_IDENTITY.encode() not in fresh.render()
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "key").write_bytes(b"short")
    with pytest.raises(IdentityError, match="too short") as info:
        host_identity(_cfg(tmp_path))
    assert info.value.path == str(tmp_path / "state" / "key")


def test_config_freshness(tmp_path: Path) -> None:
    """Defaults, explicit paths, identity="no", and relative paths refused with the line."""
    cfg = load_config(write_conf(tmp_path, "<freshness/>"))
    assert cfg.freshness == FreshnessConfig("/var/lib/vhostmd/identity.key", "/etc/machine-id")
    cfg = load_config(write_conf(
        tmp_path, '<freshness identity_key="/k" machine_id="/m" identity="no"/>'))
    assert cfg.freshness == FreshnessConfig(None, "/m")
    with pytest.raises(ConfigError, match="not an absolute path") as info:
        load_config(write_conf(tmp_path, '<freshness identity_key="k"/>'))
    assert info.value.line == 13
    # After <disk_per_vm> only: the content model's order.
    with pytest.raises(ConfigError, match="DTD"):
        load_config(write_conf(tmp_path, '<freshness/><disk_per_vm path="/d/%u"/>'))


def test_daemon_publishes_freshness_on_every_disk(tmp_path: Path) -> None:
    """PublicationTime within the cycle, UpdatePeriod, HostIdentity: shared and per-VM disks."""
    (tmp_path / "machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    conf = load_config(write_conf(
        tmp_path, f'<disk_per_vm path="{tmp_path}/pervm/%u" size="8" unit="k"/>'
        f'<freshness identity_key="{tmp_path}/state/key" machine_id="{tmp_path}/machine-id"/>'))
    daemon = Daemon(conf, uri="test:///default",
                    runner_factory=lambda c: ActionRunner(path=c.path, uri=None, timeout=10))
    daemon.open_disk()
    before = time.time()
    asyncio.run(daemon.run(max_cycles=1, signals=False))
    after = time.time()
    identity = host_identity(conf.freshness)  # type: ignore[arg-type]
    disks = [tmp_path / "vhostmd0", tmp_path / "pervm" / "6695eb01-f6a4-8304-79aa-97f2502e193f"]
    for disk in disks:
        host = _host(read_disk(disk, direct=False))
        published = float(host[FRESHNESS_TIME].findtext("value") or "")
        assert before - 0.001 <= published <= after + 0.001
        assert host[FRESHNESS_PERIOD].findtext("value") == "1"
        assert host[HOST_IDENTITY].findtext("value") == identity
        assert "HostTag" in host  # the configured host metrics stay
