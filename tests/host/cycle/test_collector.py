"""vhostmd_py.cycle.collect (and sources, render_value): golden documents, faults, order."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import struct
import time
from pathlib import Path
from typing import List, Sequence

import libvirt
import pytest
from helpers import DATA as TEST_DATA
from helpers.procs import alive

from vhostmd_py.config import Config, MetricSpec, Variable, load_config
from vhostmd_py.cycle.collect import collect
from vhostmd_py.cycle.render import XmlMetricValidator, document, parse_document, render_value
from vhostmd_py.cycle.snapshot import Snapshot
from vhostmd_py.sources.base import Request, ShellActionSource, SourceRegistry
from vhostmd_py.sources.shell.runner import ActionRunner
from vhostmd_py.sources.shell.substitution import substitute
from vhostmd_py.sources.vm import VM

DATA = TEST_DATA / "configs"
TEST_URI = "test:///default"


def _vms(uri: str) -> List[VM]:
    """Running domains in upstream's order (virConnectListDomains = listDomainsID)."""
    conn = libvirt.open(uri)
    try:
        return [
            VM(dom.ID(), dom.name(), dom.UUIDString())
            for dom in (conn.lookupByID(i) for i in conn.listDomainsID())
        ]
    finally:
        conn.close()


def _collect(
    config: Config,
    vms: Sequence[VM],
    uri: str | None = TEST_URI,
    timeout: float = 20.0,
    sources: SourceRegistry | None = None,
) -> Snapshot:
    runner = ActionRunner(path=config.path, uri=uri, timeout=timeout)
    try:
        return asyncio.run(collect(config, vms, runner, sources=sources))
    finally:
        runner.close()


def _golden_content(upstream: Path, name: str) -> bytes:
    raw = (upstream / "disks" / f"{name}.img").read_bytes()
    _sig, busy, _sum, length = struct.unpack(">4I", raw[:16])
    assert busy == 0
    return raw[16 : 16 + length]


# --- the deviations, applied to upstream's bytes one at a time ---------------

_VALUE = re.compile(rb"<value>(.*?)</value>", re.S)


def _strip_values(doc: bytes) -> bytes:
    """DEVIATION: trailing newlines/spaces of every value removed."""
    return _VALUE.sub(lambda m: b"<value>" + m.group(1).rstrip(b" \t\r\n") + b"</value>", doc)


def _element(doc: bytes, name: bytes) -> bytes:
    """The whole `  <metric ...>...</metric>\\n` element whose <name> is NAME."""
    match = re.search(
        rb"  <metric [^>]*>\n    <name>" + re.escape(name) + rb"</name>\n.*?  </metric>\n",
        doc,
        re.S,
    )
    assert match is not None, name
    return match.group(0)


@pytest.mark.parametrize("name", ["basic-1k", "basic-64k", "utf8-1k"])
def test_golden_documents_only_newlines_differ(upstream: Path, name: str) -> None:
    """Same config, same VM: upstream's document with trailing newlines removed."""
    golden = _golden_content(upstream, name)
    ours = document(_collect(load_config(upstream / "configs" / f"{name}.xml"), _vms(TEST_URI)))
    stripped = _strip_values(golden)
    assert stripped != golden  # upstream kept the newline (`<value>42\n</value>`)
    assert b"\n</value>" not in ours
    assert ours == stripped
    parse_document(ours)


def test_golden_edge_document(upstream: Path, caplog: pytest.LogCaptureFixture) -> None:
    """edge-4k: units, cap, multi-line, empty output; each deviation asserted separately."""
    golden = _golden_content(upstream, "edge-4k")
    with caplog.at_level(logging.WARNING):
        ours = document(
            _collect(load_config(upstream / "configs" / "edge-4k.xml"), _vms(TEST_URI))
        )
    expected = golden
    # 1. Trailing newline of each value removed; interior newlines kept (MultiLine).
    expected = _strip_values(expected)
    assert b"<value>1.5\n2.5</value>" in expected
    # 2. FewTokens (`echo 5`, variables GA, GB): upstream gave BOTH the whole
    #    output; we give GA the first token and leave GB out.
    gb = _element(expected, b"GB")
    assert b"<value>5</value>" in gb and b"<value>5</value>" in _element(expected, b"GA")
    expected = expected.replace(gb, b"")
    # 3. XmlMetric: upstream dropped it (no /etc/vhostmd/metric.dtd); we ship
    #    metric.dtd, so the valid element is inserted as is, first (reverse order).
    assert b"FromXml" not in golden
    xml = b"<metric type='uint32' context='host'><name>FromXml</name><value>3</value></metric>\n"
    expected = expected.replace(b"<metrics>\n", b"<metrics>\n" + xml, 1)
    # 4. MultiLine (real64, `1.5\n2.5`) does not fit its type: upstream published
    #    it (the guest then fails on it); we leave it out with a warning.
    multi = _element(expected, b"MultiLine")
    assert b"<value>1.5\n2.5</value>" in multi
    expected = expected.replace(multi, b"")
    assert any(
        "MultiLine" in r.getMessage() and "'1.5\\n2.5' is not a valid real64" in r.getMessage()
        for r in caplog.records
    )
    # Same in both: Fails (exit 3) omitted; Long cut at 255 bytes; units; order.
    assert b"Fails" not in golden and b"Fails" not in ours
    assert b"<value>" + b"x" * 255 + b"</value>" in ours
    assert ours == expected
    parse_document(ours)


