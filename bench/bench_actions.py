"""Benchmark of the action hot path: how cheaply can we run N `echo ...` actions?

Compares, on the same N actions (default 3000 = perf-echo3 x 1000 domains):
- asyncio: asyncio.create_subprocess_exec("/bin/sh", "-c", ...) + communicate()
           (the obvious way: one exec per action);
- worker shells: ActionRunner as shipped (csrc/runner.c: a few `sh -s` workers
           per batch, each action a subshell of one of them, output on fifos,
           one poll() loop per batch in a worker thread), default concurrency;
- worker serial: the same with max_concurrency=1, one after another like upstream;
- with --old-rev REV: REV's runner (vhostmd_py/sources/shell/runner.py, earlier
           vhostmd_py/runner.py, actions.py before the split) with
           REV's csrc/runner.c built beside it (e.g. adf8109~1, the posix_spawn `sh -c` per action
           C runner), default concurrency and serial.
Rounds are interleaved so machine noise hits every variant alike; the tables
give medians over rounds of wall time, our process's CPU and the children's
CPU. --cycle also measures collect() of perf-echo3 x node-1000 (target 1.5 s,
upstream 3.09 s) and perf-virsh1 x node-100 (upstream 7.61 s) per variant.

Run: .venv/bin/python bench/bench_actions.py [-n 3000] [--rounds 3] [--cycle] [--old-rev REV]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vhostmd_py.sources.shell.runner import ActionRunner  # noqa: E402

PATH = "/usr/sbin:/sbin:/usr/bin:/bin"
NODES = REPO.parent / "shared/golden/upstream/nodes"
CONFIGS = REPO.parent / "shared/golden/upstream/configs"
CYCLES = (
    ("perf-echo3.xml", "node-1000.xml", 3.09),
    ("perf-virsh1.xml", "node-100.xml", 7.61),
)

Measure = Tuple[float, float, float]  # wall, our CPU, children CPU
BASE = "worker shells (default concurrency)"


def _git_show(rev: str, path: str) -> bytes:
    return subprocess.run(
        ["git", "-C", str(REPO), "show", f"{rev}:{path}"], check=True, capture_output=True
    ).stdout


def _load_old(rev: str) -> Any:
    """REV's runner binding (runner.py, actions.py before the split), importing REV's
    runner.c built now as vhostmd_py._bench_old_runner."""
    from cffi import FFI

    tmp = Path(tempfile.mkdtemp(prefix="bench-old-runner."))
    for name in ("runner.c", "runner.h"):
        (tmp / name).write_bytes(_git_show(rev, f"csrc/{name}"))
    ffi = FFI()
    ffi.cdef((tmp / "runner.h").read_text())
    ffi.set_source(
        "vhostmd_py._bench_old_runner",
        '#include <stdint.h>\n#include <stddef.h>\n#include "runner.h"',
        sources=[str(tmp / "runner.c")],
        include_dirs=[str(tmp)],
        extra_compile_args=["-O2", "-std=c99", "-D_GNU_SOURCE"],
    )
    built = ffi.compile(tmpdir=str(tmp))
    source = ""
    # Where the runner lived: the folders by stage, the flat package, before the split.
    for where in ("vhostmd_py/sources/shell/runner.py", "vhostmd_py/runner.py",
                  "vhostmd_py/actions.py"):
        try:
            source = _git_show(rev, where).decode()
            break
        except subprocess.CalledProcessError:
            continue
    if "from vhostmd_py.sources.shell import binding" in source:
        raise SystemExit(f"{rev}'s runner goes through its binding module: compare a revision "
                         "before it (this loader swaps the compiled module only)")
    (tmp / "old_actions.py").write_text(
        source.replace("from ._runner import", "from ._bench_old_runner import").replace(
            "from vhostmd_py.sources.shell._runner import",
            "from vhostmd_py._bench_old_runner import",
        )
    )
    module: Any = None
    for name, path in (
        ("vhostmd_py._bench_old_runner", built),
        ("vhostmd_py._bench_old_actions", str(tmp / "old_actions.py")),
    ):
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    if not hasattr(module.ActionRunner, "run_many"):
        # Before run_many(): today's collector calls it; give it what that
        # revision's collector did, one run() task per action.
        base = module.ActionRunner

        class WithRunMany(base):  # type: ignore[misc, valid-type]
            async def run_many(self, commands: Any, *, path: Any = None) -> List[Any]:
                return list(
                    await asyncio.gather(*(self.run(c, cap=cap, path=path) for c, cap in commands))
                )

        module.ActionRunner = WithRunMany
    return module


async def _asyncio_variant(n: int) -> None:
    sem = asyncio.Semaphore(ActionRunner().max_concurrency)
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


def _measure(fn: Callable[[], object]) -> Measure:
    t0, c0 = time.perf_counter(), os.times()
    fn()
    t1, c1 = time.perf_counter(), os.times()
    own = (c1.user - c0.user) + (c1.system - c0.system)
    children = (c1.children_user - c0.children_user) + (c1.children_system - c0.children_system)
    return t1 - t0, own, children


def _echo(factory: Callable[[], Any], n: int) -> Callable[[], None]:
    def go() -> None:
        runner = factory()

        async def main() -> None:
            results = await asyncio.gather(*(runner.run(f"echo vm{i}-{i}") for i in range(n)))
            assert results[7].ok and results[7].stdout == b"vm7-7\n"

        try:
            asyncio.run(main())
        finally:
            runner.close()

    return go


def _vms(node: Path) -> List[Any]:
    import libvirt

    from vhostmd_py.sources.vm import VM

    conn = libvirt.open(f"test://{node}")
    try:
        return [
            VM(d.ID(), d.name(), d.UUIDString())
            for d in (conn.lookupByID(i) for i in conn.listDomainsID())
        ]
    finally:
        conn.close()


def _cycle(factory: Callable[..., Any], config_name: str, node: Path) -> Callable[[], int]:
    from vhostmd_py.config import load_config
    from vhostmd_py.cycle.collect import collect
    from vhostmd_py.cycle.render import document

    config = load_config(CONFIGS / config_name)
    vms = _vms(node)
    uri = f"test://{node}"

    def go() -> int:
        runner = factory(path=config.path, uri=uri)
        try:
            return len(document(asyncio.run(collect(config, vms, runner))))
        finally:
            runner.close()

    return go


def _table(title: str, results: Dict[str, List[Measure]], per: int) -> Dict[str, float]:
    print(f"\n{title}\n")
    print("| variant | wall (s) | our CPU (s) | children CPU (s) | our CPU per action (us) |")
    print("|---|---|---|---|---|")
    med: Dict[str, float] = {}
    for name, rows in results.items():
        wall = statistics.median(r[0] for r in rows)
        own = statistics.median(r[1] for r in rows)
        kids = statistics.median(r[2] for r in rows)
        med[name] = wall
        print(f"| {name} | {wall:.3f} | {own:.3f} | {kids:.3f} | {own / per * 1e6:.0f} |")
    return med


def main() -> None:
    """Entry point."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("-n", type=int, default=3000, help="actions per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cycle", action="store_true", help="also collect() of the perf configs")
    ap.add_argument("--old-rev", default=None, help="a git revision whose runner to compare")
    args = ap.parse_args()

    def make(cls: Any, **fixed: Any) -> Callable[..., Any]:
        return lambda **kw: cls(**{"path": PATH, **fixed, **kw})

    factories: Dict[str, Callable[..., Any]] = {
        BASE: make(ActionRunner),
        "worker serial (max_concurrency=1)": make(ActionRunner, max_concurrency=1),
    }
    if args.old_rev:
        old = _load_old(args.old_rev)
        factories[f"{args.old_rev} (default)"] = make(old.ActionRunner)
        factories[f"{args.old_rev} serial"] = make(old.ActionRunner, max_concurrency=1)

    echo: Dict[str, List[Measure]] = {"asyncio subprocess": []}
    echo.update({k: [] for k in factories})
    cycles: Dict[str, Dict[str, List[Measure]]] = {c[0]: {k: [] for k in factories} for c in CYCLES}
    sizes: Dict[str, int] = {}
    for _ in range(args.rounds):
        echo["asyncio subprocess"].append(_measure(lambda: asyncio.run(_asyncio_variant(args.n))))
        for name, factory in factories.items():
            echo[name].append(_measure(_echo(factory, args.n)))
        if args.cycle:
            for config_name, node, _up in CYCLES:
                for name, factory in factories.items():
                    go = _cycle(factory, config_name, NODES / node)
                    size = 0

                    def run(go: Callable[[], int] = go) -> None:
                        nonlocal size
                        size = go()

                    cycles[config_name][name].append(_measure(run))
                    if sizes.setdefault(config_name, size) != size:
                        raise SystemExit(f"{name}: {config_name} document size differs")

    load = os.getloadavg()
    print(
        f"{args.n} actions `echo ...`, default concurrency "
        f"{ActionRunner().max_concurrency}, {os.cpu_count()} CPUs, median of {args.rounds} "
        f"interleaved rounds, load average at the end {load[0]:.2f} {load[1]:.2f}"
    )
    med = _table("N echo actions", echo, args.n)
    base = med[BASE]
    print("\n| ratio (same run) | value |\n|---|---|")
    for name, wall in med.items():
        if name != BASE:
            print(f"| {name} wall / worker shells wall | {wall / base:.2f} |")
    if args.cycle:
        for config_name, node, upstream in CYCLES:
            actions = 3000 if node == "node-1000.xml" else 100
            cmed = _table(
                f"collect() {config_name} x {node} ({actions} actions, document "
                f"{sizes[config_name]} bytes; upstream median cycle {upstream} s)",
                cycles[config_name],
                actions,
            )
            cbase = cmed[BASE]
            print("\n| ratio (same run) | value |\n|---|---|")
            print(f"| worker shells wall / upstream {upstream} s | {cbase / upstream:.2f} |")
            for name, wall in cmed.items():
                if name != BASE:
                    print(f"| {name} wall / worker shells wall | {wall / cbase:.2f} |")


if __name__ == "__main__":
    main()
