"""A job's events for the gateway's WebSocket and SSE: the gateway's `EventHub` for jobs this caller
may see, and their JSON form (previews as base64).

While a followed job waits in the queue, its follower also hears where it stands: a `queued` event
again, from this gateway's view of the queue, when the job's position changes (by one, or by 5 % of a
position past 20) or its ETA moves away from the last one's countdown by more than MOVED_BY, at most
once per CHECK_S. These come from the gateway, not from the stream: a late follower replays the stored
events, then gets the job's place as it is then.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from contextlib import aclosing
from typing import Any, AsyncIterator

from gateway.core.service import JobService
from schemas.events import JobEvent
from schemas.status import JobState

log = logging.getLogger("imagegen.gateway")

CHECK_S = 1.0  # how often a follower of a queued job looks at its place
MOVED_BY = 0.2  # an ETA this much longer or shorter than the last one's countdown (and at least MOVED_MIN_S) is news
MOVED_MIN_S = 1.0


def event_json(event: JobEvent) -> dict[str, Any]:
    body = event.model_dump(mode="python", exclude_none=True)
    if event.preview is not None:
        body["preview"] = base64.b64encode(event.preview).decode("ascii")
    if event.image is not None:
        body["image"] = event.image.model_dump()
    return body


async def follow(
    jobs: JobService, job_id: str, *, owner: str | None = None, poll_s: float = 1.0, check_s: float = CHECK_S
) -> AsyncIterator[JobEvent]:
    await jobs.get(job_id, owner=owner)
    async with aclosing(jobs.events.follow(job_id, read_status=lambda: jobs.get(job_id), poll_s=poll_s)) as events:
        waiting: JobEvent | None = None  # the last `queued` event passed on, while nothing came after it
        coming: asyncio.Future | None = None
        try:
            while True:
                if waiting is None and coming is None:  # not queued: the next event, read as it comes
                    event = await anext(events, None)
                else:  # queued: the next event, read while the job's place is looked at every check_s
                    if coming is None:
                        coming = asyncio.ensure_future(anext(events, None))
                    await asyncio.wait((coming,), timeout=check_s)
                    if not coming.done():
                        try:
                            moved = _moved(jobs, job_id, waiting)
                        except Exception as exc:  # a place not worked out must not cost the follower its events
                            log.warning("job %s: its place in the queue not worked out: %s", job_id, exc, extra={"job_id": job_id})
                            moved = None
                        if moved is not None:
                            waiting = moved
                            yield moved
                        continue
                    event, coming = coming.result(), None
                if event is None:
                    return
                waiting = event if event.type == "queued" else None
                yield event
        finally:
            if coming is not None:  # ends the read under way, so that the stream can be closed
                coming.cancel()
                await asyncio.gather(coming, return_exceptions=True)


def _moved(jobs: JobService, job_id: str, last: JobEvent) -> JobEvent | None:
    """A `queued` event for where the job stands now, if that is news after `last`; None otherwise (and
    once the job is no longer queued: its own events say what happened)."""
    status = jobs.view.jobs.get(job_id)
    if status is None or status.state is not JobState.QUEUED:
        return None
    now = time.time()
    position, eta = jobs.position(status), jobs.eta(status)
    moved = position is not None and (last.position is None or abs(position - last.position) >= max(1, last.position // 20))
    revised = eta is not None and (last.eta_s is None or not _close(eta, last.eta_s - (now - last.ts)))
    if not (moved or revised):  # a `queued` event without them (a job published straight onto NATS) gets them now
        return None
    return JobEvent(type="queued", job_id=job_id, ts=now, position=position, eta_s=eta)


def _close(eta: float, countdown: float) -> bool:
    return abs(eta - countdown) <= max(MOVED_MIN_S, MOVED_BY * max(countdown, 0.0))
