"""A worker's job events on `imagegen.events.<job_id>`: progress and previews as plain NATS messages
(a lost one is replaced by the next), and the moments a follower must hear (a run's start, a job's
end) published to the events stream with an ack. While the broker is away those are sent again
every `retry_s`, with one Nats-Msg-Id, so an outage delays them and the stream keeps each once;
after `give_up_s` a warning names the one given up.

A stored event goes out as the plain ones do, in the caller's turn, with a reply subject under one
inbox this publisher listens on: its ack takes it off the list of unacked events. One timer, armed
only while that list is not empty, sends again what was not acked in time (no ack within
`ack_timeout_s`, or an error answered); when the broker answers, no event costs a task or a timer
of its own.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from dataclasses import dataclass

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from schemas import names
from schemas.codec import encode
from schemas.connect import unsubscribe_quietly
from schemas.events import JobEvent

log = logging.getLogger("imagegen.worker")

STORED_EVENTS = frozenset({"started", "done", "failed", "cancelled", "expired"})


def message_id(event: JobEvent, worker_id: str) -> str:
    """One stored `started` per run; one end per job, whichever run tells it (a run that finds its job
    done tells it again, in case the run that finished it died first: the stream keeps the first)."""
    if event.type == "started":
        return f"{event.job_id}.started.{event.attempt or 0}.{worker_id}"
    return f"{event.job_id}.{event.type}"


def acked(msg: Msg) -> bool:
    """Whether a reply is the stream's ack (not an error, nor the broker's "no responders")."""
    try:
        answer = json.loads(msg.data)
    except ValueError:  # a status message without a body
        return False
    return isinstance(answer, dict) and "error" not in answer


@dataclass
class Unacked:
    """A stored event on its way: what to send again, and when."""

    event: JobEvent
    subject: str
    data: bytes
    headers: dict[str, str]
    give_up_at: float  # monotonic
    again_at: float = 0.0  # monotonic: sent again at the first tick after this


class EventPublisher:
    def __init__(
        self, nc: NATS, *, worker_id: str, retry_s: float = 0.5, give_up_s: float = 120.0, ack_timeout_s: float = 2.0
    ):
        self.nc, self.worker_id = nc, worker_id
        self.retry_s, self.give_up_s, self.ack_timeout_s = retry_s, give_up_s, ack_timeout_s
        self.unacked: dict[str, Unacked] = {}  # by the token of its reply subject
        self.all_acked = asyncio.Event()
        self.all_acked.set()
        self._inbox: str | None = None  # the reply subjects' prefix, once subscribed
        self._sub: Subscription | None = None
        self._tokens = itertools.count()
        self._tick: asyncio.TimerHandle | None = None
        self._sending_again: asyncio.Task | None = None

    async def publish(self, event: JobEvent) -> None:
        if event.type not in STORED_EVENTS:
            try:
                await self.nc.publish(names.events_subject(event.job_id), encode(event))
            except Exception as exc:
                log.warning("job %s event %s not published: %s", event.job_id, event.type, exc)
            return
        try:
            await self._listen()
        except Exception as exc:  # a closed connection: nothing can be sent
            log.warning("job %s event %s not published: %s", event.job_id, event.type, exc)
            return
        entry = Unacked(
            event=event, subject=names.events_subject(event.job_id), data=encode(event),
            headers={"Nats-Msg-Id": message_id(event, self.worker_id)}, give_up_at=time.monotonic() + self.give_up_s,
        )
        token = str(next(self._tokens))
        self.unacked[token] = entry
        self.all_acked.clear()
        await self._send(token, entry)
        self._arm()

    async def _listen(self) -> None:
        if self._sub is None:
            inbox = self.nc.new_inbox() + "."
            self._sub = await self.nc.subscribe(inbox + "*", cb=self._on_reply)
            self._inbox = inbox

    async def _send(self, token: str, entry: Unacked) -> None:
        entry.again_at = time.monotonic() + self.ack_timeout_s
        try:
            await self.nc.publish(entry.subject, entry.data, reply=self._inbox + token, headers=entry.headers)
        except Exception:  # the broker is away: sent again at a tick
            entry.again_at = time.monotonic() + self.retry_s

    async def _on_reply(self, msg: Msg) -> None:
        token = msg.subject[len(self._inbox or ""):]
        entry = self.unacked.get(token)
        if entry is None:
            return
        if not acked(msg):  # the stream could not take it now (no leader, no responders): again soon
            entry.again_at = min(entry.again_at, time.monotonic() + self.retry_s)
            return
        del self.unacked[token]
        if not self.unacked:
            self.all_acked.set()

    def _arm(self) -> None:
        if self._tick is None and self.unacked:
            self._tick = asyncio.get_running_loop().call_later(self.retry_s, self._on_tick)

    def _on_tick(self) -> None:
        """Every `retry_s` while events are unacked: gives up the old ones, sends again those due."""
        self._tick = None
        now = time.monotonic()
        for token, entry in list(self.unacked.items()):
            if now > entry.give_up_at or self.nc.is_closed:
                log.warning("job %s event %s not published: no ack from the events stream", entry.event.job_id, entry.event.type)
                del self.unacked[token]
        if not self.unacked:
            self.all_acked.set()
            return
        due = [(token, entry) for token, entry in self.unacked.items() if entry.again_at <= now]
        if due and (self._sending_again is None or self._sending_again.done()):
            self._sending_again = asyncio.ensure_future(self._send_again(due))
        self._arm()

    async def _send_again(self, due: list[tuple[str, Unacked]]) -> None:
        for token, entry in due:
            if token in self.unacked:
                await self._send(token, entry)

    async def close(self, *, timeout_s: float = 5.0) -> None:
        """Waits a while for the stored events still on their way."""
        if self.unacked:
            try:
                await asyncio.wait_for(self.all_acked.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        if self._sending_again is not None:
            self._sending_again.cancel()
        await unsubscribe_quietly(self._sub)
