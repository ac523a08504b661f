"""process.life.preload: the modules a config's features use, and a refusal naming them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers.config import write_config

from vhostmd_py.cycle.gather import needs_vms
from vhostmd_py.errors import ConfigError
from vhostmd_py.process import life
from vhostmd_py.process.life import load_config

VM = ("Name", "string", "vm", "echo NAME")
HOST = ("Answer", "uint32", "host", "echo 42")


def _features(tmp_path: Path, metrics: list, **options: object) -> list:
    config = load_config(write_config(tmp_path / "c.conf", tmp_path / "disk", metrics, **options))
    return life.features(config)


def test_features_follow_the_config(tmp_path: Path) -> None:
    """Host actions only: the cycle and the disk; each section adds its own."""
    assert _features(tmp_path, [HOST]) == ["cycle", "vbd"]
    assert _features(tmp_path, [VM]) == ["cycle", "vbd", "libvirt"]
    history = f'<history state_dir="{tmp_path}" retention="1d"/>'
    assert _features(tmp_path, [HOST], extra=[history]) == [
        "cycle", "vbd", "libvirt", "builtin", "history"]
    endpoint = '<metrics_endpoint address="127.0.0.1" port="0"/>'
    assert _features(tmp_path, [HOST], extra=[endpoint]) == ["cycle", "vbd", "metrics_endpoint"]
    assert _features(tmp_path, [HOST], transports=("virtio",),
                     virtio={"max_channels": 4, "expiration_time": 15}) == [
        "cycle", "libvirt", "virtio"]


@pytest.mark.parametrize("metrics, extra", [
    ([HOST], []), ([VM], []), ([HOST], ['<freshness identity="no"/>']),
    ([HOST], ['<history state_dir="/var/tmp" retention="1d"/>']),
    (['    <metric type="uint64" context="host"><name>M</name>'
      "<source>host.mem_total_mib</source></metric>\n"], []),
    (['    <metric type="uint64" context="host"><name>M</name>'
      "<source>host.cpus</source></metric>\n"], []),
])
def test_libvirt_feature_is_the_cycles_rule(tmp_path: Path, metrics: list, extra: list) -> None:
    """features() says "libvirt" exactly when a cycle lists the VMs (gather.needs_vms)."""
    config = load_config(write_config(tmp_path / "c.conf", tmp_path / "disk", metrics,
                                      extra=extra))
    assert ("libvirt" in life.features(config)) == needs_vms(config, channels=False)


def test_a_config_imports_only_its_features_modules(tmp_path: Path) -> None:
    """In a fresh interpreter: a host-actions config's run imports no history, alarms,
    endpoint, virtio, libvirt or rrdtool module."""
    config = write_config(tmp_path / "c.conf", tmp_path / "disk", [HOST])
    code = (
        "import sys\n"
        "from vhostmd_py.cli import main\n"
        f"sys.argv = ['vhostmd', '-d', '--once', '-f', {str(config)!r}]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert (tmp_path / "disk").exists()
    unwanted = [m for m in out if m.startswith((
        "vhostmd_py.history", "vhostmd_py.monitors", "vhostmd_py.config.monitors",
        "vhostmd_py.publish.endpoint", "vhostmd_py.publish.virtio", "vhostmd_py.sources.vms",
        "vhostmd_py.sources.builtin.source", "vhostmd_py.cycle.freshness", "libvirt",
        "rrdtool", "prometheus_client", "ssl"))]
    assert unwanted == []


def test_a_module_that_cannot_be_imported_is_refused_naming_feature_and_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unimportable module of a feature is a ConfigError saying what to do."""
    history = f'<history state_dir="{tmp_path}" retention="1d"/>'
    config = load_config(write_config(tmp_path / "c.conf", tmp_path / "disk", [HOST],
                                      extra=[history]))
    monkeypatch.setitem(sys.modules, "vhostmd_py.history.step", None)  # import raises
    with pytest.raises(ConfigError) as info:
        life.preload(config)
    assert info.value.file == str(tmp_path / "c.conf")
    assert "history needs the module vhostmd_py.history.step" in str(info.value)
    assert "restart vhostmd" in str(info.value)


def test_libvirt_missing_is_no_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without libvirt-python the daemon publishes host metrics: preload goes on."""
    config = load_config(write_config(tmp_path / "c.conf", tmp_path / "disk", [VM]))
    monkeypatch.setitem(sys.modules, "libvirt", None)
    life.preload(config)
