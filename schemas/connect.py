"""Connecting to NATS the same way everywhere: a list of servers, reconnecting forever, and a log that
says so without a line per try."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription

log = logging.getLogger("imagegen.nats")

BROKER_ERRORS = (
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.ConnectionDrainingError,
    nats.errors.NoServersError,
    nats.errors.TimeoutError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.NoRespondersError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.NoStreamResponseError,
    asyncio.TimeoutError,  # a bounded JetStream call ran out of time
)
"""Failures of the broker, not of the request or job: NATS restarting, or a cluster electing a leader."""


def server_list(url: str) -> list[str]:
    """`nats://a:4222,nats://b:4222` -> both; a bare host:port gets the nats:// scheme."""
    servers = []
    for part in url.split(","):
        part = part.strip()
        if part:
            servers.append(part if "://" in part else f"nats://{part}")
    return servers


class BrokerUnreachable(nats.errors.NoServersError):
    """No server answered the first tries of a connection that gives up (`connect(first_tries=...)`)."""

    def __init__(self, tries: int, last: str | None):
        super().__init__()
        self.tries, self.last = tries, last

    def __str__(self) -> str:
        return f"no answer after {self.tries} tries" + (f" (last: {self.last})" if self.last else "")


class ConnectionErrors:
    """A connection's errors, logged without flooding: a broker away for ten minutes fails a reconnect
    every half second. An error is logged at once, and the same error again at most once per `every_s`,
    with how many times it came since its last line; a (re)connect says how many errors it ended."""

    def __init__(self, name: str, *, every_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.name = name
        self.every_s = every_s
        self.clock = clock
        self.failures = 0  # errors since the last (re)connect
        self.seen: dict[str, tuple[float, int]] = {}  # error text -> (when last logged, times left out since)
        self.last: str | None = None  # the latest error's text

    def failed(self, exc: Exception) -> None:
        self.failures += 1
        text, now = f"{type(exc).__name__}: {exc}", self.clock()
        self.last = text
        logged_at, left_out = self.seen.get(text, (float("-inf"), 0))
        if now - logged_at < self.every_s:
            self.seen[text] = (logged_at, left_out + 1)
            return
        again = f" ({left_out} more times since its last line)" if left_out else ""
        log.warning("nats error (%s): %s%s", self.name, text, again)
        if len(self.seen) >= 100:  # errors that differ every time (they name a subject, say)
            self.seen.clear()
        self.seen[text] = (now, 0)

    def connected(self) -> str:
        """Ends a run of errors: how many there were, for the line that reports the connection."""
        failures, self.failures = self.failures, 0
        self.seen.clear()
        return f" after {failures} error{'' if failures == 1 else 's'}" if failures else ""


async def connect(
    url: str,
    *,
    name: str,
    connect_timeout: float = 5.0,
    on_reconnect: Callable[[], None] | None = None,
    first_tries: int | None = None,
) -> NATS:
    """`on_reconnect` runs after every reconnect (quickly: it holds up the client's reconnect).
    `first_tries`: None waits for a broker that is not there yet (a service started before it); a
    number of tries (at least 2, half a second apart) raises BrokerUnreachable after them (a client
    whose user gave a wrong address). Once connected, a connection reconnects forever either way."""
    if first_tries is not None and first_tries < 2:
        raise ValueError(f"first_tries must be at least 2, got {first_tries}")

    client: list[NATS] = []
    errors = ConnectionErrors(name)

    async def disconnected() -> None:
        if client and client[0].is_closed:  # closed or drained on purpose: nothing to reconnect
            log.info("nats connection closed (%s)", name)
            return
        log.warning("nats disconnected (%s); reconnecting", name)

    async def reconnected() -> None:
        log.info("nats reconnected (%s)%s", name, errors.connected())
        if on_reconnect is not None:
            on_reconnect()

    async def error(exc: Exception) -> None:
        errors.failed(exc)

    try:
        nc = await nats.connect(
            servers=server_list(url),
            name=name,
            connect_timeout=connect_timeout,
            max_reconnect_attempts=-1 if first_tries is None else first_tries - 1,
            reconnect_time_wait=0.5,
            allow_reconnect=True,
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
            error_cb=error,
        )
    except nats.errors.NoServersError:
        if first_tries is None:
            raise
        raise BrokerUnreachable(errors.failures, errors.last) from None
    nc.options["max_reconnect_attempts"] = -1  # a connection lost later is retried forever
    client.append(nc)
    if errors.failures:
        log.info("nats connected (%s)%s", name, errors.connected())
    return nc


async def unsubscribe_quietly(sub: Subscription | None) -> None:
    """Ends a subscription; one whose connection is closing ends with it, so a failure here is no news."""
    if sub is None:
        return
    try:
        await sub.unsubscribe()
    except Exception:
        pass
