"""A cap on a gateway's open connections: one past it is answered 503 with Retry-After and closed.

`CappedSite` is aiohttp's TCPSite with one change: the protocol factory it listens with counts the
connections aiohttp holds (HTTP keep-alive, long polls, WebSockets) and, at `max_connections`, hands the
new connection to `Refusal`, which writes a short 503 and closes once the client has read it (or after
`REFUSAL_LINGER_S`), never parsing what the client sends.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource

from aiohttp import web

log = logging.getLogger("imagegen.gateway")

RETRY_AFTER_S = 1
REFUSAL_LINGER_S = 2.0  # how long a refused connection may stay to read its 503
SPARE_FILES = 256  # files beyond the connections: NATS, logs, the process's own


def make_room(max_connections: int) -> None:
    """Raises this process's soft limit of open files (often 1,024) to fit `max_connections`, as far as
    the hard limit allows; past the soft limit accept() would fail before the cap could answer 503."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max_connections + SPARE_FILES
    if soft == resource.RLIM_INFINITY or soft >= want:
        return
    new = want if hard == resource.RLIM_INFINITY else min(want, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    if new < want:
        log.warning("open-file limit %d (hard) is below --max-connections %d + %d: raise it (ulimit -n)", hard, max_connections, SPARE_FILES)


def refusal_bytes(max_connections: int) -> bytes:
    body = json.dumps({"error": f"too many connections: this gateway holds at most {max_connections}; retry shortly"}).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Retry-After: {RETRY_AFTER_S}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class Refusal(asyncio.Protocol):
    """Answers 503 at once, then drops whatever arrives until the client closes (so the answer is not
    lost to a reset) or REFUSAL_LINGER_S passes."""

    def __init__(self, answer: bytes):
        self.answer = answer
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.answer)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.timer = asyncio.get_running_loop().call_later(REFUSAL_LINGER_S, self.transport.close)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        self.transport.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()


class CappedSite(web.TCPSite):
    """A TCPSite whose listener refuses connections past `max_connections` with a 503."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, max_connections: int, **kwargs):
        super().__init__(runner, host, port, **kwargs)
        self.max_connections = max_connections
        self.refused = 0

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site; TCPSite.start would listen with the plain factory
        server = self._runner.server
        assert server is not None
        answer = refusal_bytes(self.max_connections)

        def protocol() -> asyncio.Protocol:
            if len(server.connections) >= self.max_connections:
                self.refused += 1
                return Refusal(answer)
            return server()

        self._server = await asyncio.get_running_loop().create_server(
            protocol, self._host, self._port, ssl=self._ssl_context, backlog=self._backlog,
            reuse_address=self._reuse_address, reuse_port=self._reuse_port,
        )
        self._bound_port = self._server.sockets[0].getsockname()[1] if self._server.sockets else self._port
