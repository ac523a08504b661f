#!/usr/bin/env python3
"""Soak: the real daemon for a long run at N VMs, scraped, with history, alarms and accounting.

The daemon (this venv's `vhostmd`, foreground, -v) runs the SAP profile
(conf/sap-vhostmd.conf: built-in sources) plus one shell action per VM, a
private 4 MiB disk, update period --period s, against libvirt's test driver
node of N domains (tests/data/golden/upstream/nodes/node-N.xml), with
<history> (publish="yes"), <alarms> (cpu_usage, network_usage), <accounting>
(a budget per VM) and <metrics_endpoint> on a free loopback port. A client
thread scrapes the endpoint with urllib (OpenMetrics, gzip every other
time) every --scrape-interval s, each request bounded by a 10 s timeout.

Every --sample s it records the daemon's VmRSS, VmHWM, open fds and
threads, its cycles so far (the -v lines), the scrapes (ok / failed) and
whether the disk's last publish is readable. Samples go to
OUT/samples.jsonl as they come (the run can be read while it lasts);
OUT/summary.json and the printed table at the end. "Flat" means: after the
warm-up (the first --warmup s: history files created, caches filled), RSS
grew by at most --rss-tolerance MB from its median over the first quarter
of the steady samples to its median over the last quarter, and fds and
threads never left their warm-up range (max - min <= 2 after warm-up).

Usage: python bench/soak.py [--minutes 30] [--n 1000] [--period 5] [--sample 30]
       [--out /var/tmp/vhostmd-soak] [--scrape-interval 1]
"""

from __future__ import annotations

import argparse
import gzip
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
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_footprint import status_fields  # noqa: E402

NODES = (REPO / "tests" / "data" / "golden" / "upstream" / "nodes",
         REPO.parent / "shared" / "golden" / "upstream" / "nodes")
CYCLE = re.compile(r"cycle (\d+): (\d+) metrics, (\d+) VMs, ([0-9.]+) s")
PORT = re.compile(r"serving OpenMetrics on http://127\.0\.0\.1:(\d+)/metrics")
ACCEPT = "application/openmetrics-text; version=1.0.0; charset=utf-8"


@dataclass
class Sample:
    """One sample of the daemon."""

    t: float  # seconds since the daemon started
    rss_kb: int
    hwm_kb: int
    fds: int
    threads: int
    cycles: int
    last_cycle_s: float
    vms: int
    scrapes_ok: int
    scrapes_failed: int
    disk_ok: bool


class Scraper(threading.Thread):
    """Scrapes the endpoint every INTERVAL s until stopped (a bounded loop)."""

    def __init__(self, port: int, interval: float) -> None:
        super().__init__(name="soak-scraper", daemon=True)
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.interval = interval
        self.stop = threading.Event()
        self.ok = 0
        self.failed = 0
        self.last_error = ""
        self.body = 0

    def run(self) -> None:
        n = 0
        while not self.stop.wait(self.interval):
            n += 1
            headers = {"Accept": ACCEPT}
            if n % 2:
                headers["Accept-Encoding"] = "gzip"
            try:
                request = urllib.request.Request(self.url, headers=headers)
                with urllib.request.urlopen(request, timeout=10) as response:
                    data = response.read()
                    if response.headers.get("Content-Encoding") == "gzip":
                        data = gzip.decompress(data)
                if not data.rstrip().endswith(b"# EOF"):
                    raise ValueError(f"no '# EOF' at the end ({len(data)} bytes)")
                self.body = len(data)
                self.ok += 1
            except (OSError, ValueError, urllib.error.URLError) as err:
                self.failed += 1
                self.last_error = repr(err)


def config(workdir: Path, period: int) -> Path:
    """The SAP profile + one vm action, history, alarms, accounting and the endpoint."""
    text = (REPO / "conf" / "sap-vhostmd.conf").read_text()
    text = text.replace("/dev/shm/vhostmd0", str(workdir / "vhostmd0"))
    text = re.sub(r"<update_period>\d+</update_period>", f"<update_period>{period}</update_period>",
                  text)
    text = text.replace('<size unit="k">256</size>', '<size unit="k">4096</size>')
    state = workdir / "state"
    globals_extra = (f'<history state_dir="{state / "history"}" retention="1d" publish="yes"/>'
                     '<metrics_endpoint address="127.0.0.1" port="0"/>')
    text = text.replace("</globals>", globals_extra + "</globals>")
    action = ('    <metric type="string" context="vm">\n      <name>Ident</name>\n'
              "      <action>echo NAME-VMID</action>\n    </metric>\n")
    sections = (f'  <alarms state_dir="{state / "alarms"}" '
                f'journal_socket="{state / "journal.sock"}" guest_metrics="yes">\n'
                "    <alarm><name>cpu_usage</name><alarm_trigger_level>0.9</alarm_trigger_level>"
                "<alarm_trigger_period>60</alarm_trigger_period></alarm>\n"
                "    <alarm><name>network_usage</name>"
                "<alarm_trigger_level>1000000</alarm_trigger_level>"
                "<alarm_trigger_period>60</alarm_trigger_period></alarm>\n"
                "  </alarms>\n"
                f'  <accounting period="1d" state_dir="{state / "accounting"}" '
                'guest_metrics="yes">\n'
                '    <budget tx="10G" rx="10G" enforce="no"/>\n'
                "  </accounting>\n")
    text = text.replace("</metrics>", action + "</metrics>\n" + sections)
    path = workdir / "vhostmd.conf"
    path.write_text(text)
    return path


