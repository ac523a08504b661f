"""Inside the full e2e guest: run our guest package against the real devices.

Runs with the guest's Debian python3 (not the host's venv), with
PYTHONPATH=/opt/vhostmd-py/site holding the guest distribution alone (the
wheel of guest/: vhostmd_wire and vhostmd_guest, pure Python; no vhostmd_py,
no compiled module) and its console script in /opt/vhostmd-py/bin. The guest
root also has Debian's python3-lxml and python3-cffi: the checks record that
neither they nor vhostmd_py were loaded. It only gathers evidence; the host test
(tests/e2e/test_e2e_guest.py) does the assertions. Each record is printed to the
serial console as `E2E-RESULT <tag> <base64 JSON>` so kernel messages cannot
corrupt it unnoticed (a broken line fails to decode).
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import traceback
from typing import Any, Dict, List

TOOL = "/opt/vhostmd-py/bin/vm-dump-metrics"
SITE = "/opt/vhostmd-py/site"
# What the guest distribution must never load (the host package, the host's
# XML and C-binding dependencies), though lxml and cffi are installed here.
FORBIDDEN = ("vhostmd_py", "lxml", "cffi", "_cffi_backend")
# Long enough for the host daemon to see both guests start (the other guest
# boots in parallel under software emulation), short of the host's timeout.
WAIT_BOTH_S = 150.0


def emit(tag: str, obj: Any) -> None:
    """Print one result record on the console."""
    data = base64.b64encode(json.dumps(obj, default=repr).encode()).decode()
    print(f"E2E-RESULT {tag} {data}", flush=True)


def note(msg: str) -> None:
    """Progress line on the console (not parsed)."""
    print(f"E2E: {msg}", flush=True)


def my_uuid() -> str:
    """This VM's UUID as libvirt gave it to QEMU (SMBIOS type 1)."""
    with open("/sys/class/dmi/id/product_uuid", encoding="ascii") as f:
        return f.read().strip().lower()


def run_tool(args: List[str], timeout: float = 30.0) -> Dict[str, Any]:
    """Run vm-dump-metrics once; its exit code, stdout (base64) and stderr."""
    t = time.monotonic()
    try:
        proc = subprocess.run([TOOL, *args], capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as err:
        return {
            "args": args,
            "rc": None,
            "timeout": True,
            "stdout_b64": base64.b64encode(err.stdout or b"").decode(),
            "stderr": (err.stderr or b"").decode(errors="replace"),
            "seconds": time.monotonic() - t,
        }
    return {
        "args": args,
        "rc": proc.returncode,
        "timeout": False,
        "stdout_b64": base64.b64encode(proc.stdout).decode(),
        "stderr": proc.stderr.decode(errors="replace"),
        "seconds": time.monotonic() - t,
    }


# --- e2e values: disk reads, then a CPU burn ------------------
# The host (scripts/e2e/host-values.py) timestamps the E2E-READ-* and
# E2E-BURN-* markers as they appear on the console; the test reads the
# history of the burn window with vhostmdctl.
READ_BYTES = 64 << 20
BURN_S = 30.0


def root_device() -> str:
    """The block device mounted as this chroot's root (the Debian image)."""
    st = os.stat("/")
    with open(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/uevent",
              encoding="ascii") as f:
        for line in f:
            if line.startswith("DEVNAME="):
                return "/dev/" + line.strip().split("=", 1)[1]
    raise OSError("no DEVNAME for the root device")


def direct_read(dev: str, total: int) -> int:
    """Read TOTAL bytes of DEV with O_DIRECT (no page cache: every byte is a device read)."""
    import mmap

    chunk = 1 << 20
    buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT needs
    done = 0
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    try:
        while done < total:
            n = os.readv(fd, [buf])
            if n <= 0:
                break
            done += n
    finally:
        os.close(fd)
    return done


def load_phase() -> None:
    """Read the root disk with O_DIRECT, then burn every vCPU for BURN_S seconds."""
    rec: Dict[str, Any] = {"cpus": os.cpu_count(), "burn_s": BURN_S}
    try:
        rec["device"] = root_device()
        note("E2E-READ-START")
        t = time.monotonic()
        rec["read_bytes"] = direct_read(rec["device"], READ_BYTES)
        rec["read_s"] = time.monotonic() - t
        note("E2E-READ-END")
    except OSError as err:
        rec["read_error"] = str(err)
    # One busy process per vCPU; the host sees them as guest CPU time.
    workers = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])
        for _ in range(os.cpu_count() or 1)
    ]
    note("E2E-BURN-START")
    t = time.monotonic()
    time.sleep(BURN_S)
    for w in workers:
        w.kill()
    for w in workers:
        w.wait()
    rec["burned_s"] = time.monotonic() - t
    note("E2E-BURN-END")
    emit("load", rec)


