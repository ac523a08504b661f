"""vhostmd_py.assemble: publishers and cycle steps plug into the loop alike; a reload
swaps only what changed. Real daemon, real disks, the libvirt test driver."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Callable, List

import pytest
from helpers.config import write_config
from helpers.daemon import metrics_of
from helpers.monitor import ScriptedSource, fast_clock
from vhostmd_wire.disk import read_disk, read_header

from vhostmd_py.assemble import Slot
from vhostmd_py.config import Config, load_config
from vhostmd_py.cycle.render import ExtraMetric, append_metrics, document
from vhostmd_py.cycle.snapshot import Snapshot
from vhostmd_py.daemon import Daemon
from vhostmd_py.errors import VhostmdError
from vhostmd_py.sources.shell.runner import ActionRunner
from vhostmd_py.sources.stats import CycleStats


def _runner(config: Config) -> ActionRunner:
    return ActionRunner(path=config.path, uri="test:///default", timeout=10)


class CountingStep:
    """A cycle step: counts the statistics it observed, publishes the count on the host."""

    reads_stats = True

    def __init__(self, period: int) -> None:
        self.period = period
        self.observed: List[CycleStats | None] = []
        self.reconfigured: List[int] = []
        self.closed = False

    async def observe(self, stats: CycleStats | None) -> None:
        self.observed.append(stats)

    def decorate(self, snapshot: Snapshot) -> Snapshot:
        count = ExtraMetric("Observed", "uint32", None, str(len(self.observed)))
        return append_metrics(snapshot, [count], {})

    def reconfigure(self, config: Config) -> bool:
        self.reconfigured.append(config.update_period)
        return config.update_period == self.period  # a new period: build me anew

    async def close(self) -> None:
        self.closed = True


class RecordingPublisher:
    """A publisher: keeps every document it was given."""

    where = None

    def __init__(self, *, keep: bool = True) -> None:
        self.documents: List[bytes] = []
        self.keep = keep
        self.closed = False

    def publish(self, snapshot: Snapshot, *, listed: bool) -> bool | None:
        self.documents.append(document(snapshot))
        return None

    def reconfigure(self, config: Config) -> bool:
        return self.keep

    def close(self) -> None:
        self.closed = True


def _builder(made: List[Any], make: Callable[[Config], Any]) -> Callable[[Config], Any]:
    def build(config: Config) -> Any:
        part = make(config)
        made.append(part)
        return part

    return build


def test_a_publisher_and_a_step_plug_in_through_the_assembler(tmp_path: Path) -> None:
    """The step sees each cycle's statistics and its metric reaches every publisher."""
    disk = tmp_path / "vhostmd0"
    conf = write_config(tmp_path / "c.xml", disk, [("A", "int32", "host", "echo 1")])
    steps: List[CountingStep] = []
    publishers: List[RecordingPublisher] = []
    source = ScriptedSource([{}])
    daemon = Daemon(
        load_config(conf), uri="test:///default", runner_factory=_runner, clock=fast_clock(),
        stats_source=source,
        extra_slots=[
            Slot("probe-step", "step", lambda c: True,
                 _builder(steps, lambda c: CountingStep(c.update_period))),
            Slot("probe-publisher", "publisher", lambda c: True,
                 _builder(publishers, lambda c: RecordingPublisher())),
        ],
    )
    daemon.open_disk()
    asyncio.run(daemon.run(max_cycles=3, signals=False))
    assert len(steps) == len(publishers) == 1
    step, publisher = steps[0], publishers[0]
    assert len(step.observed) == 3 and source.calls == 3
    assert all(isinstance(s, CycleStats) for s in step.observed)
    assert [metrics_of(d) for d in publisher.documents] == [
        {("A", "host"): "1", ("Observed", "host"): str(n)} for n in (1, 2, 3)
    ]
    # Every publisher is given the same snapshot: the shared disk has the same bytes.
    assert read_disk(disk) == publisher.documents[-1]
    assert step.closed and publisher.closed


def test_a_step_without_statistics_needs_no_reading(tmp_path: Path) -> None:
    """No step reads statistics: the cycle reads none (the scripted source is never called)."""
    conf = write_config(tmp_path / "c.xml", tmp_path / "vhostmd0",
                        [("A", "int32", "host", "echo 1")])
    source = ScriptedSource([{}])
    step = CountingStep(1)
    step.reads_stats = False
    daemon = Daemon(load_config(conf), uri="test:///default", runner_factory=_runner,
                    clock=fast_clock(), publish=False, stats_source=source,
                    extra_slots=[Slot("probe", "step", lambda c: True, lambda c: step)])
    asyncio.run(daemon.run(max_cycles=2, signals=False))
    assert source.calls == 0
    assert step.observed == [None, None]


async def _cycles(daemon: Daemon, count: int) -> None:
    while daemon.cycles < count:
        await asyncio.sleep(0.01)


