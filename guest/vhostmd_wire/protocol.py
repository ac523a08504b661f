"""The metrics document's framing and the virtio-serial protocol (FACTS.md section 4).

Both ends speak this: the host daemon frames documents and replies with
these bytes, the guest reader checks them.
"""

from typing import Tuple

# The virtio-serial port name QEMU exposes to the guest and libvirt names
# the host socket after.
CHANNEL_NAME = "org.github.vhostmd.1"

# The document on the vbd disk is DOC_HEAD + metric elements + DOC_TAIL.
DOC_HEAD = b"<metrics>\n"
DOC_TAIL = b"</metrics>\n"

# Upstream writes this, with no newline after it, in a virtio reply whose
# host part is empty (FACTS.md section 4, virtio/vmonly/get_xml_lf.bin).
NO_HOST_METRICS = b"<!-- host metrics not available -->"

# The two requests upstream's vio_check_request accepts (exact match,
# case-sensitive); anything else holding a blank line is invalid.
REQUEST_LF = b"GET /metrics/XML\n\n"
REQUEST_CRLF = b"GET /metrics/XML\r\n\r\n"
REQUESTS = (REQUEST_LF, REQUEST_CRLF)
# What the guest sends.
REQUEST = REQUEST_LF

# Every reply (document or refusal) ends with a blank line: the reply to a
# valid request is the disk document plus one more "\n" (FACTS.md section 4).
REPLY_TERMINATOR = b"\n\n"
REPLY_TAIL = DOC_TAIL + b"\n"
INVALID_REQUEST = b"INVALID REQUEST\n\n"

# Upstream's request buffer is 512 bytes including the NUL, so 511 bytes
# without a terminator is "overlong" (upstream vio_check_request meant to
# reject it; its recv loop never gets there and the channel dies).
REQUEST_MAX = 511


def virtio_reply_parts(host: bytes, vm: bytes) -> Tuple[bytes, bytes, bytes, bytes]:
    """The pieces of a reply, in order (the host sends them as one sendmsg)."""
    # Upstream vio_channel_update: the comment, with no newline, when the
    # host part is empty (FACTS.md section 4, virtio/vmonly/get_xml_lf.bin).
    return (DOC_HEAD, host if host else NO_HOST_METRICS, vm, REPLY_TAIL)


def virtio_reply(host: bytes, vm: bytes) -> bytes:
    """The reply to a valid request: host part (or upstream's comment) + this VM's block."""
    return b"".join(virtio_reply_parts(host, vm))


def document(*parts: bytes) -> bytes:
    """The disk document: DOC_HEAD + the metric elements in order + DOC_TAIL."""
    return b"".join((DOC_HEAD, *parts, DOC_TAIL))


# Freshness and identity (opt-in on the host, docs/EXTENSIONS.md). The host publishes
# these three host-context metrics when enabled; an upstream daemon (or the
# option off) publishes none of them and the guest says "unknown".
#
# FRESHNESS_TIME: type real64, unit "s": seconds since the Unix epoch with
#   exactly 3 decimals ("%.3f"), the wall-clock time the document was rendered.
# FRESHNESS_PERIOD: type uint32, unit "s": the daemon's update period
#   (seconds between publications), > 0.
# HOST_IDENTITY: type string, no unit: 32 lowercase hex characters, a keyed
#   hash that changes when the VM runs on another host and does not reveal
#   the host's name.
FRESHNESS_TIME = "PublicationTime"
FRESHNESS_TIME_TYPE = "real64"
FRESHNESS_PERIOD = "UpdatePeriod"
FRESHNESS_PERIOD_TYPE = "uint32"
FRESHNESS_UNIT = "s"
HOST_IDENTITY = "HostIdentity"
HOST_IDENTITY_TYPE = "string"
HOST_IDENTITY_LENGTH = 32
# All three are published in the host context.
FRESHNESS_CONTEXT = "host"


def format_publication_time(seconds: float) -> str:
    """The text of a PublicationTime value: seconds since the epoch, 3 decimals."""
    return f"{seconds:.3f}"


def is_host_identity(text: str) -> bool:
    """True when text is a well-formed HostIdentity value (32 lowercase hex chars)."""
    return len(text) == HOST_IDENTITY_LENGTH and all(c in "0123456789abcdef" for c in text)