def forbidden_loaded(names: Any) -> List[str]:
    """The FORBIDDEN modules (or their submodules) among NAMES."""
    prefixes = tuple(p + "." for p in FORBIDDEN)
    return sorted(n for n in names if n in FORBIDDEN or n.startswith(prefixes))


def guest_dist() -> Dict[str, Any]:
    """Where the guest packages come from, and what else this Python could import."""
    rec: Dict[str, Any] = {
        name: importlib.util.find_spec(name) is not None for name in FORBIDDEN
    }
    try:
        import vhostmd_guest
        import vhostmd_wire

        rec["files"] = {"vhostmd_guest": vhostmd_guest.__file__,
                        "vhostmd_wire": vhostmd_wire.__file__}
        from importlib import metadata

        rec["dist_version"] = metadata.version("vhostmd-py-guest")
        rec["dist_files"] = sorted(str(f) for f in metadata.files("vhostmd-py-guest") or [])
    except Exception:
        rec["error"] = traceback.format_exc()
    return rec


def tool_modules(args: List[str]) -> Dict[str, Any]:
    """Run the console script in a fresh python3; the modules it had loaded at exit."""
    code = (
        "import atexit, json, runpy, sys\n"
        "def dump():\n"
        "    with open('/tmp/tool-modules.json', 'w') as f:\n"
        "        json.dump(sorted(sys.modules), f)\n"
        "atexit.register(dump)\n"
        f"sys.argv = [{TOOL!r}, *{args!r}]\n"
        f"runpy.run_path({TOOL!r}, run_name='__main__')\n"
    )
    with contextlib.suppress(OSError):
        os.unlink("/tmp/tool-modules.json")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60,
                          check=False)
    rec: Dict[str, Any] = {"args": args, "rc": proc.returncode,
                           "stderr": proc.stderr.decode(errors="replace")}
    try:
        with open("/tmp/tool-modules.json", encoding="utf-8") as f:
            loaded = json.load(f)
        rec["guest_loaded"] = "vhostmd_guest.cli" in loaded and "vhostmd_wire" in loaded
        rec["forbidden"] = forbidden_loaded(loaded)
    except (OSError, ValueError) as err:
        rec["error"] = str(err)
    return rec


def modules_check() -> Dict[str, Any]:
    """No FORBIDDEN module: in this process after every check, and in fresh runs of the tool."""
    return {
        "checker": {
            "guest_loaded": "vhostmd_guest.libmetrics" in sys.modules,
            "forbidden": forbidden_loaded(list(sys.modules)),
        },
        "tool-b": tool_modules(["-b"]),
        "tool-i": tool_modules(["-i"]),
    }


def vm_uuids(doc: bytes) -> List[str]:
    """Distinct uuid attributes in a metrics document."""
    return sorted({m.decode() for m in re.findall(rb"uuid='([0-9a-f-]+)'", doc)})


def until(args: List[str], ok: Any, deadline: float) -> Dict[str, Any]:
    """Repeat a tool run until ok(stdout) or the deadline; the last run, with its attempt count."""
    attempts = 0
    while True:
        attempts += 1
        res = run_tool(args)
        out = base64.b64decode(res["stdout_b64"])
        if (res["rc"] == 0 and ok(out)) or time.monotonic() > deadline:
            res["attempts"] = attempts
            return res
        time.sleep(1.0)


def as_record(val: Any) -> Any:
    """A JSON-able view of what the API returned."""
    if hasattr(val, "raw_value") and hasattr(val, "value"):  # a Metric
        return {
            "name": val.name,
            "type_name": val.type_name,
            "context": int(val.context),
            "raw_value": val.raw_value,
            "value": val.value,
            "value_type": type(val.value).__name__,
            "unit": val.unit,
            "vm_id": val.vm_id,
            "vm_uuid": val.vm_uuid,
        }
    if hasattr(val, "_asdict"):  # the guest's frozen records are NamedTuples (Python 3.6)
        return dict(val._asdict())
    if isinstance(val, bytes):
        return {"bytes_b64": base64.b64encode(val).decode()}
    return val


