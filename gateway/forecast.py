"""When will a job be done? A list-scheduling forecast over the live workers' measured speeds.

Each live worker is free after its running job's remaining time; the queued jobs ahead (higher tiers
first, then older ones of the same tier) go one by one to whichever worker is free first, each costing
what that worker's speed model says for its size, steps and refiner. The job's ETA is when it would
end in that schedule, its wait stretched by the higher-tier work expected to arrive meanwhile. Unlike
a pixels-only average, this counts steps, size, refiner, priority tiers and workers.
"""

from __future__ import annotations

import heapq
import time

from gateway.queue_view import QueueView
from schemas.names import TIERS
from schemas.status import JobState, JobStatus
from schemas.workers import SpeedModel, WorkerInfo

ARRIVAL_WINDOW_S = 60.0
MAX_LOAD = 0.8
FALLBACK = WorkerInfo(worker_id="none", model="", default_steps=30, default_guidance=5.0)


def job_cost(status: JobStatus, worker: WorkerInfo, speed: SpeedModel | None = None) -> float:
    request = status.request
    steps = request.get("steps") or worker.default_steps
    refiner_steps = steps - int(steps * 0.8) if request.get("use_refiner") else 0
    return (speed or worker.speed).estimate(
        width=request.get("width", 1024),
        height=request.get("height", 1024),
        steps=steps - refiner_steps,
        refiner_steps=refiner_steps,
    )


def remaining(status: JobStatus, worker: WorkerInfo, now: float) -> float:
    """Seconds left for a running job: from its measured step rate once the worker reported one,
    else from the worker's speed model."""
    if status.step_s is not None and status.step_at is not None and status.total_steps:
        request = status.request
        mpx = request.get("width", 1024) * request.get("height", 1024) / 1e6
        left = (status.total_steps - status.step) * status.step_s - (now - status.step_at)
        return max(0.0, left) + worker.speed.decode_s_per_mpx * mpx
    elapsed = max(0.0, now - status.started_at) if status.started_at is not None else 0.0
    return max(0.0, job_cost(status, worker) - elapsed)


def forecast(view: QueueView, status: JobStatus, *, now: float | None = None) -> float | None:
    """Seconds until `status`'s job is expected done; None once it is final."""
    if status.state.final:
        return None
    now = time.time() if now is None else now
    workers = view.live_workers() or [_last_known(view)]
    by_id = {w.worker_id: w for w in workers}
    if status.state is JobState.RUNNING:
        return remaining(status, by_id.get(status.worker or "", workers[0]), now)
    free: list[tuple[float, int]] = []
    busy = {w.job_id: w for w in workers if w.job_id}
    for i, worker in enumerate(workers):
        running = view.jobs.get(worker.job_id or "")
        left = remaining(running, worker, now) if running and running.state is JobState.RUNNING else 0.0
        free.append((left, i))
    heapq.heapify(free)
    for job_id in view.running - busy.keys():  # running on a worker whose record is late
        running = view.jobs.get(job_id)
        if running is not None:
            t, i = heapq.heappop(free)
            heapq.heappush(free, (t + remaining(running, workers[i], now), i))
    for job_id in view.queued_ahead(status):
        ahead = view.jobs.get(job_id)
        if ahead is None:
            continue
        t, i = heapq.heappop(free)
        heapq.heappush(free, (t + job_cost(ahead, workers[i]), i))
    t, i = heapq.heappop(free)
    return t / (1.0 - higher_tier_load(view, status, workers, now)) + job_cost(status, workers[i])


def higher_tier_load(view: QueueView, status: JobStatus, workers: list[WorkerInfo], now: float) -> float:
    """The share of the pool that higher-tier work arriving from now on will take (from the last
    minute's arrivals): a job waits W for the work ahead of it now, plus the higher-tier work that
    arrives meanwhile and goes first, so its wait stretches to W / (1 - load)."""
    since = now - ARRIVAL_WINDOW_S
    work = 0.0
    for tier in TIERS[: status.tier.rank]:
        work += sum(job_cost(s, workers[0]) for s in view.recent_arrivals(tier, since=since))
    return min(MAX_LOAD, work / ARRIVAL_WINDOW_S / len(workers))


def _last_known(view: QueueView) -> WorkerInfo:
    if view.workers:
        return max(view.workers.values(), key=lambda w: w.seen_at)
    return FALLBACK


def jobs_ahead(view: QueueView, status: JobStatus) -> int:
    """mflux-server's task_length: running jobs plus queued jobs ahead, plus the job itself."""
    if status.state is JobState.RUNNING:
        return 1
    if status.state.final:
        return 0
    return len(view.running) + view.position(status) + 1
