"""Whether a try still holds its job.

A worker that stalls past the ack wait (paused, swapped out, its host frozen) may find on waking that
its job went to another worker. It notices at its next step: a try that has not seen its record for
half the ack wait reads it before going on, and stops (JobLost) when the record names another try.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from gpu_worker.errors import JobLost
from gpu_worker.running_job import RunningJob
from schemas import jobstore
from schemas.status import JobState, JobStatus

if TYPE_CHECKING:
    from gpu_worker.worker import Worker

log = logging.getLogger("imagegen.worker")


def hold_check_s(worker: Worker) -> float:
    """How long a try goes on without reading its record."""
    return worker.settings.topology.ack_wait_s / 2


def note_holder(worker: Worker, job: RunningJob, status: JobStatus | None) -> None:
    """Takes the record's word on who runs the job, once this try's running mark has landed."""
    if job.marking is None or not job.marking.done() or status is None:
        job.checked_at = time.monotonic()
        return
    if status.state is JobState.RUNNING and (status.attempt, status.worker) != (job.attempt, worker.worker_id):
        job.lost = f"try {status.attempt} on worker {status.worker} holds it now"
    else:
        job.checked_at = time.monotonic()


async def check_hold(worker: Worker, job: RunningJob) -> None:
    """Reads the record now and takes its word on who runs the job."""
    try:
        note_holder(worker, job, await jobstore.read_status(worker.status_kv, job.envelope.job_id))
    except Exception as exc:  # broker away: go on, and ask again later
        job.checked_at = time.monotonic()
        log.debug("job %s: its record could not be read (%s); going on", job.envelope.job_id, exc)


async def check_hold_if_due(worker: Worker, job: RunningJob) -> None:
    """On the loop, before the image is stored: raises JobLost when another try holds the job."""
    if time.monotonic() - job.checked_at > hold_check_s(worker):
        await check_hold(worker, job)
    if job.lost is not None:
        raise JobLost(job.lost)


def check_hold_from_gpu(worker: Worker, job: RunningJob) -> None:
    """In the GPU thread, at a step: reads the record (on the loop) when it was not seen for long."""
    if job.lost is None and time.monotonic() - job.checked_at > hold_check_s(worker):
        try:
            asyncio.run_coroutine_threadsafe(check_hold(worker, job), worker.loop).result(timeout=worker.settings.topology.ack_wait_s)
        except Exception as exc:
            log.debug("job %s: hold check skipped: %s", job.envelope.job_id, exc)
    if job.lost is not None:
        raise JobLost(job.lost)
