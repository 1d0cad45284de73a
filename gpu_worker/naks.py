"""Naks that the broker confirms, sent again until it does.

A plain nak is a publish nobody answers: sent while the workers' consumer has no leader (a cluster
electing one, the very moment that interrupted the job), it is lost, and the job comes back only
after the ack wait. Here a nak is a request to the message's reply subject, which the consumer's
leader answers (as it answers `ack_sync`); unanswered, it is sent again every `every_s` seconds, and
at once when a consumer of the job stream gets a new leader, until one is answered or the ack wait
since the try ended has passed (the consumer then redelivers the job by itself).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from schemas import names
from schemas.connect import BROKER_ERRORS, unsubscribe_quietly

log = logging.getLogger("imagegen.worker")

CONSUMER_ELECTED = f"$JS.EVENT.ADVISORY.CONSUMER.LEADER_ELECTED.{names.JOBS_STREAM}.>"


def nak_payload(delay_s: float) -> bytes:
    return b"-NAK " + json.dumps({"delay": int(delay_s * 1e9)}).encode() if delay_s > 0 else b"-NAK"


class Naks:
    def __init__(self, nc: NATS, *, ack_wait_s: float, timeout_s: float = 0.5, every_s: float = 0.5):
        self.nc = nc
        self.ack_wait_s = ack_wait_s
        self.timeout_s = timeout_s
        self.every_s = every_s
        self.elected = asyncio.Event()  # set by a consumer leader's election: unanswered naks go again now
        self.pending: dict[str, asyncio.Task] = {}  # reply subject -> the task sending its nak again
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(CONSUMER_ELECTED, cb=self._on_elected)

    async def close(self) -> None:
        for task in self.pending.values():
            task.cancel()
        await unsubscribe_quietly(self._sub)

    async def _on_elected(self, msg: Msg) -> None:
        self.elected.set()

    async def nak(self, msg: Msg, delay_s: float, *, tag: str) -> None:
        """Naks `msg` (redelivery after `delay_s`); when the broker does not confirm it, it is sent
        again in the background."""
        try:
            await self._send(msg, delay_s)
            return
        except BROKER_ERRORS as exc:
            log.warning("%s: nak unanswered (%s); sending it again until the consumer answers", tag, type(exc).__name__)
        if msg.reply not in self.pending:
            task = asyncio.ensure_future(self._again(msg, delay_s, tag, time.monotonic() + self.ack_wait_s))
            self.pending[msg.reply] = task
            task.add_done_callback(lambda _: self.pending.pop(msg.reply, None))

    async def _send(self, msg: Msg, delay_s: float) -> None:
        await self.nc.request(msg.reply, nak_payload(delay_s), timeout=self.timeout_s)
        msg._ackd = True

    async def _again(self, msg: Msg, delay_s: float, tag: str, until: float) -> None:
        tries = 1
        while time.monotonic() < until:
            self.elected.clear()
            try:
                await asyncio.wait_for(self.elected.wait(), self.every_s)
            except asyncio.TimeoutError:
                pass
            tries += 1
            try:
                await self._send(msg, delay_s)
            except BROKER_ERRORS:
                continue
            except Exception as exc:  # a closed connection: the ack wait brings the job back
                log.warning("%s: nak not sent (%s: %s); it comes back after the ack wait", tag, type(exc).__name__, exc)
                return
            log.info("%s: nak answered on try %d; retry in %.1fs", tag, tries, delay_s)
            return
        log.warning("%s: nak never answered; the consumer redelivers it after the ack wait", tag)
