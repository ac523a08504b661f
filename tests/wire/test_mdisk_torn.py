"""Torn reads: a writer process republishing as fast as it can against reader processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
from helpers import cread
from vhostmd_wire.disk import read_header

pytest.importorskip("vhostmd_py.publish.mdisk", reason="the host package is not installed")

DURATION = 10.0  # seconds the readers read while the writer writes
DISK_SIZE = 128 * 1024
# Every byte of a document names it, and lengths differ (A and D share one,
# so only the content and its checksum tell them apart): any mix of two
# documents, or of a document with an old tail, is not one of these.
DOCS: List[Tuple[str, int]] = [("A", 3000), ("B", 70000), ("C", 10), ("D", 3000)]
MIN_READS_PER_READER = 200  # a starving reader fails the test

_PRELUDE = r"""
import importlib, json, os, sys, time
DOCS = {letter: letter.encode() * n for letter, n in json.loads(sys.argv[1])}
path = sys.argv[2]
"""

_WRITER = (
    _PRELUDE
    + r"""
mod = importlib.import_module(sys.argv[3])
stop = sys.argv[4]
docs = list(DOCS.values())
disk = mod.MetricsDisk.create(path, int(sys.argv[5]))
disk.publish(docs[0])
print("ready", flush=True)
count = 0
while not os.path.exists(stop):
    for doc in docs:
        disk.publish(doc)
    count += len(docs)
disk.close()
print(json.dumps({"published": count}), flush=True)
"""
)

_READER = (
    _PRELUDE
    + r"""
from vhostmd_wire import disk as wire
if sys.argv[3] == "c":
    sys.path.insert(0, os.environ["VHOSTMD_TEST_HELPERS"])
    from helpers.cread import CReadStrategy as strategy
else:
    strategy = wire.PyReadStrategy
duration = float(sys.argv[4])
by_doc = {letter: 0 for letter in DOCS}
known = {doc: letter for letter, doc in DOCS.items()}
torn = errors = retries = 0

def sleep(seconds):
    global retries
    retries += 1
    time.sleep(seconds)

reader = wire.DiskReader(
    path, busy_timeout=10.0, retry_interval=0.0005, sleep=sleep, strategy=strategy()
)
deadline = time.monotonic() + duration
while time.monotonic() < deadline:
    try:
        content = reader.read()
    except Exception as err:  # counted and reported: must stay zero
        errors += 1
        print(f"read error: {err!r}", file=sys.stderr)
        continue
    letter = known.get(content)
    if letter is None:
        torn += 1
        if torn <= 3:
            print(f"TORN: {len(content)} bytes, bytes {sorted(set(content))[:8]}", file=sys.stderr)
    else:
        by_doc[letter] += 1
reader.close()
print(json.dumps({"impl": sys.argv[3], "direct": reader.direct, "by_doc": by_doc,
                  "torn": torn, "errors": errors, "retries": retries}), flush=True)
"""
)

# The control: upstream's read without the second header check and without
# the checksum. It proves the writer really races the readers, so that the
# zero torn reads of the real readers mean something.
_NAIVE_READER = (
    _PRELUDE
    + r"""
duration = float(sys.argv[3])
known = set(DOCS.values())
fd = os.open(path, os.O_RDONLY)
reads = torn = 0
deadline = time.monotonic() + duration
while time.monotonic() < deadline:
    header = os.pread(fd, 16, 0)
    if header[4:8] != bytes(4):
        continue
    length = int.from_bytes(header[12:16], "big")
    content = os.pread(fd, length, 16)
    reads += 1
    torn += content not in known
print(json.dumps({"impl": "naive", "reads": reads, "torn": torn}), flush=True)
"""
)


def _spawn(script: str, *args: str) -> subprocess.Popen[str]:
    # The readers import helpers.cread (the tests' build of C's read attempt).
    env = dict(os.environ, VHOSTMD_TEST_HELPERS=str(Path(__file__).resolve().parents[1]))
    return subprocess.Popen(
        [sys.executable, "-c", script, json.dumps(DOCS), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _result(proc: subprocess.Popen[str], timeout: float) -> Dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    assert "TORN" not in err and "read error" not in err, err
    parsed: Dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return parsed


@pytest.mark.slow
@pytest.mark.parametrize(
    ("writer", "readers"),
    [
        # The host writes through C only; readers: C's attempt and the wire's
        # pure Python, both under the wire's one retry policy.
        ("vhostmd_py.publish.mdisk", ["c", "c", "py"]),
    ],
    ids=["c-writer"],
)
def test_no_torn_reads(shm_dir: Path, writer: str, readers: List[str]) -> None:
    """Readers accept only whole documents while the writer republishes nonstop."""
    path = shm_dir / "vhostmd0"
    stop = shm_dir / "stop"
    cread.module()  # built (or found built) before the readers start their clocks
    wproc = _spawn(_WRITER, str(path), writer, str(stop), str(DISK_SIZE))
    try:
        assert wproc.stdout is not None
        assert wproc.stdout.readline().strip() == "ready"
        started = time.monotonic()
        rprocs = [_spawn(_READER, str(path), impl, str(DURATION)) for impl in readers]
        naive = _spawn(_NAIVE_READER, str(path), str(DURATION))
        results = [_result(p, DURATION + 60) for p in rprocs]
        control = _result(naive, DURATION + 60)
        elapsed = time.monotonic() - started
    finally:
        stop.touch()
        wout, werr = wproc.communicate(timeout=60)
    assert wproc.returncode == 0, werr
    published = json.loads(wout.strip().splitlines()[-1])["published"]

    print(f"\nwriter {writer}: {published} publishes in {elapsed:.1f} s")
    for res in results:
        total = sum(res["by_doc"].values())
        print(
            f"reader {res['impl']} (O_DIRECT={res['direct']}): {total} accepted "
            f"{res['by_doc']}, {res['retries']} retries, {res['torn']} torn, "
            f"{res['errors']} errors"
        )
    print(f"control (no re-check, no checksum): {control['reads']} reads, {control['torn']} torn")

    assert elapsed >= DURATION
    assert published > 1000
    for res in results:
        assert res["torn"] == 0
        assert res["errors"] == 0
        assert sum(res["by_doc"].values()) >= MIN_READS_PER_READER
    # Every document got through to some reader, the 70000-byte one included
    # (its window is the shortest: the writer moves on to C at once).
    for letter, _ in DOCS:
        assert sum(res["by_doc"][letter] for res in results) > 0, letter
    # The race is real: the naive reader does see torn documents.
    assert control["torn"] > 0
    h = read_header(path)
    assert h.busy == 0 and h.has_signature
