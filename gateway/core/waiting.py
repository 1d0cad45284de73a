"""Waiting to the end: queue a request (one job or a group of n), follow every job until it is done, collect
the images, and cancel the jobs when anything fails on the way or the caller leaves.

Failures are neutral (`gateway.core.problems`): JobLost, WaitTimedOut, JobEnded, ImageLost; each API renders them.
"""

from __future__ import annotations

import asyncio
import logging

from gateway.core.problems import ImageLost, JobEnded, JobLost, NotReady, UnknownJob, WaitTimedOut
from gateway.core.service import JobService
from gateway.core.submission import submit_request
from schemas.request import GenerateRequest
from schemas.status import JobState, JobStatus

log = logging.getLogger(__name__)
WAIT_S = 600.0


async def wait_all(
    jobs: JobService, job_ids: list[str], owner: str | None, wait_s: float, *, keep_cancelled: bool = False
) -> list[JobStatus]:
    """The final records of the jobs, in their order, once every one is done (or, with `keep_cancelled`,
    done or cancelled); raises JobLost, WaitTimedOut or JobEnded for the first that ends otherwise, or after wait_s."""
    tasks = [asyncio.ensure_future(jobs.wait_final(job_id, owner=owner, wait_s=wait_s)) for job_id in job_ids]
    pending = set(tasks)
    ending_well = (JobState.DONE, JobState.CANCELLED) if keep_cancelled else (JobState.DONE,)
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                try:
                    status = task.result()
                except UnknownJob:
                    raise JobLost() from None
                if not status.state.final:
                    raise WaitTimedOut(wait_s)
                if status.state not in ending_well:
                    raise JobEnded(status.job_id, status.state.value, status.error)
        return [task.result() for task in tasks]
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


async def image_data(jobs: JobService, job_id: str, owner: str | None) -> bytes:
    try:
        _, data = await jobs.image(job_id, owner=owner)
    except (NotReady, UnknownJob) as exc:
        raise ImageLost(job_id, str(exc)) from None
    return data


async def cancel_all(jobs: JobService, job_ids: list[str], owner: str | None) -> None:
    for job_id in job_ids:
        try:
            await jobs.cancel(job_id, owner=owner)
        except Exception as exc:  # best effort: the jobs end by themselves anyway
            log.warning("job %s: cancel after an unanswered images request failed: %s", job_id, exc)


async def until_done(
    jobs: JobService, base: GenerateRequest, who: dict, collect, *, wait_s: float | None = None, keep_cancelled: bool = False
):
    """Queues `base` (one job, or a group of n) for `who`, waits until every job is done (or, with
    `keep_cancelled`, done or cancelled by its owner meanwhile), and returns (the jobs' final records,
    `await collect(them)`); `wait_s`: WAIT_S unless given. When anything fails on the way, or the
    caller leaves, the jobs are cancelled."""
    owner = who.get("owner")
    job_ids: list[str] = []
    finished = False
    try:
        queued = await submit_request(jobs, base, **who)
        job_ids = [status.job_id for status in queued]
        finals = await wait_all(jobs, job_ids, owner, WAIT_S if wait_s is None else wait_s, keep_cancelled=keep_cancelled)
        collected = await collect(finals)
        finished = True
        return finals, collected
    finally:
        if not finished and job_ids:
            await cancel_all(jobs, job_ids, owner)
