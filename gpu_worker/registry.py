"""The worker registry's heartbeat: this worker's entry in KV `imagegen-workers` (its model, measured speed,
state), refreshed every period, and each job in hand kept alive (`in_progress()`) so it is never
redelivered while the worker lives.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from schemas import jobstore
from schemas.codec import encode

if TYPE_CHECKING:
    from gpu_worker.worker import RunningJob, Worker

log = logging.getLogger("imagegen.worker")


async def register(worker: Worker) -> None:
    """Puts this worker's entry (its model, speed, state) in KV `imagegen-workers`."""
    await worker.workers_kv.put(worker.worker_id, encode(worker.info()))


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
    worker._note_holder(job, status)