def test_golden_rawxml_escaped(upstream: Path) -> None:
    """rawxml-1k: upstream wrote `a<b&c` raw (unparsable); we escape it."""
    golden = _golden_content(upstream, "rawxml-1k")
    assert b"<value>a<b&c\n</value>" in golden
    expected = _strip_values(golden).replace(b"a<b&c", b"a&lt;b&amp;c")
    ours = document(_collect(load_config(upstream / "configs" / "rawxml-1k.xml"), []))
    assert ours == expected
    assert parse_document(ours).findtext("metric/value") == "a<b&c"


def test_golden_negsum_invalid_utf8_left_out(
    upstream: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """negsum-1k: 255 raw 0x80 bytes are not XML; we leave the metric out, with a warning."""
    golden = _golden_content(upstream, "negsum-1k")
    assert b"<value>" + b"\x80" * 255 + b"</value>" in golden  # upstream's cap, raw bytes
    with caplog.at_level(logging.WARNING):
        ours = document(_collect(load_config(upstream / "configs" / "negsum-1k.xml"), []))
    expected = golden.replace(_element(golden, b"HighBytes"), b"")
    assert expected == b"<metrics>\n</metrics>\n"
    assert ours == expected
    assert any(
        "HighBytes" in r.getMessage() and "invalid UTF-8" in r.getMessage() for r in caplog.records
    )


def test_empty_token_does_not_crash(upstream: Path, caplog: pytest.LogCaptureFixture) -> None:
    """emptytok-1k (`echo 1,,2`) crashed upstream (SIGSEGV); the empty uint32 T2 is left out."""
    assert (upstream / "disks" / "emptytok-1k.exit_code.txt").read_text().strip() == "139"
    with caplog.at_level(logging.WARNING):
        doc = document(_collect(load_config(upstream / "configs" / "emptytok-1k.xml"), []))
    root = parse_document(doc)
    values = [(m.findtext("name"), m.findtext("value") or "") for m in root.findall("metric")]
    assert values == [("T1", "1"), ("T3", "2")]
    assert any(
        "variable T2 left out: value '' is not a valid uint32" in r.getMessage()
        for r in caplog.records
    )


# --- injection ---------------------------------------------------------------------


def test_injection_node_nothing_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Domains named like shell code: nothing runs; values are the name or the metric is refused."""
    monkeypatch.chdir(tmp_path)
    uri = f"test://{DATA / 'node-injection.xml'}"
    vms = _vms(uri)
    names = {vm.name for vm in vms}
    assert {"$(touch X)", "a;touch Y", "UUID", "NAME VMID", "it's", "new\nline"} <= names
    snapshot = _collect(load_config(DATA / "injection.xml"), vms, uri=uri)
    assert os.listdir(tmp_path) == []  # no X, Y, Z, W
    root = parse_document(document(snapshot))
    assert [b.vm for b in snapshot.vms] == vms
    for vm in vms:
        got = {
            m.findtext("name"): m.findtext("value")
            for m in root.findall("metric")
            if m.get("id") == str(vm.id)
        }
        want = {
            "Unquoted": vm.name,
            "Ident": f"{vm.name}-{vm.id}-{vm.uuid}",
            "SeedId": str(vm.id),
        }
        if substitute("NAME", vm, None) == vm.name:  # plain name: verbatim, as upstream
            want.update(Single=vm.name, Double=vm.name)
        # else: inside quotes an unsafe name is refused (the metric is left out)
        assert got == want, vm


def test_injection_refused_in_unsure_context(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Inside $(...) an unsafe name refuses the metric for that VM only, logged."""
    monkeypatch.chdir(tmp_path)
    spec = MetricSpec("Sub", "string", "vm", "echo $(echo NAME)", None)
    bad, good = VM(1, "a;touch Y", "u1"), VM(2, "vm0002", "u2")
    config = load_config(DATA / "injection.xml")
    config = Config(**{**config.__dict__, "metrics": (spec,)})
    with caplog.at_level(logging.WARNING):
        snapshot = _collect(config, [bad, good])
    assert snapshot.vms[0].xml == b""
    assert b"<value>vm0002</value>" in snapshot.vms[1].xml
    assert os.listdir(tmp_path) == []
    assert any(
        "metric Sub of VM 'a;touch Y' (id 1)" in r.getMessage() and "$(...)" in r.getMessage()
        for r in caplog.records
    )


# --- faults --------------------------------------------------------------------------


@pytest.mark.slow  # over 1.5 s: not in the fast tier
def test_faults_leave_the_rest_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Hang, crash, garbage, megabytes, failure: only those metrics are missing, all logged."""
    monkeypatch.chdir(tmp_path)
    config = load_config(DATA / "faults.xml")
    vms = _vms(TEST_URI)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING):
        snapshot = _collect(config, vms, timeout=1.5)
    elapsed = time.monotonic() - start
    assert elapsed < 15  # safety bound; the hung actions cost one 1.5 s timeout
    root = parse_document(document(snapshot))
    got = {m.findtext("name"): m.findtext("value") for m in root.findall("metric")}
    assert got == {"Before": "before", "After": "after", "VmGood": "test"}
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "metric Hangs: timed out" in messages
    assert "metric VmHangs of VM 'test' (id 1): timed out" in messages
    assert "metric Crashes: killed by SIGSEGV" in messages
    assert "metric Garbage left out: control character" in messages
    assert "metric Megabytes: output exceeds the limit" in messages
    assert "metric Fails: exit status 3; stderr: something broke" in messages
    # The hung action's background child was killed with it.
    child = int((tmp_path / "hang-child.pid").read_text())
    deadline = time.monotonic() + 3
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child)


def test_cancelled_cycle_kills_actions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cancelling collect() (daemon stop) ends at once and kills running actions."""
    monkeypatch.chdir(tmp_path)
    config = load_config(DATA / "faults.xml")
    runner = ActionRunner(path=config.path, timeout=60)

    async def main() -> None:
        task = asyncio.ensure_future(collect(config, [], runner))
        while not (tmp_path / "hang-child.pid").exists():
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    start = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - start < 10
    assert runner.running == 0
    runner.close()
    for name in ("hang-child.pid", "hang-shell.pid"):
        pid = int((tmp_path / name).read_text())
        deadline = time.monotonic() + 2
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not alive(pid), name


# --- values, groups, xml ----------------------------------------------------------


def test_group_values() -> None:
    """Tokens in variable order, extras ignored, missing ones left out, unit on each."""
    spec = MetricSpec(
        "G", "group", "host", "x", "MiB", (Variable("A", "uint32"), Variable("B", "int64"))
    )
    two = render_value(spec, None, b"7 ,8,9\n")
    assert two.count(b"<metric ") == 2
    assert b"<name>A</name>\n    <value>7</value>" in two
    assert b"<name>B</name>\n    <value>8</value>" in two
    assert two.count(b"unit='MiB'") == 2
    one = render_value(spec, None, b"5\n")
    assert one.count(b"<metric ") == 1 and b"<name>B</name>" not in one
    assert render_value(spec, None, None) == b""
    bad = render_value(spec, None, b"\xff,2")
    assert b"<name>A</name>" not in bad and b"<value>2</value>" in bad


@pytest.mark.parametrize(
    ("output", "problem"),
    [
        (b"<metric type='uint32' context='host'><name>A</name><value>1</value></metric>", None),
        (
            b"<metric type='string' context='vm' id='1' uuid='u' unit='s'><name>A</name>"
            b"<value>x</value></metric>\n  <metric type='int64' context='host'><name>B</name>"
            b"<value>2</value></metric>\n",
            None,
        ),
        (b"", "no <metric> element"),
        (b"42", "text outside"),
        (
            b"<metric type='xml' context='host'><name>A</name><value>1</value></metric>",
            "metric.dtd",
        ),
        (b"<metric type='int32' context='host'><value>1</value></metric>", "metric.dtd"),
        (b"<other/>", "not a <metric>"),
        (b"<metric type='int32' context='host'><name>A</name><value>1</value></metric>x", "text"),
        (
            b"<!-- c --><metric type='int32' context='host'>"
            b"<name>A</name><value>1</value></metric>",
            "comments",
        ),
        (
            b"<metric type='int32' context='host'><name>&x;</name><value>1</value></metric>",
            "not well-formed",
        ),
        (b"<metric type='int32' context='host'><name>A", "not well-formed"),
        (
            b"<metric type='int32' context='host'><name>\xff</name><value>1</value></metric>",
            "not well-formed",
        ),
    ],
)
def test_xml_metric_validation(output: bytes, problem: str | None) -> None:
    """xml metrics: only <metric> elements valid against metric.dtd are inserted."""
    found = XmlMetricValidator().problem(output)
    if problem is None:
        assert found is None
        spec = MetricSpec("X", "xml", "host", "x", None)
        assert render_value(spec, None, output + b" \n\n") == output.rstrip() + b"\n"
    else:
        assert found is not None and problem in found


def test_order_host_first_reverse_config_vm_order_kept(golden: Path) -> None:
    """Host metrics first, reverse config order; VM blocks in the order given."""
    uri = f"test://{golden / 'upstream' / 'nodes' / 'node-10.xml'}"
    vms = list(reversed(_vms(uri)))
    config = load_config(golden / "upstream" / "configs" / "node10-64k.xml")
    snapshot = _collect(config, vms, uri=uri)
    assert [b.vm for b in snapshot.vms] == vms
    root = parse_document(document(snapshot))
    names = [m.findtext("name") for m in root.findall("metric")]
    assert names[:4] == ["First", "Second", "Greeting", "Answer"]
    assert names[4:] == ["VCpus", "Ident"] * 10
    ids = [m.get("id") for m in root.findall("metric")][4::2]
    assert ids == [str(vm.id) for vm in vms]
    for block in snapshot.vms:
        assert f"<value>{block.vm.name}-{block.vm.id}-{block.vm.uuid}</value>".encode() in block.xml
        assert b"<name>VCpus</name>\n    <value>1</value>" in block.xml


# --- pluggable sources ---------------------------------------------------------------


class FileSource:
    """A built-in source: the metric's action names a file whose content is the value."""

    def __init__(self) -> None:
        self.calls = 0

    async def collect(self, metric: MetricSpec, vm: VM | None) -> bytes | None:
        self.calls += 1
        with open(metric.action.split(":", 1)[1], "rb") as fh:
            return fh.read(255)


class BrokenSource:
    """A source with a bug: it raises."""

    async def collect(self, metric: MetricSpec, vm: VM | None) -> bytes | None:
        raise RuntimeError("bug")


def test_pluggable_source_beside_shell(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A non-shell source serves some metrics; rendering and the rest are unchanged."""
    (tmp_path / "value").write_bytes(b"a<b \n")
    config = load_config(DATA / "injection.xml")
    metrics = (
        MetricSpec("Shell", "string", "host", "echo shell", None),
        MetricSpec("Builtin", "string", "host", f"file:{tmp_path / 'value'}", "u"),
        MetricSpec("Broken", "string", "host", "broken:", None),
    )
    config = Config(**{**config.__dict__, "metrics": metrics})
    runner = ActionRunner(path=config.path)
    files = FileSource()
    registry = SourceRegistry(
        ShellActionSource(runner, path=config.path),
        [
            (lambda m: m.action.startswith("file:"), files),
            (lambda m: m.action.startswith("broken:"), BrokenSource()),
        ],
    )
    with caplog.at_level(logging.ERROR):
        snapshot = asyncio.run(collect(config, [], runner, sources=registry))
    assert files.calls == 1
    assert snapshot.host == (
        b"  <metric type='string' context='host' unit='u'>\n"
        b"    <name>Builtin</name>\n"
        b"    <value>a&lt;b</value>\n"
        b"  </metric>\n"
        b"  <metric type='string' context='host'>\n"
        b"    <name>Shell</name>\n"
        b"    <value>shell</value>\n"
        b"  </metric>\n"
    )
    assert any("metric Broken: the source failed" in r.getMessage() for r in caplog.records)


class CountingShell(ShellActionSource):
    """The shell source, counting its calls."""

    def __init__(self, runner: ActionRunner, path: str) -> None:
        super().__init__(runner, path=path)
        self.batches: List[int] = []

    async def collect_many(self, requests: Sequence[Request]) -> List[bytes | None]:
        self.batches.append(len(requests))
        return await super().collect_many(requests)


class BrokenBatch:
    """A batch source with a bug."""

    async def collect(self, metric: MetricSpec, vm: VM | None) -> bytes | None:
        raise AssertionError("the collector must use collect_many")

    async def collect_many(self, requests: Sequence[Request]) -> List[bytes | None]:
        raise RuntimeError("bug")


def test_batch_sources_called_once_per_cycle(caplog: pytest.LogCaptureFixture) -> None:
    """Shell actions of a whole cycle go in one call; a failing batch source costs only its own."""
    host = MetricSpec("Host", "uint32", "host", "echo 7", None)
    vm_metric = MetricSpec("Ident", "string", "vm", "echo NAME-VMID", None)
    odd = MetricSpec("Odd", "string", "vm", "odd:", None)
    config = Config(**{**load_config(DATA / "injection.xml").__dict__,
                       "metrics": (host, vm_metric, odd)})
    runner = ActionRunner(path=config.path)
    shell = CountingShell(runner, config.path)
    registry = SourceRegistry(shell, [(lambda m: m.action == "odd:", BrokenBatch())])
    vms = [VM(i, f"vm{i}", f"00000000-0000-4000-8000-{i:012d}") for i in range(1, 6)]
    with caplog.at_level(logging.ERROR):
        snapshot = asyncio.run(collect(config, vms, runner, sources=registry))
    runner.close()
    assert shell.batches == [6]  # the host metric and 5 VMs' Ident, one call
    assert b"<value>7</value>" in snapshot.host
    for i, block in enumerate(snapshot.vms, start=1):
        assert f"<value>vm{i}-{i}</value>".encode() in block.xml
        assert b"Odd" not in block.xml
    assert any("5 metric(s): the source failed" in r.getMessage() for r in caplog.records)


def test_cut_utf8_sequence_trimmed(tmp_path: Path) -> None:
    """A multi-byte character cut by the 255-byte cap is dropped, not the whole value."""
    config = load_config(DATA / "injection.xml")
    spec = MetricSpec(
        "Cut", "string", "host", "printf 'a%.0s' $(seq 254); printf '\\303\\251'", None
    )
    config = Config(**{**config.__dict__, "metrics": (spec,)})
    snapshot = _collect(config, [])
    assert b"<value>" + b"a" * 254 + b"</value>" in snapshot.host


# --- the cycle's deadline -----------------------------------------------------

def test_deadline_publishes_what_is_ready_and_never_restarts_a_running_action(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Cycles with a deadline: the hung action is left out, started once, logged once; a slow
    one still running at one deadline gives its value to the next cycle."""
    starts = tmp_path / "starts"
    hang = MetricSpec("Hang", "string", "host", f"echo x >> {starts}; sleep 30", None)
    slow = MetricSpec("Slow", "string", "host", "sleep 0.6; echo late", None)
    fast = MetricSpec("Fast", "string", "vm", "echo NAME", None)
    config = Config(**{**load_config(DATA / "injection.xml").__dict__,
                       "metrics": (hang, slow, fast)})
    runner = ActionRunner(path=config.path, timeout=20)
    source = ShellActionSource(runner, path=config.path)
    vms = [VM(1, "one", "00000000-0000-4000-8000-000000000001")]

    async def cycles() -> List[tuple]:
        out = []
        for _ in range(3):
            begun = time.monotonic()
            snap = await collect(config, vms, runner, sources=SourceRegistry(source),
                                 deadline=begun + 0.4)
            out.append((time.monotonic() - begun, snap))
        return out

    with caplog.at_level(logging.WARNING):
        results = asyncio.run(cycles())
    runner.close()
    for took, snap in results:
        assert took < 1.0  # by the deadline (0.4 s), not the hung action's 30 s
        assert b"<value>one</value>" in snap.vms[0].xml
        assert b"Hang" not in snap.host
    assert b"Slow" not in results[0][1].host  # 0.6 s: past the first deadline
    assert b"<value>late</value>" in results[1][1].host  # ended within the second cycle
    assert starts.read_text() == "x\n"  # never started twice while it runs
    messages = [r.getMessage() for r in caplog.records]
    assert sum("metric Hang: action still running" in m for m in messages) == 1
    assert sum("metric Slow" in m and "has ended" in m for m in messages) == 1
