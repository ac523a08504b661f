"""``<metrics_endpoint>``: the OpenMetrics endpoint (present = enabled)."""

from __future__ import annotations

from lxml import etree

from vhostmd_py.config.document import line_of
from vhostmd_py.config.records import (
    DEFAULT_ENDPOINT_ADDRESS,
    DEFAULT_ENDPOINT_PORT,
    EndpointConfig,
)
from vhostmd_py.config.units import ENDPOINT_PORT_RANGE, integer
from vhostmd_py.errors import ConfigError


def parse_endpoint(globals_: etree._Element, file: str) -> EndpointConfig | None:
    """``<metrics_endpoint>``, None when absent; a non-loopback address needs allow_remote."""
    elem = globals_.find("metrics_endpoint")
    if elem is None:
        return None
    line = line_of(elem)
    address = str(elem.get("address", DEFAULT_ENDPOINT_ADDRESS)).strip()
    import ipaddress  # here: only a config with an endpoint pays for it

    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        raise ConfigError(
            file, f"metrics_endpoint address '{address}' is not an IPv4 or IPv6 address", line
        ) from None
    allow_raw = str(elem.get("allow_remote", "no")).strip().lower()
    if allow_raw not in ("yes", "no"):
        raise ConfigError(file, f"metrics_endpoint allow_remote '{allow_raw}' is not yes or no",
                          line)
    allow_remote = allow_raw == "yes"
    if not ip.is_loopback and not allow_remote:
        raise ConfigError(
            file,
            f"metrics_endpoint address {ip} is not a loopback address: the endpoint shows "
            "every VM's name and metrics; set allow_remote=\"yes\" to serve it there",
            line,
        )
    port = DEFAULT_ENDPOINT_PORT
    raw = elem.get("port")
    if raw is not None:
        low, high = ENDPOINT_PORT_RANGE
        port = integer(str(raw).strip(), file, "metrics_endpoint port", line, low, high, "")
    return EndpointConfig(address=str(ip), port=port, allow_remote=allow_remote)
