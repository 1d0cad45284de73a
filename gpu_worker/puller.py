"""Takes the next job message, highest tier first, one at a time.

Each tier has a durable pull consumer. The worker asks each in turn for one message with `no_wait`
(one round trip, well under a millisecond on a LAN); when all are empty it sleeps until a job is
published on any tier (a plain subscription to `imagegen.jobs.>` rings a bell) or a short timeout.

Starvation: after `fairness` jobs in a row taken from a higher tier while a lower one had work waiting,
the next pull starts at the lowest non-empty tier, so low work always moves, at 1 in `fairness + 1`.
"""

from __future__ import annotations

import asyncio
import json
from typing import Awaitable, Callable

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from schemas import names
from schemas.names import TIERS, Tier

NO_WAIT = json.dumps({"batch": 1, "no_wait": True}).encode()


class TierPuller:
    """One tier's pull consumer, asked for one message at a time."""

    def __init__(self, nc: NATS, tier: Tier):
        self.nc = nc
        self.tier = tier
        self.api_subject = f"$JS.API.CONSUMER.MSG.NEXT.{names.JOBS_STREAM}.{tier.consumer}"
        self.inbox = nc.new_inbox()
        self.replies: asyncio.Queue[Msg] = asyncio.Queue()
        self.sub: Subscription | None = None

    async def start(self) -> None:
        self.sub = await self.nc.subscribe(self.inbox, cb=self.replies.put)

    async def stop(self) -> None:
        if self.sub is not None:
            await self.sub.unsubscribe()

    def _ready(self) -> Msg | None:
        while not self.replies.empty():
            msg = self.replies.get_nowait()
            if msg.reply and msg.reply.startswith("$JS.ACK."):
                return msg
        return None

    async def next(self, timeout: float = 2.0) -> Msg | None:
        """One job message of this tier, or None when there is none right now."""
        late = self._ready()
        if late is not None:
            return late
        await self.nc.publish(self.api_subject, NO_WAIT, reply=self.inbox)
        try:
            msg = await asyncio.wait_for(self.replies.get(), timeout)
        except asyncio.TimeoutError:
            return None
        if msg.reply and msg.reply.startswith("$JS.ACK."):
            return msg
        return None  # a status: 404 no messages, 408 expired, 409 leadership change...


class PriorityPuller:
    def __init__(self, nc: NATS, *, fairness: int = 10, idle_wait_s: float = 1.0):
        self.nc = nc
        self.fairness = fairness
        self.idle_wait_s = idle_wait_s
        self.tiers = [TierPuller(nc, tier) for tier in TIERS]
        self.bell = asyncio.Event()
        self.bell_sub: Subscription | None = None
        self.skipped_lower = 0

    async def start(self) -> None:
        for puller in self.tiers:
            await puller.start()

        async def ring(_msg: Msg) -> None:
            self.bell.set()

        self.bell_sub = await self.nc.subscribe(f"{names.JOBS_SUBJECT_PREFIX}.*", cb=ring)

    async def stop(self) -> None:
        for puller in self.tiers:
            await puller.stop()
        if self.bell_sub is not None:
            await self.bell_sub.unsubscribe()

    async def _take(self, order: list[TierPuller]) -> Msg | None:
        for puller in order:
            msg = await puller.next()
            if msg is not None:
                return msg
        return None

    async def next(self, stopping: asyncio.Event, *, hold: Callable[[], Awaitable[None]] | None = None) -> Msg | None:
        """The next job message, or None once `stopping` is set. `hold`, when given, is awaited before
        every try to take one: it returns when the worker may take a job (the temperature guard)."""
        while not stopping.is_set():
            if hold is not None:
                await hold()
                if stopping.is_set():
                    break
            self.bell.clear()
            order = list(self.tiers)
            if self.skipped_lower >= self.fairness:
                order.reverse()
            msg = await self._take(order)
            if msg is not None:
                taken = Tier(msg.subject.rsplit(".", 1)[-1])
                if taken is TIERS[-1] or order[0].tier is not TIERS[0]:
                    self.skipped_lower = 0
                else:
                    self.skipped_lower += 1 if await self._lower_waiting(taken) else 0
                return msg
            self.skipped_lower = 0
            bell = asyncio.ensure_future(self.bell.wait())
            stop = asyncio.ensure_future(stopping.wait())
            await asyncio.wait({bell, stop}, timeout=self.idle_wait_s, return_when=asyncio.FIRST_COMPLETED)
            bell.cancel()
            stop.cancel()
        return None

    async def _lower_waiting(self, taken: Tier) -> bool:
        js = self.nc.jetstream()
        try:
            for tier in TIERS[taken.rank + 1 :]:
                info = await js.consumer_info(names.JOBS_STREAM, tier.consumer, timeout=1.0)
                if info.num_pending:
                    return True
        except Exception:  # broker away or slow: the job in hand still runs; fairness counts it next time
            return False
        return False
