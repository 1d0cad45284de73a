"""Follows one job's events: replays what the stream kept, then live, ending with the final event.

A client that connects late or reconnects gets every stored event in order, then the live ones.
If the stream no longer holds the final event (it expired, or the job finished before events were
kept), the final event is rebuilt from the status record, so a follower always ends.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any, AsyncIterator

from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from gateway.jobs import JobService
from schemas import names
from schemas.codec import DecodeError, decode
from schemas.events import JobEvent
from schemas.status import JobState, JobStatus


def final_event(status: JobStatus) -> JobEvent:
    if status.state is JobState.DONE:
        return JobEvent(type="done", job_id=status.job_id, image=status.image, ts=status.finished_at or 0.0)
    return JobEvent(type=status.state.value, job_id=status.job_id, reason=status.error, ts=status.finished_at or 0.0)


def event_json(event: JobEvent) -> dict[str, Any]:
    body = event.model_dump(mode="python", exclude_none=True)
    if event.preview is not None:
        body["preview"] = base64.b64encode(event.preview).decode("ascii")
    if event.image is not None:
        body["image"] = event.image.model_dump()
    return body


async def follow(jobs: JobService, job_id: str, *, owner: str | None = None, poll_s: float = 1.0) -> AsyncIterator[JobEvent]:
    await jobs.get(job_id, owner=owner)
    inbox: asyncio.Queue[Msg] = asyncio.Queue()

    async def deliver(msg: Msg) -> None:
        inbox.put_nowait(msg)

    # Waits without timeouts that raise: a follower idles most of its life, and an exception per
    # idle second (with its traceback cycle) made the garbage collector stall the whole gateway.
    sub = await jobs.js.subscribe(
        names.events_subject(job_id), ordered_consumer=True, deliver_policy=DeliverPolicy.ALL, cb=deliver
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
                    status = await jobs.get(job_id)
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
        except Exception:
            pass