def libmetrics_calls() -> Dict[str, Any]:
    """Call the libmetrics API the way an application in the guest would."""
    out: Dict[str, Any] = {}

    def record(key: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        try:
            val = fn(*args, **kwargs)
            out[key] = {"ok": True, "value": as_record(val)}
        except Exception as err:  # evidence for the host: record, don't stop
            out[key] = {"ok": False, "error": f"{type(err).__name__}: {err}"}

    try:
        from vhostmd_guest import libmetrics
        from vhostmd_guest.reader import MetricsReader, VirtioSource
    except Exception:
        out["import"] = {"ok": False, "error": traceback.format_exc()}
        return out
    out["import"] = {"ok": True}
    host, vm = libmetrics.METRIC_CONTEXT_HOST, libmetrics.METRIC_CONTEXT_VM
    names = [
        ("E2EAnswer", host),
        ("E2EHostTag", host),
        ("TotalCPUTime", host),
        ("E2EIdent", vm),
        ("NumCPUs", vm),
        ("TotalCPUTime", vm),
        ("NoSuchMetric", host),
        # Denied to this VM by its domain metadata (scripts/e2e-guest).
        ("E2EPolicyHost", host),
        ("E2EPolicyVm", vm),
    ]
    # Default reader: the auto-discovered metrics disk (several VMs on it).
    for name, ctx in names:
        record(f"disk:{name}:{ctx.context_name}", libmetrics.get_metric, name, ctx)
    for fn in (
        "get_host_cpu_metrics",
        "get_host_memory_metrics",
        "get_vm_cpu_metrics",
        "get_vm_memory_metrics",
    ):
        record(f"disk:{fn}", getattr(libmetrics, fn))
    record("dump_metrics", libmetrics.dump_metrics, "/tmp/api-dump.xml")
    # The same lookups over virtio-serial.
    virtio = MetricsReader(VirtioSource())
    for name, ctx in names:
        record(f"virtio:{name}:{ctx.context_name}", libmetrics.get_metric, name, ctx, reader=virtio)
    record("virtio:get_vm_cpu_metrics", libmetrics.get_vm_cpu_metrics, reader=virtio)
    record("dump_virtio_metrics", libmetrics.dump_virtio_metrics, "/tmp/api-virtio.xml")
    for path in ("/tmp/api-dump.xml", "/tmp/api-virtio.xml"):
        try:
            with open(path, "rb") as f:
                out[f"file:{path}"] = base64.b64encode(f.read()).decode()
        except OSError as err:
            out[f"file:{path}"] = f"error: {err}"
    return out


def pervm_device() -> str | None:
    """This VM's own metrics disk: the virtio disk with serial vhostmd-pervm."""
    for dev in sorted(os.listdir("/sys/block")):
        try:
            with open(f"/sys/block/{dev}/serial", encoding="ascii") as f:
                if f.read().strip() == "vhostmd-pervm":
                    return f"/dev/{dev}"
        except OSError:
            continue
    return None


def pervm_checks(uuid: str, deadline: float) -> None:
    """vm-dump-metrics -b and the libmetrics API on this VM's own disk."""
    dev = pervm_device()
    emit("pervm-device", {"device": dev})
    if dev is None:
        return
    res = until(["-b", "--disk", dev], lambda out: uuid.encode() in out, deadline)
    emit("pervm-dump-b", res)
    note(f"per-VM -b rc={res['rc']} attempts={res['attempts']}")
    out: Dict[str, Any] = {}
    try:
        from vhostmd_guest import libmetrics
        from vhostmd_guest.reader import DiskSource, MetricsReader

        reader = MetricsReader(DiskSource(dev))
        for name, ctx in (("E2EIdent", libmetrics.METRIC_CONTEXT_VM),
                          ("E2EAnswer", libmetrics.METRIC_CONTEXT_HOST),
                          ("HostIdentity", libmetrics.METRIC_CONTEXT_HOST),
                          ("UpdatePeriod", libmetrics.METRIC_CONTEXT_HOST),
                          ("E2EPolicyHost", libmetrics.METRIC_CONTEXT_HOST),
                          ("E2EPolicyVm", libmetrics.METRIC_CONTEXT_VM)):
            try:
                val = libmetrics.get_metric(name, ctx, reader=reader)
                out[f"{name}:{ctx.context_name}"] = {"ok": True, "value": as_record(val)}
            except Exception as err:  # evidence for the host: record, don't stop
                out[f"{name}:{ctx.context_name}"] = {"ok": False, "error": f"{err!r}"}
    except Exception:
        out["import"] = {"ok": False, "error": traceback.format_exc()}
    emit("pervm-libmetrics", out)


# --- per-VM policy: blocked by a live change of this domain's metadata --------
# After the load phase (so that the CPU checks are not disturbed) the guest
# says E2E-POLICY-READY; the host then sets blocked="yes" in this domain's
# metadata with `virsh metadata --live`, the daemon running. The guest reads
# its own disk until it holds the empty document, then asks virtio.
EMPTY_DOC = b"<metrics>\n</metrics>\n"
PORT = "/dev/virtio-ports/org.github.vhostmd.1"
BLOCK_WAIT_S = 90.0


def virtio_raw(timeout: float = 5.0) -> bytes:
    """One GET /metrics/XML on the port: the reply's bytes up to the blank line, as they came."""
    import select

    fd = os.open(PORT, os.O_RDWR | os.O_NONBLOCK)
    try:
        os.write(fd, b"GET /metrics/XML\n\n")
        out = b""
        end = time.monotonic() + timeout
        while not out.endswith(b"\n\n"):
            left = end - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                break
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                time.sleep(0.05)  # the host side not connected at this moment
                continue
            out += chunk
        return out
    finally:
        os.close(fd)


def policy_block_phase() -> None:
    """Wait for the host's block: the empty document on the own disk, the error over virtio."""
    from vhostmd_guest.reader import read_disk_content

    dev = pervm_device()
    rec: Dict[str, Any] = {"device": dev}
    note("E2E-POLICY-READY")
    t0 = time.monotonic()
    polls = 0
    doc = b""
    while dev is not None and time.monotonic() - t0 < BLOCK_WAIT_S:
        polls += 1
        try:
            doc = read_disk_content(dev)
        except Exception as err:  # evidence: record the last error, keep trying
            rec["last_error"] = f"{type(err).__name__}: {err}"
        if doc == EMPTY_DOC:
            break
        time.sleep(0.5)
    rec.update(polls=polls, waited_s=time.monotonic() - t0,
               pervm_b64=base64.b64encode(doc).decode())
    note(f"E2E-BLOCKED {'yes' if doc == EMPTY_DOC else 'no'} after {polls} polls")
    replies = []
    for _ in range(5):
        try:
            reply = virtio_raw()
        except OSError as err:
            replies.append({"error": str(err)})
            time.sleep(1.0)
            continue
        replies.append({"b64": base64.b64encode(reply).decode()})
        if reply.startswith(b"INVALID REQUEST"):
            break
        time.sleep(1.0)
    rec["virtio"] = replies
    rec["dump-i"] = run_tool(["-i"])
    emit("blocked", rec)


def main() -> int:
    """Gather the evidence and print it."""
    info: Dict[str, Any] = {"python": sys.version, "argv0": sys.executable}
    try:
        info["uuid"] = my_uuid()
    except OSError as err:
        info["uuid_error"] = str(err)
    info["guest_dist"] = guest_dist()
    info["virtio_ports"] = (
        sorted(os.listdir("/dev/virtio-ports")) if os.path.isdir("/dev/virtio-ports") else []
    )
    emit("info", info)
    uuid = info.get("uuid", "")

    deadline = time.monotonic() + WAIT_BOTH_S
    # The disk carries every VM's metrics: wait until it shows this VM and
    # another one, so the virtio isolation check below runs with both live.
    note("waiting for the metrics disk to show two VMs")
    res = until(
        ["-b"],
        lambda out: uuid.encode() in out and len(vm_uuids(out)) >= 2,
        deadline,
    )
    emit("dump-b", res)
    note(f"-b rc={res['rc']} attempts={res['attempts']}")

    res = until(["-i"], lambda out: uuid.encode() in out, deadline)
    emit("dump-i", res)
    note(f"-i rc={res['rc']} attempts={res['attempts']}")

    emit("dump-auto", run_tool([]))
    res = run_tool(["-b", "-d", "/tmp/dest.xml"])
    try:
        with open("/tmp/dest.xml", "rb") as f:
            res["dest_b64"] = base64.b64encode(f.read()).decode()
    except OSError as err:
        res["dest_error"] = str(err)
    emit("dump-dest", res)
    emit("dump-help", run_tool(["--help"]))

    emit("libmetrics", libmetrics_calls())
    pervm_checks(uuid, time.monotonic() + 60.0)
    emit("modules", modules_check())
    note("guest-check done")
    load_phase()  # e2e values: it only loads the guest
    policy_block_phase()  # last: from here this VM sees nothing
    return 0


if __name__ == "__main__":
    sys.exit(main())
