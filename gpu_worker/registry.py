"""The worker registry's heartbeat: this worker's entry in KV `imagegen-workers` (its model, measured speed,
state), refreshed every period, and each job in hand kept alive (`in_progress()`) so it is never
redelivered while the worker lives.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from gpu_worker.hold_check import note_holder
from gpu_worker.running_job import RunningJob
from schemas import jobstore
from schemas.codec import encode
from schemas.version import __version__
from schemas.workers import WorkerInfo

if TYPE_CHECKING:
    from gpu_worker.worker import Worker

log = logging.getLogger("imagegen.worker")


def paused_hot(worker: Worker) -> bool:
    return worker.thermal is not None and worker.thermal.paused and worker.current is None


def state(worker: Worker) -> str:
    if worker.current:
        return "busy"
    if worker.stopping.is_set():
        return "draining"
    return "paused-hot" if paused_hot(worker) else "idle"


def worker_info(worker: Worker) -> WorkerInfo:
    """This worker's entry: what it serves, how fast, and what it is doing."""
    engine, current = worker.engine, worker.current
    return WorkerInfo(
        worker_id=worker.worker_id,
        model=engine.name,
        default_steps=engine.default_steps,
        default_guidance=engine.default_guidance,
        has_refiner=engine.has_refiner,
        device=engine.device,
        state=state(worker),
        job_id=current.envelope.job_id if current else None,
        jobs_done=worker.jobs_done,
        paused_hot=paused_hot(worker),
        gpu_temp_c=worker.thermal.last_c if worker.thermal else None,
        speed=worker.meter.model,
        fairness=worker.settings.fairness,
        version=__version__,
        loras=list(engine.lora_names),
        controlnets=list(getattr(engine, "controlnet_names", ())),
        model_sha256=getattr(engine, "model_sha256", None),
    )


async def register(worker: Worker) -> None:
    """Puts this worker's entry (its model, speed, state) in KV `imagegen-workers`."""
    await worker.workers_kv.put(worker.worker_id, encode(worker_info(worker)))


def heartbeat_period(worker: Worker) -> float:
    """Often enough that a job in hand is never redelivered while this worker is alive."""
    return min(worker.settings.heartbeat_s, worker.settings.topology.ack_wait_s / 3)


async def beat(worker: Worker) -> None:
    """Every period: keeps each job in hand alive (`in_progress()`, its cancel flag, who holds it) and
    refreshes this worker's entry."""
    period = heartbeat_period(worker)
    while True:
        await asyncio.sleep(period)
        try:
            for job in list(worker.running.values()):
                await keep_alive(worker, job)
            await register(worker)
        except Exception as exc:  # broker away: keep going, the next beat retries
            log.warning("worker %s heartbeat failed: %s", worker.worker_id, exc)


async def keep_alive(worker: Worker, job: RunningJob) -> None:
    await job.msg.in_progress()
    status = await jobstore.read_status(worker.status_kv, job.envelope.job_id)
    if status is not None and status.cancel_requested:
        job.cancel.set()
    note_holder(worker, job, status)
