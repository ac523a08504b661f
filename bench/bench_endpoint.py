#!/usr/bin/env python3
"""Cycle time with and without the OpenMetrics endpoint, and scrape time, at N VMs.

Runs the real `vhostmd` daemon in the foreground (-v) against libvirt's test
driver node of N domains (default 1000) with the native SAP profile
(conf/sap-vhostmd.conf, update period 1 s, private disk), three ways:

- off:     no <metrics_endpoint>;
- idle:    the endpoint open, nobody scraping;
- scraped: the endpoint scraped back to back by one urllib client asking for
           OpenMetrics (far harsher than Prometheus' usual 15 s interval).

Cycle times come from the daemon's -v lines ("cycle N: M metrics, V VMs, X s");
the first cycle (libvirt connection) is left out, the median of the others is
reported. Scrape times are the client's wall time per GET (median, 95th
percentile, max), with the body size; the first scrape after each cycle
parses the new Snapshot, the others reuse it.

Usage: python bench/bench_endpoint.py [--n 1000] [--cycles 10] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List

REPO = Path(__file__).resolve().parent.parent
NODES = (REPO.parent / "shared" / "golden" / "upstream" / "nodes",
         REPO / "tests" / "data" / "golden" / "upstream" / "nodes")
CYCLE = re.compile(r"cycle (\d+): (\d+) metrics, (\d+) VMs, ([0-9.]+) s")
PORT = re.compile(r"serving OpenMetrics on http://127\.0\.0\.1:(\d+)/metrics")
ACCEPT = "application/openmetrics-text; version=1.0.0; charset=utf-8"


@dataclass(frozen=True)
class Result:
    """One mode's figures."""

    mode: str
    n: int
    cycles: int
    median: float
    scrapes: int
    scrape_median: float
    scrape_p95: float
    scrape_max: float
    body_bytes: int


def config(workdir: Path, endpoint: bool) -> Path:
    """The SAP profile with a private disk, period 1 s, and the endpoint when asked."""
    text = (REPO / "conf" / "sap-vhostmd.conf").read_text()
    text = text.replace("/dev/shm/vhostmd0", str(workdir / "vhostmd0"))
    text = text.replace("<update_period>60</update_period>", "<update_period>1</update_period>")
    text = text.replace("<size unit=\"k\">256</size>", "<size unit=\"k\">4096</size>")
    if endpoint:
        text = text.replace("</globals>", '<metrics_endpoint port="0"/></globals>')
    path = workdir / "vhostmd.conf"
    path.write_text(text)
    return path


def run(mode: str, n: int, want: int, node: Path) -> Result:
    """Run the daemon in MODE until WANT steady cycles; its figures."""
    workdir = Path(tempfile.mkdtemp(prefix="vhostmd-bench-endpoint-",
                                    dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    log_path = workdir / "daemon.log"
    args = [sys.executable, "-m", "vhostmd_py.cli", "-d", "-v",
            "-f", str(config(workdir, mode != "off")), "-c", f"test://{node}",
            "-p", str(workdir / "pid")]
    scrape_times: List[float] = []
    body = 0
    stop = threading.Event()

    def scraper(port: int) -> None:
        nonlocal body
        request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                         headers={"Accept": ACCEPT})
        while not stop.is_set():
            start = time.perf_counter()
            with urllib.request.urlopen(request, timeout=30) as response:
                data = response.read()
            scrape_times.append(time.perf_counter() - start)
            body = len(data)

    try:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log,
                                    env=dict(os.environ, PYTHONPATH=str(REPO)))
            thread = None
            took: List[float] = []
            try:
                deadline = time.monotonic() + 120 + want * 10
                while time.monotonic() < deadline and proc.poll() is None:
                    text = log_path.read_text()
                    if mode == "scraped" and thread is None:
                        found = PORT.search(text)
                        if found:
                            thread = threading.Thread(target=scraper, args=(int(found.group(1)),))
                            thread.start()
                    took = [float(m.group(4)) for m in CYCLE.finditer(text)
                            if int(m.group(3)) == n]
                    if len(took) >= want + 1:
                        break
                    time.sleep(0.05)
            finally:
                stop.set()
                if thread is not None:
                    thread.join(30)
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                proc.wait(30)
        if len(took) < 2:
            raise SystemExit(f"{mode}: too few cycles\n{log_path.read_text()[-3000:]}")
        steady = took[1:]
        st = sorted(scrape_times) or [float("nan")]
        return Result(mode, n, len(steady), statistics.median(steady), len(scrape_times),
                      statistics.median(st), st[int(0.95 * (len(st) - 1))], st[-1], body)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--json", type=Path)
    opts = parser.parse_args()
    node = next((d / f"node-{opts.n}.xml" for d in NODES if (d / f"node-{opts.n}.xml").is_file()),
                None)
    if node is None:
        raise SystemExit(f"no node-{opts.n}.xml in {', '.join(map(str, NODES))}")
    results = [run(mode, opts.n, opts.cycles, node) for mode in ("off", "idle", "scraped")]
    print(f"{'mode':8} {'N':>5} {'cycles':>6} {'median s':>9} {'scrapes':>7} "
          f"{'scrape med s':>12} {'p95 s':>7} {'max s':>7} {'body B':>8}")
    for r in results:
        print(f"{r.mode:8} {r.n:>5} {r.cycles:>6} {r.median:>9.4f} {r.scrapes:>7} "
              f"{r.scrape_median:>12.4f} {r.scrape_p95:>7.4f} {r.scrape_max:>7.4f} "
              f"{r.body_bytes:>8}")
    off = results[0].median
    print(f"cycle ratio idle/off {results[1].median / off:.3f}, "
          f"scraped/off {results[2].median / off:.3f}")
    if opts.json:
        opts.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
