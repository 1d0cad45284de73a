"""Before `imagegen up` or `imagegen gateway` loads or starts anything: can the gateway listen on its
HTTP port? A busy port is reported in one line naming the flag to change (and a free port to try),
instead of after the model has loaded and the other parts have started."""

from __future__ import annotations

import errno
import socket

LOOK_AHEAD = 20  # ports tried after a busy one, for the suggestion


def _bind_error(host: str, port: int) -> OSError | None:
    """The error binding host:port would raise now (as aiohttp binds: SO_REUSEADDR), or None."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return exc
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            return exc
    return None


def http_port_problem(host: str, port: int) -> str | None:
    """None when the gateway can listen on host:port; else one line saying why and which flag to pass."""
    if port == 0:
        return None
    error = _bind_error(host, port)
    if error is None:
        return None
    if isinstance(error, socket.gaierror):
        return f"--host {host}: not an address of this machine ({error.strerror})"
    if error.errno == errno.EADDRINUSE:
        free = next((p for p in range(port + 1, min(port + 1 + LOOK_AHEAD, 65536)) if _bind_error(host, p) is None), None)
        hint = f", e.g. --port {free}" if free else ""
        return (
            f"port {port} on {host} is in use (is another `imagegen up` or gateway running? "
            f"open http://{host}:{port} to see); pass --port with a free port{hint}"
        )
    if error.errno == errno.EACCES:
        return f"port {port} needs more privileges than this user has; pass --port 1024 or above"
    if error.errno == errno.EADDRNOTAVAIL:
        return f"--host {host}: not an address of this machine"
    return f"cannot listen on {host}:{port}: {error.strerror}; pass another --port or --host"
