"""Follows one job's events: replays what stream IMAGEGEN_EVENTS kept, then live, to the final event.

A client that connects late or reconnects gets every stored event in order, then the live ones. When
no event comes for `poll_s`, the status record says whether the job has ended meanwhile (its final
event may have expired from the stream); then the final event is rebuilt from it, so a follower
always ends. Used by the gateway's WebSocket and SSE, and by the client over NATS.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Awaitable, Callable

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

from schemas import names
from schemas.codec import DecodeError, decode
from schemas.events import JobEvent
from schemas.status import JobState, JobStatus


def final_event(status: JobStatus) -> JobEvent:
    """The final event of a finished job, rebuilt from its status record."""
    if status.state is JobState.DONE:
        return JobEvent(type="done", job_id=status.job_id, image=status.image, ts=status.finished_at or 0.0)
    return JobEvent(type=status.state.value, job_id=status.job_id, reason=status.error, ts=status.finished_at or 0.0)


async def follow_events(
    js: JetStreamContext,
    job_id: str,
    *,
    read_status: Callable[[], Awaitable[JobStatus]],
    poll_s: float = 1.0,
) -> AsyncIterator[JobEvent]:
    inbox: asyncio.Queue[Msg] = asyncio.Queue()

    async def deliver(msg: Msg) -> None:
        inbox.put_nowait(msg)

    # Waits without timeouts that raise: a follower idles most of its life, and an exception per
    # idle second (with its traceback cycle) made the garbage collector stall a busy gateway.
    sub = await js.subscribe(
        names.events_subject(job_id), stream=names.EVENTS_STREAM, ordered_consumer=True,
        deliver_policy=DeliverPolicy.ALL, cb=deliver,
    )
    getter: asyncio.Future[Msg] | None = None
    try:
        while True:
            if getter is None:
                if not inbox.empty():
                    msg = inbox.get_nowait()
                else:
                    getter = asyncio.ensure_future(inbox.get())
            if getter is not None:
                await asyncio.wait((getter,), timeout=poll_s)
                if not getter.done():
                    status = await read_status()
                    if status.state.final:
                        yield final_event(status)
                        return
                    continue
                msg, getter = getter.result(), None
            try:
                event = decode(msg.data, JobEvent)
            except DecodeError:
                continue
            yield event
            if event.final:
                return
    finally:
        if getter is not None:
            getter.cancel()
        try:
            await sub.unsubscribe()
        except Exception:  # the connection may be closing; the subscription ends with it
            pass
