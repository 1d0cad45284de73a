"""Follows one job's events: replays what stream IMAGEGEN_EVENTS kept, then live, to the final event.

A client that connects late or reconnects gets every stored event in order, then the live ones. When
no event comes for `poll_s`, the status record says whether the job has ended meanwhile (its final
event may have expired from the stream); then the final event is rebuilt from it, so a follower
always ends. Used by the gateway's WebSocket and SSE, and by the client over NATS.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Awaitable, Callable, Generic, TypeVar

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

from schemas import names
from schemas.codec import DecodeError, decode
from schemas.connect import unsubscribe_quietly
from schemas.events import JobEvent
from schemas.status import JobState, JobStatus

T = TypeVar("T")


class PatientQueue(Generic[T]):
    """A queue read with an idle limit that raises nothing: `get` returns None when no item came
    within the limit, and the read it started goes on for the next call. A follower idles most of its
    life, and an exception per idle second (with its traceback cycle) made the garbage collector stall
    a busy gateway."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[T] = asyncio.Queue()
        self.getter: asyncio.Future[T] | None = None

    def put(self, item: T) -> None:
        self.queue.put_nowait(item)

    async def get(self, idle_s: float) -> T | None:
        if self.getter is None:
            if not self.queue.empty():
                return self.queue.get_nowait()
            self.getter = asyncio.ensure_future(self.queue.get())
        await asyncio.wait((self.getter,), timeout=idle_s)
        if not self.getter.done():
            return None
        item, self.getter = self.getter.result(), None
        return item

    def close(self) -> None:
        if self.getter is not None:
            self.getter.cancel()


def final_event(status: JobStatus) -> JobEvent:
    """The final event of a finished job, rebuilt from its status record."""
    if status.state is JobState.DONE:
        return JobEvent(type="done", job_id=status.job_id, image=status.image, ts=status.finished_at or 0.0)
    return JobEvent(type=status.state.value, job_id=status.job_id, reason=status.error, ts=status.finished_at or 0.0)


async def ended_meanwhile(read_status: Callable[[], Awaitable[JobStatus]]) -> JobEvent | None:
    """After a quiet spell: the job's final event, rebuilt from its record, when the job ended
    meanwhile (its final event was missed); None while it goes on."""
    status = await read_status()
    return final_event(status) if status.state.final else None


async def follow_events(
    js: JetStreamContext,
    job_id: str,
    *,
    read_status: Callable[[], Awaitable[JobStatus]],
    poll_s: float = 1.0,
) -> AsyncIterator[JobEvent]:
    inbox: PatientQueue[Msg] = PatientQueue()

    async def deliver(msg: Msg) -> None:
        inbox.put(msg)

    sub = await js.subscribe(
        names.events_subject(job_id), stream=names.EVENTS_STREAM, ordered_consumer=True,
        deliver_policy=DeliverPolicy.ALL, cb=deliver,
    )
    try:
        while True:
            msg = await inbox.get(poll_s)
            if msg is None:  # quiet for poll_s: the record says whether the job ended meanwhile
                if (ended := await ended_meanwhile(read_status)) is not None:
                    yield ended
                    return
                continue
            try:
                event = decode(msg.data, JobEvent)
            except DecodeError:
                continue
            yield event
            if event.final:
                return
    finally:
        inbox.close()
        await unsubscribe_quietly(sub)
