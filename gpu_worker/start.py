"""The second of a try's three steps (admit, start, finish): the job marked running, with its `started`
event, while the engine starts on it."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from gpu_worker.admit import Admitted, generation_task
from gpu_worker.errors import JobCancelled, JobExpired
from gpu_worker.finish import tell_done_again
from gpu_worker.generation import Made, generating
from schemas import jobstore
from schemas.events import JobEvent
from schemas.status import JobState, JobStatus

if TYPE_CHECKING:
    from gpu_worker.worker import Worker

log = logging.getLogger("imagegen.worker")


async def start(worker: Worker, admitted: Admitted) -> tuple[Made, float] | None:
    """Marks the job running and runs the engine meanwhile: (what the engine made, when it started),
    None when another run finished the job meanwhile; raises when it was cancelled or expired."""
    job = admitted.job
    envelope, attempt, steps = job.envelope, job.attempt, job.total
    job_id, request = envelope.job_id, envelope.request

    def to_running(s: JobStatus) -> JobStatus | None:
        if s.state.final:  # another run of this job (a redelivery that raced this one) ended it meanwhile
            return None
        if s.cancel_requested:
            job.cancel.set()
        s.state, s.worker, s.attempt = JobState.RUNNING, worker.worker_id, attempt
        s.started_at, s.step, s.total_steps, s.seed = time.time(), 0, steps, envelope.seed
        return s

    # The running mark goes out over the record just read (one write, no second read, unless it
    # changed meanwhile), with the `started` event in the same send, and the engine starts while
    # the broker confirms it: the mark's round trip overlaps the GPU work instead of preceding it.
    # A mark refused because the job ended meanwhile (a cancel in that instant, a redelivery that
    # raced this one) stops the engine at its next step; its `started` then follows the end.
    known = (admitted.status, admitted.revision) if admitted.revision else None
    marking = job.marking = asyncio.ensure_future(jobstore.change_status_at(worker.status_kv, job_id, to_running, known=known))
    await worker.events.publish(JobEvent(type="started", job_id=job_id, worker=worker.worker_id, attempt=attempt, total=steps))
    log.info("job %s try %d running", job_id, attempt)  # every run, logged here even when its events are lost
    task = generation_task(
        worker, envelope, init_image=admitted.init_image, mask_image=admitted.mask_image, control_image=admitted.control_image
    )
    job.stamps.refiner_steps = worker.engine.refiner_steps(task)
    gen_started = time.monotonic()
    making = generating(worker, job, task, request.format, request.quality)
    try:
        marked, revision, applied = await marking
        job.remember(marked, revision)
    except BaseException:
        job.cancel.set()  # the broker is away: the engine stops at its next step, the try ends
        await asyncio.gather(making, return_exceptions=True)
        raise
    ended = marked.state if not applied and marked is not None else None  # the end another run wrote
    if ended is not None or job.cancel.is_set():
        job.cancel.set()
        await asyncio.gather(making, return_exceptions=True)
        if ended is JobState.DONE:
            log.info("job %s try %d already done; acking", job_id, attempt)
            await tell_done_again(worker, marked)
            return None
        raise {JobState.CANCELLED: JobCancelled, JobState.EXPIRED: JobExpired}.get(ended, JobCancelled)()
    return await making, gen_started
