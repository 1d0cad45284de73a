"""A worker's job events on `imagegen.events.<job_id>`: progress and previews as plain NATS messages
(a lost one is replaced by the next), and the moments a follower must hear (a run's start, a job's
end) published to the events stream with an ack. While the broker is away those are sent again
every `retry_s`, with one Nats-Msg-Id, so an outage delays them and the stream keeps each once;
after `give_up_s` a warning names the one given up."""

from __future__ import annotations

import asyncio
import logging
import time

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from schemas import names
from schemas.codec import encode
from schemas.events import JobEvent

log = logging.getLogger("imagegen.worker")

STORED_EVENTS = frozenset({"started", "done", "failed", "cancelled", "expired"})


def message_id(event: JobEvent, worker_id: str) -> str:
    """One stored `started` per run; one end per job, whichever run tells it (a run that finds its job
    done tells it again, in case the run that finished it died first: the stream keeps the first)."""
    if event.type == "started":
        return f"{event.job_id}.started.{event.attempt or 0}.{worker_id}"
    return f"{event.job_id}.{event.type}"


class EventPublisher:
    def __init__(self, nc: NATS, js: JetStreamContext, *, worker_id: str, retry_s: float = 0.5, give_up_s: float = 120.0):
        self.nc, self.js, self.worker_id = nc, js, worker_id
        self.retry_s, self.give_up_s = retry_s, give_up_s
        self.in_flight: set[asyncio.Task] = set()

    async def publish(self, event: JobEvent) -> None:
        if event.type in STORED_EVENTS:
            task = asyncio.ensure_future(self._stored(event))
            self.in_flight.add(task)
            task.add_done_callback(self.in_flight.discard)
            return
        try:
            await self.nc.publish(names.events_subject(event.job_id), encode(event))
        except Exception as exc:
            log.warning("job %s event %s not published: %s", event.job_id, event.type, exc)

    async def _stored(self, event: JobEvent) -> None:
        subject, data = names.events_subject(event.job_id), encode(event)
        headers = {"Nats-Msg-Id": message_id(event, self.worker_id)}
        deadline = time.monotonic() + self.give_up_s
        while True:
            try:
                await self.js.publish(subject, data, headers=headers, timeout=2.0)
                return
            except Exception as exc:
                if time.monotonic() > deadline or self.nc.is_closed:
                    log.warning("job %s event %s not published: %s", event.job_id, event.type, exc)
                    return
                await asyncio.sleep(self.retry_s)

    async def close(self, *, timeout_s: float = 5.0) -> None:
        """Waits a while for the stored events still on their way."""
        if self.in_flight:
            await asyncio.wait(list(self.in_flight), timeout=timeout_s)
