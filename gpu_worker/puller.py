"""Takes the next job message, highest tier first, one at a time.

Each tier has durable pull consumers, one per lane: the jobs naming no model, and the jobs naming
this worker's model (`imagegen.jobs.<tier>.<lane>`, which only that model's workers read). Within a
tier the lane not taken from last is asked first, so that neither keeps the other's jobs waiting.
The worker asks each lane in turn for one message with `no_wait` (one round trip, well under a
millisecond on a LAN); when all are empty it sleeps until a job is published on any tier (a plain
subscription to `imagegen.jobs.>` rings a bell) or a short timeout.

A lane that answered "no messages", or whose message taken left none pending, is known empty until a
job is published on it (its bell) or `idle_wait_s` passes, and is not asked meanwhile: a worker woken
by a bell asks the lanes that rang, not every lane, and one that finishes a job asks only the lanes
that may hold work. Bells of other models' lanes are ignored. Jobs that come back without a publish
(a retry after a delay, a redelivery after the ack wait) are found within `idle_wait_s`, as by the
idle worker's look at every lane. A lane that rang is asked with a short wait (`bell_wait_s`)
instead of `no_wait`: the bell can come before the stream has stored the job, and an empty answer
then would leave the job until the next look.

On a cluster, a lane whose consumer has no leader (an election) does not answer at all: it is given
up after `answer_s` (half a second; a late answer is taken on the next ask), and the election of a
consumer's new leader (its advisory) rings the bell, so that work resumes as soon as it is led again.

Starvation: after `fairness` jobs in a row taken from a higher tier while a lower one had work waiting,
the next pull starts at the lowest non-empty tier, so low work always moves, at 1 in `fairness + 1`
(the rule in schemas.take_order, which the gateway's forecasts plan with).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Awaitable, Callable

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from schemas import names
from schemas.names import TIERS, Tier
from schemas.take_order import count_after, lower_tiers_turn
from schemas.workers import DEFAULT_FAIRNESS

NO_WAIT = json.dumps({"batch": 1, "no_wait": True}).encode()
EMPTY_STATUSES = ("404", "408")  # no messages; none came within the request's wait
CONSUMER_ELECTED = f"$JS.EVENT.ADVISORY.CONSUMER.LEADER_ELECTED.{names.JOBS_STREAM}.>"
ANSWER_S = 0.5  # a lane that does not answer a pull within this long (no leader) is asked again later


class TierPuller:
    """One lane's pull consumer (a tier's jobs naming no model, or naming `model`), asked for one
    message at a time."""

    def __init__(self, nc: NATS, tier: Tier, model: str | None = None):
        self.nc = nc
        self.tier = tier
        self.subject = names.jobs_subject(tier, model)
        self.consumer = names.jobs_consumer(tier, model)
        self.api_subject = f"$JS.API.CONSUMER.MSG.NEXT.{names.JOBS_STREAM}.{self.consumer}"
        self.inbox = nc.new_inbox()
        self.replies: asyncio.Queue[Msg] = asyncio.Queue()
        self.sub: Subscription | None = None
        self.found_none = False  # the last ask was answered "no messages"

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

    async def next(self, timeout: float = ANSWER_S, *, wait_s: float = 0.0) -> Msg | None:
        """One job message of this tier, or None when there is none right now (or, with `wait_s`,
        none came within that long)."""
        self.found_none = False
        late = self._ready()
        if late is not None:
            return late
        ask = json.dumps({"batch": 1, "expires": int(wait_s * 1e9)}).encode() if wait_s > 0 else NO_WAIT
        await self.nc.publish(self.api_subject, ask, reply=self.inbox)
        try:
            msg = await asyncio.wait_for(self.replies.get(), timeout + wait_s)
        except asyncio.TimeoutError:
            return None
        if msg.reply and msg.reply.startswith("$JS.ACK."):
            return msg
        self.found_none = (msg.headers or {}).get("Status") in EMPTY_STATUSES
        return None  # a status: 404 no messages, 408 expired, 409 leadership change...


class PriorityPuller:
    def __init__(
        self,
        nc: NATS,
        *,
        fairness: int = DEFAULT_FAIRNESS,
        idle_wait_s: float = 1.0,
        bell_wait_s: float = 0.05,
        on_bell: Callable[[Msg], None] | None = None,
        model: str | None = None,
    ):
        self.nc = nc
        self.on_bell = on_bell  # told of each job published (the message itself), before it is pulled
        self.fairness = fairness
        self.idle_wait_s = idle_wait_s
        self.bell_wait_s = bell_wait_s
        # per tier, highest first: the lane of jobs naming this worker's model, then the one of jobs naming none
        self.tiers = [
            [TierPuller(nc, tier, model), TierPuller(nc, tier)] if model is not None else [TierPuller(nc, tier)]
            for tier in TIERS
        ]
        self.lanes = [puller for lanes in self.tiers for puller in lanes]
        self.bell = asyncio.Event()
        self.bell_sub: Subscription | None = None
        self.elected_sub: Subscription | None = None
        self.skipped_lower = 0
        self.rings: dict[str, int] = {p.subject: 0 for p in self.lanes}  # bells heard, per lane
        self.empty: dict[str, float] = {}  # lane -> when it was found empty (monotonic), until its bell
        self.rang: set[str] = set()  # lanes whose bell rang since they were last asked
        self._fairness_check: asyncio.Task | None = None

    async def start(self) -> None:
        for puller in self.lanes:
            await puller.start()
        mine = {p.subject for p in self.lanes}

        async def ring(msg: Msg) -> None:
            lane = msg.subject
            if lane in mine:
                self.rings[lane] += 1
                self.rang.add(lane)
                self.empty.pop(lane, None)
            elif lane.count(".") > 2:  # another model's lane: not for this worker
                return
            else:
                self.empty.clear()
            self.bell.set()
            if self.on_bell is not None:
                self.on_bell(msg)

        self.bell_sub = await self.nc.subscribe(f"{names.JOBS_SUBJECT_PREFIX}.>", cb=ring)

        async def elected(msg: Msg) -> None:  # a lane led again: ask every lane now
            self.empty.clear()
            self.bell.set()

        self.elected_sub = await self.nc.subscribe(CONSUMER_ELECTED, cb=elected)

    async def stop(self) -> None:
        if self._fairness_check is not None:
            self._fairness_check.cancel()
        for puller in self.lanes:
            await puller.stop()
        for sub in (self.bell_sub, self.elected_sub):
            if sub is not None:
                await sub.unsubscribe()

    def known_empty(self, tier: Tier) -> bool:
        return all(self._lane_empty(p.subject) for p in self.tiers[tier.rank])

    def _lane_empty(self, lane: str) -> bool:
        found_at = self.empty.get(lane)
        return found_at is not None and time.monotonic() - found_at < self.idle_wait_s

    async def _take(self, order: list[list[TierPuller]]) -> Msg | None:
        for puller in (p for lanes in order for p in lanes):
            lane = puller.subject
            if self._lane_empty(lane):
                continue
            rings = self.rings[lane]
            wait_s = self.bell_wait_s if lane in self.rang else 0.0
            self.rang.discard(lane)
            msg = await puller.next(wait_s=wait_s)
            quiet = self.rings[lane] == rings  # no job published on the lane while it was asked
            if msg is not None:
                if quiet and msg.metadata.num_pending == 0:
                    self.empty[lane] = time.monotonic()
                return msg
            if quiet and puller.found_none:
                self.empty[lane] = time.monotonic()
        return None

    async def next(self, stopping: asyncio.Event, *, hold: Callable[[], Awaitable[None]] | None = None) -> Msg | None:
        """The next job message, or None once `stopping` is set. `hold`, when given, is awaited before
        every try to take one: it returns when the worker may take a job (the temperature guard)."""
        while not stopping.is_set():
            if hold is not None:
                await hold()
                if stopping.is_set():
                    break
            if self._fairness_check is not None:
                await self._fairness_check
                self._fairness_check = None
            self.bell.clear()
            order = list(self.tiers)
            if lower_tiers_turn(self.skipped_lower, self.fairness):
                order.reverse()
            msg = await self._take(order)
            if msg is not None:
                taken = Tier(msg.subject.split(".")[2])  # imagegen.jobs.<tier>[.<model lane>]
                lanes = self.tiers[taken.rank]
                if len(lanes) > 1:  # the tier's other lane is asked first next time: neither waits on the other
                    self.tiers[taken.rank] = [p for p in lanes if p.subject != msg.subject] + [p for p in lanes if p.subject == msg.subject]
                before = self.skipped_lower
                self.skipped_lower = count_after(taken, before, self.fairness, lower_waiting=False)
                if_waiting = count_after(taken, before, self.fairness, lower_waiting=True)
                if if_waiting != self.skipped_lower and not all(self.known_empty(t) for t in TIERS[taken.rank + 1 :]):
                    # whether a lower tier waits is asked while the job runs; the next pull waits for it
                    self._fairness_check = asyncio.ensure_future(self._count_skipped(taken, if_waiting))
                return msg
            self.skipped_lower = 0
            bell = asyncio.ensure_future(self.bell.wait())
            stop = asyncio.ensure_future(stopping.wait())
            await asyncio.wait({bell, stop}, timeout=self.idle_wait_s, return_when=asyncio.FIRST_COMPLETED)
            if not bell.done() and not stop.done():  # a quiet spell: every tier is asked again
                self.empty.clear()
            bell.cancel()
            stop.cancel()
        return None

    async def take_more(self, lane: str, *, wait_s: float = 0.0) -> Msg | None:
        """One more job on `lane` (the subject a job was just taken from), waiting at most `wait_s`:
        for the jobs a worker takes together (`--max-batch`). None when the lane has none."""
        puller = next((p for p in self.lanes if p.subject == lane), None)
        if puller is None or (self._lane_empty(lane) and not wait_s):
            return None
        msg = await puller.next(wait_s=wait_s)
        if msg is None and puller.found_none or msg is not None and msg.metadata.num_pending == 0:
            self.empty[lane] = time.monotonic()
        return msg

    async def _count_skipped(self, taken: Tier, if_waiting: int) -> None:
        if await self._lower_waiting(taken):
            self.skipped_lower = if_waiting

    async def _lower_waiting(self, taken: Tier) -> bool:
        js = self.nc.jetstream()
        try:
            for tier in TIERS[taken.rank + 1 :]:
                for puller in self.tiers[tier.rank]:
                    info = await js.consumer_info(names.JOBS_STREAM, puller.consumer, timeout=1.0)
                    if info.num_pending:
                        return True
        except Exception:  # broker away or slow: the job in hand still runs; fairness counts it next time
            return False
        return False
