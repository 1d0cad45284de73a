"""Which proxy headers the gateway believes: X-Forwarded-Proto and X-Forwarded-Host say how a caller
reached this gateway (the scheme and host of the image URLs it answers) only when the connection comes
from a proxy the operator named (`--trust-proxy`); from anyone else they are ignored, so a caller
cannot point the URLs in its answers at another scheme or host. Even from a trusted proxy, a scheme
other than http or https, or a host that is not a plain host[:port], is ignored (as is such a Host
header: the URL then names the address the connection reached)."""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache

from aiohttp import web

ANY = "*"
HOST_AND_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]{1,253})(:[0-9]{1,5})?$")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_trusted(entries: tuple[str, ...]) -> tuple[Network, ...] | None:
    """The networks of `entries` (addresses or CIDR networks); None for `*` (any peer); ValueError
    naming an entry that is neither."""
    if ANY in entries:
        return None
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ValueError(f"--trust-proxy: {entry!r} is not an address, a network (10.0.0.0/8) or *") from None
    return tuple(networks)


@lru_cache(maxsize=8)
def _trusted(entries: tuple[str, ...]) -> tuple[Network, ...] | None:
    return parse_trusted(entries)


def trusted_peer(request: web.Request, entries: tuple[str, ...]) -> bool:
    """Whether the connection comes from a proxy named in `entries`."""
    if not entries:
        return False
    networks = _trusted(entries)
    if networks is None:
        return True
    try:
        peer = ipaddress.ip_address((request.remote or "").split("%", 1)[0])
    except ValueError:  # a Unix socket, or no peer
        return False
    if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped is not None:
        peer = peer.ipv4_mapped
    return any(peer in network for network in networks)


def first(value: str) -> str:
    return value.split(",", 1)[0].strip()


def local_address(request: web.Request) -> str:
    """The address and port the connection reached, as host[:port]."""
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if not sockname or not isinstance(sockname, tuple):
        return "localhost"
    address, port = sockname[0], sockname[1]
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def public_origin(request: web.Request, trust_proxy: tuple[str, ...]) -> str:
    """This gateway as the caller reached it: the connection's scheme and Host, or behind a trusted
    proxy what its X-Forwarded-Proto and X-Forwarded-Host say."""
    proto, host = request.scheme, request.host
    if not HOST_AND_PORT.match(host):  # a Host header that is no host[:port]: the address the caller reached
        host = local_address(request)
    if trusted_peer(request, trust_proxy):
        forwarded_proto = first(request.headers.get("X-Forwarded-Proto", "")).lower()
        forwarded_host = first(request.headers.get("X-Forwarded-Host", ""))
        if forwarded_proto in ("http", "https"):
            proto = forwarded_proto
        if HOST_AND_PORT.match(forwarded_host):
            host = forwarded_host
    return f"{proto}://{host}"