def disk_ok(disk: Path) -> bool:
    """Whether the disk holds a published, not busy document (header check)."""
    try:
        with open(disk, "rb") as handle:
            head = handle.read(16)
    except OSError:
        return False
    return (len(head) == 16 and head[:4] == b"mvbd" and head[4:8] == bytes(4)
            and int.from_bytes(head[12:16], "big") > 0)


def summarize(samples: List[Sample], warmup: float, tolerance_mb: float) -> Dict[str, object]:
    """Flat or not, and the figures that say so.

    A sample taken during a cycle sees that cycle's transient objects and its
    running actions' pipes (five fds each): RSS, fds and threads are judged
    by both the median and the lowest value (between cycles) of the first
    and the last quarter of the steady samples.
    """
    steady = [s for s in samples if s.t >= warmup]
    if len(steady) < 4:
        return {"flat": None, "reason": "too few samples after the warm-up"}
    quarter = max(1, len(steady) // 4)
    first, last = steady[:quarter], steady[-quarter:]

    def med(group: List[Sample], attr: str) -> float:
        return float(statistics.median(getattr(s, attr) for s in group))

    def low(group: List[Sample], attr: str) -> int:
        return int(min(getattr(s, attr) for s in group))

    growth_mb = (med(last, "rss_kb") - med(first, "rss_kb")) / 1024
    floor_growth_mb = (low(last, "rss_kb") - low(first, "rss_kb")) / 1024
    span_h = (steady[-1].t - steady[0].t) / 3600 or float("nan")
    # Least-squares slope of RSS over the steady samples.
    ts = [s.t for s in steady]
    rs = [s.rss_kb / 1024 for s in steady]
    mt, mr = statistics.mean(ts), statistics.mean(rs)
    var = sum((t - mt) ** 2 for t in ts)
    slope = sum((t - mt) * (r - mr) for t, r in zip(ts, rs)) / var * 3600 if var else 0.0
    fds = [s.fds for s in steady]
    threads = [s.threads for s in steady]
    flat = (growth_mb <= tolerance_mb and floor_growth_mb <= tolerance_mb
            and low(last, "fds") - low(first, "fds") <= 2
            and low(last, "threads") - low(first, "threads") <= 2)
    return {
        "flat": flat,
        "steady_samples": len(steady),
        "rss_median_first_quarter_mb": round(med(first, "rss_kb") / 1024, 1),
        "rss_median_last_quarter_mb": round(med(last, "rss_kb") / 1024, 1),
        "rss_growth_mb": round(growth_mb, 2),
        "rss_floor_first_quarter_mb": round(low(first, "rss_kb") / 1024, 1),
        "rss_floor_last_quarter_mb": round(low(last, "rss_kb") / 1024, 1),
        "rss_floor_growth_mb": round(floor_growth_mb, 2),
        "rss_slope_mb_per_hour": round(slope, 2),
        "rss_min_max_mb": [round(min(rs), 1), round(max(rs), 1)],
        "span_hours": round(span_h, 3),
        "vmhwm_mb": round(samples[-1].hwm_kb / 1024, 1),
        "fds_min_max": [min(fds), max(fds)],
        "fds_floor_first_last": [low(first, "fds"), low(last, "fds")],
        "threads_min_max": [min(threads), max(threads)],
        "threads_floor_first_last": [low(first, "threads"), low(last, "threads")],
        "cycles": samples[-1].cycles,
        "scrapes_ok": samples[-1].scrapes_ok,
        "scrapes_failed": samples[-1].scrapes_failed,
        "disk_ok_every_sample": all(s.disk_ok for s in samples),
    }


def resummarize(opts: argparse.Namespace) -> int:
    """The verdict again, from a finished run's OUT/samples.jsonl (keeps its other figures)."""
    samples = [Sample(**json.loads(line))
               for line in (opts.out / "samples.jsonl").read_text().splitlines() if line]
    old_path = opts.out / "summary.json"
    old = json.loads(old_path.read_text()) if old_path.is_file() else {}
    minutes = old.get("minutes", samples[-1].t / 60 if samples else 0)
    warmup = opts.warmup if opts.warmup is not None else max(60.0, float(minutes) * 6)
    keep = {k: old[k] for k in ("commit", "n", "period_s", "minutes", "exit_status",
                                "tracebacks", "errors_logged", "scrape_last_error",
                                "scrape_body_bytes") if k in old}
    summary = {**summarize(samples, warmup, opts.rss_tolerance), **keep, "warmup_s": warmup}
    old_path.write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0 if summary.get("flat") else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--period", type=int, default=5)
    parser.add_argument("--sample", type=float, default=30.0, help="seconds between samples")
    parser.add_argument("--warmup", type=float, default=None,
                        help="seconds left out of the verdict (default: a tenth, at least 60)")
    parser.add_argument("--scrape-interval", type=float, default=1.0)
    parser.add_argument("--rss-tolerance", type=float, default=2.0, help="MB")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "vhostmd-soak")
    parser.add_argument("--summarize", action="store_true",
                        help="only recompute OUT/summary.json from OUT/samples.jsonl")
    opts = parser.parse_args()
    if opts.summarize:
        return resummarize(opts)
    node = next((d / f"node-{opts.n}.xml" for d in NODES if (d / f"node-{opts.n}.xml").is_file()),
                None)
    if node is None:
        raise SystemExit(f"no node-{opts.n}.xml in {', '.join(map(str, NODES))}")
    duration = opts.minutes * 60
    warmup = opts.warmup if opts.warmup is not None else max(60.0, duration / 10)
    opts.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="vhostmd-soak-", dir="/dev/shm"
                                    if os.path.isdir("/dev/shm") else None))
    conf = config(workdir, opts.period)
    shutil.copy(conf, opts.out / "vhostmd.conf")
    script = Path(sys.executable).parent / "vhostmd"
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "vhostmd_py.cli"]
    log_path = opts.out / "daemon.log"
    samples_path = opts.out / "samples.jsonl"
    head = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h %ad %s",
                           "--date=format:%H:%M"],
                          capture_output=True, text=True).stdout.strip()[:100]
    print(f"soak: commit {head}; N={opts.n}, period {opts.period} s, {opts.minutes:g} min, "
          f"sample every {opts.sample:g} s, out {opts.out}", flush=True)
    samples: List[Sample] = []
    scraper: Scraper | None = None
    with open(log_path, "wb") as log, open(samples_path, "w") as out:
        start = time.monotonic()
        proc = subprocess.Popen([*cmd, "-d", "-v", "-f", str(conf), "-c", f"test://{node}",
                                 "-p", str(workdir / "pid")], stdout=subprocess.DEVNULL,
                                stderr=log)
        try:
            next_sample = start + opts.sample
            while time.monotonic() - start < duration:
                if proc.poll() is not None:
                    raise SystemExit(f"the daemon exited ({proc.returncode}); see {log_path}")
                text = log_path.read_text(errors="replace")
                if scraper is None:
                    found = PORT.search(text)
                    if found:
                        scraper = Scraper(int(found.group(1)), opts.scrape_interval)
                        scraper.start()
                now = time.monotonic()
                if now >= next_sample:
                    next_sample += opts.sample
                    cycles = CYCLE.findall(text)
                    st = status_fields(proc.pid)
                    sample = Sample(
                        t=round(now - start, 1), rss_kb=st.get("VmRSS", 0),
                        hwm_kb=st.get("VmHWM", 0),
                        fds=len(os.listdir(f"/proc/{proc.pid}/fd")),
                        threads=st.get("Threads", 0), cycles=len(cycles),
                        last_cycle_s=float(cycles[-1][3]) if cycles else float("nan"),
                        vms=int(cycles[-1][2]) if cycles else 0,
                        scrapes_ok=scraper.ok if scraper else 0,
                        scrapes_failed=scraper.failed if scraper else 0,
                        disk_ok=disk_ok(workdir / "vhostmd0"))
                    samples.append(sample)
                    out.write(json.dumps(asdict(sample)) + "\n")
                    out.flush()
                    print(f"{sample.t:7.0f} s  RSS {sample.rss_kb / 1024:6.1f} MB  "
                          f"HWM {sample.hwm_kb / 1024:6.1f} MB  fds {sample.fds:3}  "
                          f"threads {sample.threads:2}  cycles {sample.cycles:4} "
                          f"(last {sample.last_cycle_s:.2f} s, {sample.vms} VMs)  "
                          f"scrapes {sample.scrapes_ok}/{sample.scrapes_failed} failed  "
                          f"disk {'ok' if sample.disk_ok else 'NOT OK'}", flush=True)
                time.sleep(min(1.0, max(0.0, next_sample - time.monotonic())))
        finally:
            if scraper is not None:
                scraper.stop.set()
                scraper.join(15)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            shutil.rmtree(workdir, ignore_errors=True)
    text = log_path.read_text(errors="replace")
    summary = summarize(samples, warmup, opts.rss_tolerance)
    summary.update({
        "commit": head, "n": opts.n, "period_s": opts.period, "minutes": opts.minutes,
        "warmup_s": warmup, "exit_status": code,
        "tracebacks": text.count("Traceback"),
        "errors_logged": sum(1 for line in text.splitlines() if ": ERROR: " in line),
        "scrape_last_error": scraper.last_error if scraper else "",
        "scrape_body_bytes": scraper.body if scraper else 0,
    })
    (opts.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0 if summary.get("flat") and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
