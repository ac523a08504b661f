"""Reading the metrics from xenstore through the xenstore command-line tools.

Upstream (libmetrics.c dump_xenstore_metrics, built WITH_XENSTORE) reads the
guest's ``domid`` key, then ``/local/domain/<domid>/metrics`` (the path
xs_get_domain_path gives plus ``/metrics``, where vhostmd's xenstore
transport writes). We do the same with ``xenstore-read`` so the guest
package needs no Xen library; without the tools the read fails clearly.
"""

import logging
import os
import shutil
import subprocess
from typing import Mapping, Optional

from .errors import XenstoreError, XenstoreUnavailableError

log = logging.getLogger(__name__)

TOOL = "xenstore-read"
DEFAULT_TIMEOUT = 5.0
_MAX_OUTPUT = 16 * 1024 * 1024


def find_tool(env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The path of xenstore-read in ``env``'s PATH (default: this process's), or None."""
    path = (env if env is not None else os.environ).get("PATH", os.defpath)
    return shutil.which(TOOL, path=path)


def _read_key(tool: str, key: str, env: Optional[Mapping[str, str]], timeout: float) -> bytes:
    # -R: raw value; without it xenstore-read escapes newlines and other
    # non-printable bytes, which would mangle the XML.
    try:
        proc = subprocess.run(  # noqa: UP022 (capture_output is Python 3.7+)
            [tool, "-R", key],
            stdin=subprocess.DEVNULL,
            # Not capture_output=: that is Python 3.7+, guests may have 3.6.
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            timeout=timeout,
            env=None if env is None else dict(env),
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        raise XenstoreError(f"{TOOL} {key}: no answer within {timeout:g} s") from err
    except OSError as err:
        raise XenstoreError(f"{TOOL} {key}: {err.strerror}") from err
    if proc.returncode != 0:
        detail = proc.stderr.decode("utf-8", "replace").strip() or f"exit status {proc.returncode}"
        raise XenstoreError(f"{TOOL} {key}: {detail}")
    if len(proc.stdout) > _MAX_OUTPUT:
        raise XenstoreError(f"{TOOL} {key}: value larger than {_MAX_OUTPUT} bytes refused")
    out = proc.stdout
    # xenstore-read ends the value with one newline of its own.
    return out[:-1] if out.endswith(b"\n") else out


def read_xenstore_metrics(
    *, env: Optional[Mapping[str, str]] = None, timeout: float = DEFAULT_TIMEOUT
) -> bytes:
    """The raw metrics value stored in xenstore for this domain."""
    tool = find_tool(env)
    if tool is None:
        raise XenstoreUnavailableError(
            f"xenstore tools not found ({TOOL} is not in PATH): not a Xen guest, "
            "or the xen tools are not installed"
        )
    domid_raw = _read_key(tool, "domid", env, timeout).strip()
    if not domid_raw.isdigit():
        raise XenstoreError(f"{TOOL} domid: unexpected value {domid_raw[:40]!r}")
    key = f"/local/domain/{int(domid_raw)}/metrics"
    value = _read_key(tool, key, env, timeout)
    log.debug("xenstore %s: %d bytes", key, len(value))
    return value
