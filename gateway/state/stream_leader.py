"""Whether a submit can be taken now: the job stream and the status bucket each have a leader.

On a cluster, a node's death leaves the streams it led without a leader until the others elect one
(seconds). A publish meanwhile gets no answer at all, so a submit would wait out its timeout. Once
one submit's writes went unanswered (`lost`), every submit is refused at once, before it writes
anything, and the two streams are asked (STREAM.INFO, a short timeout) until both name a leader
again; a leader-elected advisory of either ends the wait early.
"""

from __future__ import annotations

import asyncio
import logging
import time

from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription

from schemas import names
from schemas.connect import unsubscribe_quietly

log = logging.getLogger("imagegen.gateway")

WATCHED = (names.JOBS_STREAM, f"KV_{names.STATUS_BUCKET}")
ELECTED = "$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.{stream}"


class NoLeader(ConnectionError):
    """A stream a submit writes to has no leader (the cluster is electing one): answered 503 at once."""


class StreamLeaders:
    def __init__(self, nc: NATS, *, ask_timeout_s: float = 0.5, ask_every_s: float = 0.25):
        self.nc = nc
        self.js = nc.jetstream(timeout=ask_timeout_s)
        self.ask_every_s = ask_every_s
        self.away_since: float | None = None  # monotonic; None while the streams answer
        self._asking: asyncio.Task | None = None
        self._elected = asyncio.Event()
        self._subs: list[Subscription] = []

    async def start(self) -> None:
        for stream in WATCHED:
            self._subs.append(await self.nc.subscribe(ELECTED.format(stream=stream), cb=self._on_elected))

    async def close(self) -> None:
        if self._asking is not None:
            self._asking.cancel()
        for sub in self._subs:
            await unsubscribe_quietly(sub)

    def check(self) -> None:
        """Raises NoLeader while a stream a submit needs has been found without a leader."""
        if self.away_since is not None:
            raise NoLeader(f"the job streams have had no leader for {time.monotonic() - self.away_since:.1f}s (an election)")

    def lost(self, exc: BaseException) -> None:
        """A submit's write went unanswered: refuse submits until both streams name a leader."""
        if self.away_since is None:
            self.away_since = time.monotonic()
            log.warning("job streams unanswered (%s: %s); submits answer 503 until they have a leader", type(exc).__name__, exc)
        if self._asking is None or self._asking.done():
            self._asking = asyncio.ensure_future(self._ask_until_led())

    async def _on_elected(self, msg) -> None:
        self._elected.set()

    async def _led(self) -> bool:
        for stream in WATCHED:
            try:
                info = await self.js.stream_info(stream)
            except Exception:  # no answer yet, or "no leader": ask again
                return False
            if info.cluster is not None and not info.cluster.leader:
                return False
        return True

    async def _ask_until_led(self) -> None:
        while True:
            self._elected.clear()  # before asking: an advisory that comes while the streams are asked counts
            if await self._led():
                break
            try:
                await asyncio.wait_for(self._elected.wait(), self.ask_every_s)
            except asyncio.TimeoutError:
                pass
        if self.away_since is not None:
            log.info("job streams led again after %.1fs; submits taken", time.monotonic() - self.away_since)
        self.away_since = None
