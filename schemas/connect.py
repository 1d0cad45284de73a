"""Connecting to NATS the same way everywhere: a list of servers, reconnecting forever."""

from __future__ import annotations

import asyncio
import logging
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


async def connect(
    url: str, *, name: str, connect_timeout: float = 5.0, on_reconnect: Callable[[], None] | None = None
) -> NATS:
    """`on_reconnect` runs after every reconnect (quickly: it holds up the client's reconnect)."""

    client: list[NATS] = []

    async def disconnected() -> None:
        if client and client[0].is_closed:  # closed or drained on purpose: nothing to reconnect
            log.info("nats connection closed (%s)", name)
            return
        log.warning("nats disconnected (%s); reconnecting", name)

    async def reconnected() -> None:
        log.info("nats reconnected (%s)", name)
        if on_reconnect is not None:
            on_reconnect()

    async def error(exc: Exception) -> None:
        log.warning("nats error (%s): %s", name, exc)

    nc = await nats.connect(
        servers=server_list(url),
        name=name,
        connect_timeout=connect_timeout,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        allow_reconnect=True,
        disconnected_cb=disconnected,
        reconnected_cb=reconnected,
        error_cb=error,
    )
    client.append(nc)
    return nc


async def unsubscribe_quietly(sub: Subscription | None) -> None:
    """Ends a subscription; one whose connection is closing ends with it, so a failure here is no news."""
    if sub is None:
        return
    try:
        await sub.unsubscribe()
    except Exception:
        pass
