"""Micro-benchmark of action spawning: how cheaply can we run N `sh -c 'echo ...'`?

Compares, on the same N actions (default 3000 = perf-echo3 x 1000 domains):
- asyncio: asyncio.create_subprocess_exec + communicate() (the obvious way);
- inline:  ActionRunner(spawn_threads=0): os.posix_spawn on the loop thread;
- threads: ActionRunner() default: glibc posix_spawn via ctypes in worker threads
           (releases the GIL, so several execs overlap with the event loop);
- serial:  ActionRunner(max_concurrency=1), one after another like upstream.
Rounds are interleaved so machine noise hits every variant alike; the table
gives medians over rounds of wall time, our process's CPU and the children's
CPU. Optionally (--cycle) also one collect() of perf-echo3 x node-1000 and
perf-virsh1 x node-100 (the daemon's targets: 1.5 s and 4.5 s).

Run: .venv/bin/python bench/bench_actions.py [-n 3000] [--rounds 3] [--cycle]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Awaitable, Callable, Dict, List, Tuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vhostmd_py.actions import ActionRunner  # noqa: E402

PATH = "/usr/sbin:/sbin:/usr/bin:/bin"


async def _asyncio_variant(n: int, concurrency: int) -> None:
    sem = asyncio.Semaphore(concurrency)
    env = dict(os.environ, PATH=PATH)

    async def one(i: int) -> bytes:
        async with sem:
            proc = await asyncio.create_subprocess_exec(
                "/bin/sh",
                "-c",
                f"echo vm{i}-{i}",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                start_new_session=True,
            )
            out, _ = await proc.communicate()
            return out

    outs = await asyncio.gather(*(one(i) for i in range(n)))
    assert outs[7] == b"vm7-7\n"


def _runner_variant(**kwargs: int) -> Callable[[int, int], Awaitable[None]]:
    async def run(n: int, concurrency: int) -> None:
        opts = {"max_concurrency": concurrency, **kwargs}
        runner = ActionRunner(path=PATH, **opts)  # type: ignore[arg-type]
        try:
            results = await asyncio.gather(*(runner.run(f"echo vm{i}-{i}") for i in range(n)))
        finally:
            runner.close()
        assert results[7].ok and results[7].stdout == b"vm7-7\n"

    return run


def _drive(fn: Callable[[int, int], Awaitable[None]], n: int, concurrency: int) -> None:
    asyncio.run(fn(n, concurrency))  # type: ignore[arg-type]


def _measure(fn: Callable[[], None]) -> Tuple[float, float, float]:
    t0, c0 = time.perf_counter(), os.times()
    fn()
    t1, c1 = time.perf_counter(), os.times()
    own = (c1.user - c0.user) + (c1.system - c0.system)
    children = (c1.children_user - c0.children_user) + (c1.children_system - c0.children_system)
    return t1 - t0, own, children


def _cycle(node: Path, config_name: str) -> Tuple[float, float, float, int]:
    import libvirt

    from vhostmd_py.collector import collect
    from vhostmd_py.config import load_config
    from vhostmd_py.model import VM

    uri = f"test://{node}"
    conn = libvirt.open(uri)
    vms = [
        VM(d.ID(), d.name(), d.UUIDString())
        for d in (conn.lookupByID(i) for i in conn.listDomainsID())
    ]
    config = load_config(REPO.parent / "shared/golden/upstream/configs" / config_name)
    runner = ActionRunner(path=config.path, uri=uri)
    size = 0

    def run() -> None:
        nonlocal size
        size = len(asyncio.run(collect(config, vms, runner)).document())

    wall, own, children = _measure(run)
    runner.close()
    return wall, own, children, size


def main() -> None:
    """Entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=3000, help="actions per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=None, help="default: the runner's")
    ap.add_argument("--serial", action="store_true", help="also run the serial variant")
    ap.add_argument("--cycle", action="store_true", help="also one collect() per perf config")
    args = ap.parse_args()
    concurrency = args.concurrency or ActionRunner().max_concurrency
    variants: Dict[str, Callable[[int, int], Awaitable[None]]] = {
        "asyncio subprocess": _asyncio_variant,
        "ActionRunner inline os.posix_spawn": _runner_variant(spawn_threads=0),
        "ActionRunner threads (default)": _runner_variant(),
    }
    if args.serial:
        variants["ActionRunner serial (max_concurrency=1)"] = _runner_variant()
    results: Dict[str, List[Tuple[float, float, float]]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            conc = 1 if "serial" in name else concurrency
            results[name].append(_measure(functools.partial(_drive, fn, args.n, conc)))
    print(
        f"{args.n} actions `sh -c 'echo ...'`, concurrency {concurrency}, "
        f"{os.cpu_count()} CPUs, median of {args.rounds} interleaved rounds\n"
    )
    print("| variant | wall (s) | our CPU (s) | children CPU (s) | our CPU per action (us) |")
    print("|---|---|---|---|---|")
    med: Dict[str, float] = {}
    for name, rows in results.items():
        wall = statistics.median(r[0] for r in rows)
        own = statistics.median(r[1] for r in rows)
        kids = statistics.median(r[2] for r in rows)
        med[name] = wall
        print(f"| {name} | {wall:.3f} | {own:.3f} | {kids:.3f} | {own / args.n * 1e6:.0f} |")
    base = med["asyncio subprocess"]
    print("\n| ratio (same run) | value |\n|---|---|")
    for name, wall in med.items():
        if name != "asyncio subprocess":
            print(f"| asyncio wall / {name} wall | {base / wall:.2f} |")
    if args.cycle:
        nodes = REPO.parent / "shared/golden/upstream/nodes"
        for config_name, node, upstream in (
            ("perf-echo3.xml", "node-1000.xml", 3.09),
            ("perf-virsh1.xml", "node-100.xml", 7.61),
        ):
            wall, own, kids, size = _cycle(nodes / node, config_name)
            print(
                f"\ncollect() {config_name} x {node}: wall {wall:.3f} s, our CPU {own:.3f} s, "
                f"children CPU {kids:.3f} s, document {size} bytes "
                f"(upstream median cycle {upstream} s, FACTS section 6)"
            )


if __name__ == "__main__":
    main()