def test_reload_swaps_only_what_changed(tmp_path: Path) -> None:
    """New metrics and disk size: the same disk (resized), the same step (reconfigured);
    a new disk path and period: a new disk (the old one closed, busy clear), a new step."""
    disk = tmp_path / "vhostmd0"
    conf = write_config(tmp_path / "c.xml", disk, [("A", "int32", "host", "echo 1")], period=30)
    steps: List[CountingStep] = []
    daemon = Daemon(load_config(conf), uri="test:///default", runner_factory=_runner,
                    config_loader=load_config, stats_source=ScriptedSource([{}]),
                    extra_slots=[Slot("probe", "step", lambda c: True,
                                      _builder(steps, lambda c: CountingStep(c.update_period)))])
    daemon.open_disk()
    seen: List[Any] = []
    moved = tmp_path / "moved" / "vhostmd0"
    moved.parent.mkdir()

    async def main() -> None:
        task = asyncio.ensure_future(daemon.run(signals=False))
        await _cycles(daemon, 1)
        seen.append(daemon.parts.get("vbd"))
        write_config(conf, disk, [("B", "int32", "host", "echo 2")], period=30, size=128)
        daemon.request_reload()
        await _cycles(daemon, 2)
        seen.append(daemon.parts.get("vbd"))
        write_config(conf, moved, [("B", "int32", "host", "echo 2")], period=31)
        daemon.request_reload()
        await _cycles(daemon, 3)
        seen.append(daemon.parts.get("vbd"))
        daemon.request_stop()
        await task

    asyncio.run(main())
    first, resized, new = seen
    assert resized is first  # resized in place, not re-created
    assert disk.stat().st_size == 128 * 1024
    assert metrics_of(read_disk(disk)) == {("B", "host"): "2", ("Observed", "host"): "2"}
    assert new is not first and first.disk.closed
    assert read_header(disk).busy == 0
    assert metrics_of(read_disk(moved)) == {("B", "host"): "2", ("Observed", "host"): "1"}
    # The step took the first reload in place and was built anew for the new period.
    assert len(steps) == 2
    assert steps[0].reconfigured == [30, 31] and steps[0].closed
    assert steps[1].observed and steps[1].closed


def test_a_refused_reload_closes_what_it_built_and_keeps_every_part(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An early part that cannot be built refuses the new config: the parts it already
    built for it are closed, the ones in force stay and go on publishing."""
    disk = tmp_path / "vhostmd0"
    conf = write_config(tmp_path / "c.xml", disk, [("A", "int32", "host", "echo 1")], period=30)
    publishers: List[RecordingPublisher] = []

    def refuse_period_31(config: Config) -> CountingStep:
        if config.update_period == 31:
            raise VhostmdError("no identity for you", "probe: no identity for you")
        return CountingStep(config.update_period)

    daemon = Daemon(
        load_config(conf), uri="test:///default", runner_factory=_runner,
        config_loader=load_config,
        extra_slots=[
            Slot("probe-publisher", "publisher", lambda c: True,
                 _builder(publishers, lambda c: RecordingPublisher(keep=False)), early=True),
            Slot("probe-step", "step", lambda c: True, refuse_period_31, early=True),
        ],
    )
    daemon.open_disk()
    vbd_before: List[Any] = []

    async def main() -> None:
        task = asyncio.ensure_future(daemon.run(signals=False))
        await _cycles(daemon, 1)
        vbd_before.append(daemon.parts.get("vbd"))
        write_config(conf, disk, [("B", "int32", "host", "echo 2")], period=31)
        daemon.request_reload()
        await _cycles(daemon, 2)
        daemon.request_stop()
        await task

    asyncio.run(main())
    assert "keeping the previous configuration: probe: no identity for you" in caplog.text
    assert daemon.config.update_period == 30
    # Built for the refused config, then closed; the one in force published both cycles.
    assert len(publishers) == 2
    in_force, staged = publishers
    assert staged.closed and staged.documents == []
    # The step in force stayed too: its count goes on.
    assert [metrics_of(d) for d in in_force.documents] == [
        {("A", "host"): "1", ("Observed", "host"): str(n)} for n in (1, 2)
    ]
    assert metrics_of(read_disk(disk)) == {("A", "host"): "1", ("Observed", "host"): "2"}


def test_reload_restarts_the_history_only_when_it_changed(tmp_path: Path) -> None:
    """New metrics: the same History goes on; a new retention: a new History."""
    disk = tmp_path / "vhostmd0"
    state = tmp_path / "history"

    def conf_with(action: str, retention: str) -> Path:
        return write_config(tmp_path / "c.xml", disk, [("A", "int32", "host", action)],
                            size=256, period=30,
                            extra=f'<history state_dir="{state}" retention="{retention}"/>')

    conf = conf_with("echo 1", "7d")
    daemon = Daemon(load_config(conf), uri="test:///default", runner_factory=_runner,
                    config_loader=load_config)
    daemon.open_disk()
    seen: List[Any] = []

    async def main() -> None:
        task = asyncio.ensure_future(daemon.run(signals=False))
        await _cycles(daemon, 1)
        seen.append(daemon.history)
        conf_with("echo 2", "7d")
        daemon.request_reload()
        await _cycles(daemon, 2)
        seen.append(daemon.history)
        conf_with("echo 2", "8d")
        daemon.request_reload()
        await _cycles(daemon, 3)
        seen.append(daemon.history)
        daemon.request_stop()
        await task

    asyncio.run(main())
    first, kept, restarted = seen
    assert first is not None and kept is first
    assert restarted is not None and restarted is not first
    assert restarted.config.retention == 8 * 86400
    assert metrics_of(read_disk(disk)) == {("A", "host"): "2"}
