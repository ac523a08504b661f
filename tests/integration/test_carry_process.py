"""Complete documents on time, through a real daemon: slow metrics keep their last value.

Period 1 (deadline 0.8 s). SLOW always takes longer than a period, HANG
answers once and then hangs: every document after the first complete one
holds SLOW, HANG is carried until the action timeout (4 s here) and then
left out, logged once, while FAST is fresh in every document.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Dict, List, Tuple

from helpers.config import write_config
from helpers.daemon import Vhostmd, try_read, wait_for
from lxml import etree


def _metrics(doc: bytes) -> Dict[str, Tuple[str, str | None]]:
    root = etree.fromstring(doc)
    return {m.findtext("name"): (m.findtext("value"), m.get("age"))
            for m in root.iter("metric")}


def _watch(disk: Path, seconds: float) -> List[Tuple[float, bytes]]:
    """Every distinct document published during SECONDS, with when it was first seen."""
    seen: List[Tuple[float, bytes]] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        doc = try_read(disk)
        if doc and (not seen or seen[-1][1] != doc):
            seen.append((time.monotonic(), doc))
        time.sleep(0.05)
    return seen


def test_slow_metric_is_in_every_document_and_hung_one_is_dropped_once(tmp_path: Path) -> None:
    disk = tmp_path / "vhostmd0"
    flag = tmp_path / "answered"
    conf = write_config(
        tmp_path / "vhostmd.conf", disk,
        [("FAST", "uint64", "host", "date +%s%N"),
         ("SLOW", "uint64", "host", "sleep 1.3; date +%s"),
         ("HANG", "uint64", "host", f"if [ -e {flag} ]; then sleep 60; else touch {flag}; "
                                    "echo 3; fi")],
        extra="<freshness/>",
    )
    daemon = Vhostmd(["-d", "-f", str(conf), "--action-timeout", "4"], tmp_path)
    try:
        wait_for(lambda: (d := try_read(disk)) and b"<name>SLOW</name>" in d, 10,
                 "a document with SLOW")
        docs = _watch(disk, 8.5)
    finally:
        daemon.close()
    parsed = [(t, _metrics(d)) for t, d in docs]
    assert len(parsed) >= 7, "one publish per period"
    # SLOW and FAST: in every document after the first complete one.
    assert all("SLOW" in m and "FAST" in m for _, m in parsed)
    # FAST is fresh in each (its value changes every cycle and is never aged).
    fast = [m["FAST"] for _, m in parsed]
    assert len({v for v, _ in fast}) == len(fast) and all(age is None for _, age in fast)
    # SLOW is carried in some documents, with its age (freshness on), then fresh again.
    ages = [m["SLOW"][1] for _, m in parsed]
    assert any(a is not None for a in ages) and any(a is None for a in ages)
    assert all(a is None or 0 <= int(a) <= 4 for a in ages)
    # HANG: carried with a growing age, then dropped (at most 5 periods old), not back.
    hang = [m.get("HANG") for _, m in parsed]
    present = [h for h in hang if h is not None]
    assert present and all(v == "3" for v, _ in present)
    first_gone = next(i for i, h in enumerate(hang) if h is None)
    assert all(h is None for h in hang[first_gone:])
    assert max(int(a) for _, a in present if a is not None) <= 4
    log = daemon.log()
    drops = re.findall(r"metric HANG: its value of \d+ s ago is no longer published", log)
    assert len(drops) == 1, log
