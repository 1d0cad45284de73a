"""A job's events for the gateway's WebSocket and SSE: the gateway's `EventHub` for jobs this caller
may see, and their JSON form (previews as base64)."""

from __future__ import annotations

import base64
from contextlib import aclosing
from typing import Any, AsyncIterator

from gateway.jobs import JobService
from schemas.events import JobEvent


def event_json(event: JobEvent) -> dict[str, Any]:
    body = event.model_dump(mode="python", exclude_none=True)
    if event.preview is not None:
        body["preview"] = base64.b64encode(event.preview).decode("ascii")
    if event.image is not None:
        body["image"] = event.image.model_dump()
    return body


async def follow(jobs: JobService, job_id: str, *, owner: str | None = None, poll_s: float = 1.0) -> AsyncIterator[JobEvent]:
    await jobs.get(job_id, owner=owner)
    async with aclosing(jobs.events.follow(job_id, read_status=lambda: jobs.get(job_id), poll_s=poll_s)) as events:
        async for event in events:
            yield event
