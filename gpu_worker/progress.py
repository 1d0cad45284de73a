"""What each step of a run tells: a `progress` event with its ETA, a preview every few steps (none
while the safety check is on: no unchecked pixels leave), and now and then the step written to the
job's record. The step hook is also where a run stops: cancelled, or its job held by another try."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from gpu_worker.errors import JobCancelled
from gpu_worker.hold_check import check_hold_from_gpu
from gpu_worker.preview import latent_preview
from gpu_worker.running_job import RunningJob
from schemas import jobstore
from schemas.events import JobEvent
from schemas.status import JobState, JobStatus

if TYPE_CHECKING:
    from gpu_worker.worker import Worker

log = logging.getLogger("imagegen.worker")


def step_callback(worker: Worker, job: RunningJob):
    """The engine's hook at each step, called in the GPU thread."""
    loop = worker.loop
    every = 0 if worker.safety is not None else worker.settings.preview_every  # no unchecked pixels leave

    def on_step(step: int, total: int, latents: Any) -> None:
        check_hold_from_gpu(worker, job)
        if job.cancel.is_set():
            raise JobCancelled()
        now = time.monotonic()
        job.stamps.stamp(step, total, now)
        loop.call_soon_threadsafe(progress, worker, job, step, total, now, time.time())
        if every and latents is not None and step % every == 0 and step < total:
            preview = latent_preview(latents)
            if preview is not None:
                event = JobEvent(type="preview", job_id=job.envelope.job_id, step=step, total=total, preview=preview)
                loop.call_soon_threadsafe(lambda: asyncio.ensure_future(worker.events.publish(event)))

    return on_step


def progress(worker: Worker, job: RunningJob, step: int, total: int, now: float, ts: float) -> None:
    """On the loop, for a step that ended at monotonic `now` and wall-clock `ts` (stamped in the GPU
    thread, so the event's time is the step's, before any preview built after it)."""
    job.step, job.total = step, total
    elapsed = now - job.started
    request = job.envelope.request
    speed, refiner, first = worker.meter.model, job.stamps.refiner_steps, job.stamps.first
    if job.parts:  # a plan: each stage costed at its own size, scaled by the first stage's measured steps
        first_steps, first_mpx, _ = job.parts[0]
        if 1 < step <= first_steps and first:
            job.base_step_s = (now - first) / (step - 1)
        modelled = speed.step_s + speed.step_s_per_mpx * first_mpx
        scale = job.base_step_s / modelled if job.base_step_s and modelled > 0 else 1.0
        eta = speed.plan_left_s(job.parts, step=step, final_mpx=job.final_mpx, scale=scale)
        if not job.base_step_s:
            eta = max(0.0, speed.plan_left_s(job.parts, step=0, final_mpx=job.final_mpx) - elapsed)
        asyncio.ensure_future(worker.events.publish(JobEvent(
            type="progress", job_id=job.envelope.job_id, ts=ts, step=step, total=total, elapsed_s=elapsed, eta_s=eta
        )))
        if now - job.last_status_write >= worker.settings.progress_write_s and step < total:
            job.last_status_write = now
            asyncio.ensure_future(write_step(worker, job, step, job.base_step_s))
        return
    if 1 < step <= total - refiner and first:  # the base's steps so far tell its step time
        job.base_step_s = (now - first) / (step - 1)
    step_s = job.base_step_s
    if step_s is not None:
        eta = speed.left_s(step=step, total=total, refiner_steps=refiner, step_s=step_s, mpx=request.pixels / 1e6)
    else:
        cost = speed.estimate(width=request.width, height=request.height, steps=total - refiner, refiner_steps=refiner)
        eta = max(0.0, cost - elapsed)
    event = JobEvent(
        type="progress", job_id=job.envelope.job_id, ts=ts, step=step, total=total, elapsed_s=elapsed, eta_s=eta
    )
    asyncio.ensure_future(worker.events.publish(event))
    if now - job.last_status_write >= worker.settings.progress_write_s and step < total:
        job.last_status_write = now
        asyncio.ensure_future(write_step(worker, job, step, step_s))


async def write_step(worker: Worker, job: RunningJob, step: int, step_s: float | None) -> None:
    """Writes the step to the record, over this try's running mark; skipped when another try or a
    later step got there first."""
    job_id = job.envelope.job_id
    step_at = time.time()
    if job.marking is not None:  # the step goes over the running mark, not beside it
        await asyncio.gather(job.marking, return_exceptions=True)

    def set_step(s: JobStatus) -> JobStatus | None:
        if s.state is not JobState.RUNNING or s.step >= step or (s.attempt, s.worker) != (job.attempt, worker.worker_id):
            return None
        s.step, s.step_s, s.step_at = step, step_s, step_at
        return s

    try:
        status, revision, _ = await jobstore.change_status_at(worker.status_kv, job_id, set_step, known=job.record)
        job.remember(status, revision)
    except Exception as exc:
        log.debug("job %s step write skipped: %s", job_id, exc)
