#!/usr/bin/env python3
"""The OpenMetrics endpoint under abuse from loopback: the daemon's memory, threads, log, publishes.

Runs the real `vhostmd` daemon in the foreground (-v) against libvirt's test
driver node of N domains (default 10) with the native SAP profile
(conf/sap-vhostmd.conf, update period 1 s, <freshness> so each document
carries its PublicationTime, the endpoint on a free port), then, one phase
after the other:

- slow:      200 connections sending a request line, then one header byte a
             second for 6 s;
- oversized: 10 requests at once of 99 headers of 60 KB each;
- odd:       70 requests with methods other than GET (with a 100 KB body);
- rapid:     2,000 scrapes from 4 clients.

Reported: VmRSS before the attack, its maximum sampled every 20 ms during
it, VmRSS 3 s after it, VmHWM, the most threads seen, the bytes and
tracebacks the attack added to the log, the answers' status codes, and the
documents the metrics disk received during the attack against the cycles
due (PublicationTime read from the disk every 50 ms; largest gap).

Also reported: the cycles that published without fresh built-in values
(documents whose values were carried from an earlier cycle, ``age=``, and
the daemon's "libvirt statistics took more than N s: left out" lines).
--control SECONDS then runs the same daemon as long without any client, for
the same counts.

--checkout DIR runs another checkout's daemon (e.g. a worktree of an older
commit, its C extensions built in place) with this interpreter, so two
versions are compared in one session.

Usage: python bench/bench_endpoint_abuse.py [--n 10] [--checkout DIR] [--control S] [--json FILE]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Counter, Dict, List

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "guest"))
from vhostmd_wire.disk import read_disk  # noqa: E402

NODES = REPO / "tests" / "data" / "golden" / "upstream" / "nodes"
PORT = re.compile(r"serving OpenMetrics on http://127\.0\.0\.1:(\d+)/metrics")
PUBLISHED = re.compile(rb"<name>PublicationTime</name>\s*<value>([0-9.]+)</value>")


def proc_status(pid: int) -> Dict[str, int]:
    out: Dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads"):
                out[key] = int(value.split()[0])
    return out


def config(workdir: Path) -> Path:
    text = (REPO / "conf" / "sap-vhostmd.conf").read_text()
    text = text.replace("/dev/shm/vhostmd0", str(workdir / "vhostmd0"))
    text = text.replace("<update_period>60</update_period>", "<update_period>1</update_period>")
    text = text.replace('<size unit="k">256</size>', '<size unit="k">4096</size>')  # 1000 VMs fit
    text = text.replace("</globals>", '<metrics_endpoint port="0"/>'
                        '<freshness identity="no"/></globals>')
    path = workdir / "vhostmd.conf"
    path.write_text(text)
    return path


def answer_code(sock: socket.socket) -> str:
    sock.settimeout(30)
    data = b""
    with contextlib.suppress(OSError):
        while len(data) < 64:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    match = re.match(rb"HTTP/1\.[01] (\d{3})", data)
    return match.group(1).decode() if match else "reset"


def request(port: int, data: bytes) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        return answer_code(sock)


def scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
            r.read()
            return str(r.status)
    except urllib.error.HTTPError as err:
        return str(err.code)
    except OSError:
        return "error"


def attack(port: int, codes: Dict[str, Counter[str]]) -> None:
    slow = []
    for _ in range(200):
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            sock.sendall(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
            slow.append(sock)
        except OSError:
            codes["slow"]["connect failed"] += 1
    for _ in range(6):
        time.sleep(1)
        for sock in slow:
            with contextlib.suppress(OSError):
                sock.send(b"a")
    for sock in slow:
        with contextlib.suppress(OSError):
            sock.send(b"\r\n\r\n")
        codes["slow"][answer_code(sock)] += 1
        sock.close()

    huge = b"GET /metrics HTTP/1.1\r\n" + b"".join(
        b"X-Big-%d: %s\r\n" % (i, b"x" * 60_000) for i in range(99)) + b"\r\n"
    threads = [threading.Thread(target=lambda: codes["oversized"].update([request(port, huge)]))
               for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)

    body = b"x" * 100_000
    for _ in range(10):
        for method in (b"POST", b"PUT", b"DELETE", b"OPTIONS", b"TRACE", b"PATCH", b"BREW"):
            codes["odd"][request(port, b"%s / HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s"
                                 % (method, len(body), body))] += 1

    def scraper() -> None:
        for _ in range(500):
            codes["rapid"][scrape(port)] += 1

    threads = [threading.Thread(target=scraper) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)


def run(checkout: Path, node: Path, control: float | None = None) -> Dict[str, object]:
    """The attack on CHECKOUT's daemon, or CONTROL seconds without any client."""
    workdir = Path(tempfile.mkdtemp(prefix="vhostmd-bench-abuse-"))
    log_path = workdir / "daemon.log"
    disk = workdir / "vhostmd0"
    args = [sys.executable, "-c", "from vhostmd_py.cli import main; main()", "-d", "-v",
            "-f", str(config(workdir)), "-c", f"test://{node}", "-p", str(workdir / "pid")]
    env = dict(os.environ, PYTHONPATH=f"{checkout}:{checkout / 'guest'}")
    try:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log, env=env,
                                    cwd=checkout)
            try:
                deadline = time.monotonic() + 60
                port = None
                while port is None or b"cycle 3:" not in log_path.read_bytes():
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise SystemExit(log_path.read_text()[-3000:])
                    found = PORT.search(log_path.read_text())
                    port = int(found.group(1)) if found else None
                    time.sleep(0.05)
                for _ in range(20):
                    scrape(port)
                time.sleep(1)
                before = proc_status(proc.pid)
                log_before = log_path.stat().st_size
                tracebacks_before = log_path.read_text().count("Traceback")

                stop = threading.Event()
                peak = dict(before)
                seen: List[float] = []
                carried: List[float] = []  # documents with a value carried (age=)

                def sample() -> None:
                    while not stop.wait(0.02):
                        now = proc_status(proc.pid)
                        for key in ("VmRSS", "Threads"):
                            peak[key] = max(peak.get(key, 0), now.get(key, 0))

                def watch() -> None:
                    while not stop.wait(0.05):
                        with contextlib.suppress(Exception):
                            content = read_disk(disk, busy_timeout=0.2)
                            found = PUBLISHED.search(content)
                            if found and (not seen or float(found.group(1)) != seen[-1]):
                                seen.append(float(found.group(1)))
                                if b"<metric age=" in content:
                                    carried.append(seen[-1])

                helpers = [threading.Thread(target=sample), threading.Thread(target=watch)]
                for t in helpers:
                    t.start()
                codes: Dict[str, Counter[str]] = collections.defaultdict(collections.Counter)
                started = time.time()
                if control is None:
                    attack(port, codes)
                else:
                    time.sleep(control)
                ended = time.time()
                time.sleep(3)
                stop.set()
                for t in helpers:
                    t.join(5)
                after = proc_status(proc.pid)
                text = log_path.read_text(errors="replace")
            finally:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                proc.wait(30)
        during = [t for t in seen if started <= t <= ended]
        gaps = [b - a for a, b in zip(during, during[1:])]
        added = text.encode()[log_before:].decode(errors="replace")
        return {
            "checkout": str(checkout),
            "run": "attack" if control is None else f"control, {control:.0f} s without clients",
            "rss_before_kib": before["VmRSS"],
            "rss_peak_kib": peak["VmRSS"],
            "rss_after_kib": after.get("VmRSS"),
            "hwm_kib": after.get("VmHWM"),
            "threads_before": before["Threads"],
            "threads_peak": peak["Threads"],
            "log_bytes": len(text.encode()) - log_before,
            "tracebacks": text.count("Traceback") - tracebacks_before,
            "endpoint_lines": len(re.findall(r"metrics endpoint: ", text)),
            "commonest_lines": collections.Counter(
                re.sub(r"\d+(\.\d+)?", "N", line)
                for line in text.encode()[log_before:].decode(errors="replace").splitlines()
            ).most_common(3),
            "attack_s": round(ended - started, 1),
            "documents": len(during),
            "largest_gap_s": round(max(gaps), 2) if gaps else None,
            "documents_with_carried_values": len([t for t in carried if started <= t <= ended]),
            "left_out_lines": added.count("left out"),
            "codes": {phase: dict(c) for phase, c in codes.items()},
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--checkout", type=Path, action="append")
    parser.add_argument("--control", type=float, metavar="SECONDS",
                        help="then run each daemon this long without clients")
    parser.add_argument("--json", type=Path)
    opts = parser.parse_args()
    node = NODES / f"node-{opts.n}.xml"
    results = []
    for checkout in opts.checkout or [REPO]:
        results.append(run(checkout.resolve(), node))
        if opts.control:
            results.append(run(checkout.resolve(), node, opts.control))
    for r in results:
        print(json.dumps(r))
    if opts.json:
        opts.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
