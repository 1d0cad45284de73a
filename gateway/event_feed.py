"""Follows one job's events: replays what the stream kept, then live, ending with the final event.

A client that connects late or reconnects gets every stored event in order, then the live ones.
If the stream no longer holds the final event (it expired, or the job finished before events were
kept), the final event is rebuilt from the status record, so a follower always ends.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any, AsyncIterator

import nats.errors
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
    sub = await jobs.js.subscribe(
        names.events_subject(job_id), ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=poll_s)
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                status = await jobs.get(job_id)
                if status.state.final:
                    yield final_event(status)
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
        try:
            await sub.unsubscribe()
        except Exception:
            pass
