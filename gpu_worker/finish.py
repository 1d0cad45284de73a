"""The last of a try's three steps (admit, start, finish): the image stored under the job id, `done`
written (unless another run did first), the followers told and the speed model taught."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from nats.js import api

from gpu_worker.errors import JobFailed
from gpu_worker.generation import Made
from gpu_worker.hold_check import check_hold_if_due
from gpu_worker.running_job import RunningJob
from schemas import jobstore, names
from schemas.events import JobEvent
from schemas.jetstream import MAX_BYTES_FLAG
from schemas.status import ImageRef, JobState, JobStatus
from schemas.storage import StoreFull, is_full

if TYPE_CHECKING:
    from gpu_worker.worker import Worker

log = logging.getLogger("imagegen.worker")


async def finish(worker: Worker, job: RunningJob, made: Made, gen_started: float) -> None:
    """Stores the image under the job id, writes `done` (unless another run did first), tells the
    followers and teaches the speed model."""
    image, nsfw, data, steps_done, encoded = made
    job_id, request, attempt = job.envelope.job_id, job.envelope.request, job.attempt
    await check_hold_if_due(worker, job)  # no image nor status over the try that holds the job now
    if nsfw:
        log.warning("job %s image flagged by the safety check: blanked", job_id)
    stored = await store_image(worker, job, data)
    if stored is None:
        log.info("job %s try %d: another run finished it first; its image stands", job_id, attempt)
        return
    ref = ImageRef(
        name=job_id, content_type=request.content_type, size=len(data), width=image.width, height=image.height,
        digest=stored.digest, chunks_id=stored.nuid,
    )

    def to_done(s: JobStatus) -> JobStatus | None:
        if s.state is JobState.DONE:
            return None
        s.state, s.finished_at, s.image, s.step, s.error = JobState.DONE, time.time(), ref, job.total, None
        s.nsfw = nsfw
        return s

    status, _, applied = await jobstore.change_status_at(worker.status_kv, job_id, to_done, known=job.record)
    if not applied and status is not None:
        log.info("job %s try %d: another run finished it first", job_id, attempt)
        return
    total_s = time.monotonic() - gen_started
    timings = {"steps_s": steps_done - gen_started, "encode_s": encoded - steps_done, "total_s": total_s}
    await worker.events.publish(JobEvent(type="done", job_id=job_id, image=ref, timings=timings, worker=worker.worker_id))
    if job.batch == 1 and not job.parts:  # the speed model (queued jobs' ETAs) learns from one-pass jobs run alone
        worker.meter.record(mpx=request.pixels / 1e6, decode_s=timings["encode_s"], total_s=total_s, **job.stamps.timings(job.total, gen_started, steps_done))
    worker.jobs_done += 1


async def store_image(worker: Worker, job: RunningJob, data: bytes) -> api.ObjectInfo | None:
    """Stores the image's bytes under the job id: what was stored, or None when another run finished
    the job first. A full bucket fails the job (trying again cannot help until images expire).

    A broker that crashed can forget a delivery and hand the job to a second worker as a first try
    while the first still runs it: a run that finds the job done already stores nothing and keeps the
    first one's record and event. Two runs storing at the same moment both write the same request and
    seed under the job id; the record keeps the first `done`. The record is read only when an image is
    stored under the job id already."""
    job_id = job.envelope.job_id

    async def finished_elsewhere() -> bool:
        status, revision = await jobstore.read_status_at(worker.status_kv, job_id)
        job.remember(status, revision)
        return status is not None and status.state is JobState.DONE

    try:
        return await asyncio.wait_for(worker.image_store.put(job_id, data, finished_elsewhere=finished_elsewhere), timeout=30)
    except Exception as exc:
        if is_full(exc):  # not the broker away: trying again cannot help until images expire
            limit = worker.settings.topology.images_max_bytes
            raise JobFailed(f"{StoreFull(names.IMAGES_BUCKET, limit, MAX_BYTES_FLAG[names.IMAGES_BUCKET])} (this image: {len(data)} bytes)") from None
        raise


async def tell_done_again(worker: Worker, status: JobStatus | None) -> None:
    """A run that finds its job done publishes `done` again from the record: the run that finished
    it may have died before telling. The stream keeps one `done` per job (event_publisher)."""
    if status is not None and status.image is not None:
        await worker.events.publish(JobEvent(type="done", job_id=status.job_id, image=status.image, worker=status.worker))
