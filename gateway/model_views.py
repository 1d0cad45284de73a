"""One model's part of the queue, for positions and ETAs when the live workers serve several models.

A job naming a model goes to that model's lane, which only its workers read (schemas.names.jobs_subject),
so the jobs ahead of it are the ones naming the same model, and the workers that will run them are
that model's. A `ModelView` answers what the forecast asks of a `QueueView` (queued jobs by tier,
running jobs, live workers, recent arrivals, positions) for one model's jobs and workers, filtered from
the whole view and rebuilt when it changes. Jobs naming no model, which any worker may take, are
answered from the whole view.
"""

from __future__ import annotations

import bisect
from typing import Callable

from gateway.forecast import EtaCache
from gateway.queue_view import QueueView
from schemas.names import TIERS, Tier
from schemas.status import JobStatus
from schemas.workers import WorkerInfo

MAX_MODELS = 64  # per-model views kept at once


def model_of(status: JobStatus) -> str | None:
    return status.request.get("model") if status.request else None


class ModelView:
    def __init__(self, view: QueueView, model: str):
        self.view = view
        self.model = model
        self.built = -1
        self._queued: dict[Tier, list[tuple[float, str]]] = {tier: [] for tier in TIERS}
        self._running: set[str] = set()

    def _sync(self) -> None:
        if self.built == self.view.version:
            return
        jobs, mine = self.view.jobs, self._mine
        self._queued = {tier: [key for key in self.view.queued[tier] if mine(jobs.get(key[1]))] for tier in TIERS}
        self._running = {job_id for job_id in self.view.running if mine(jobs.get(job_id))}
        self.built = self.view.version

    def _mine(self, status: JobStatus | None) -> bool:
        return status is not None and model_of(status) == self.model

    @property
    def version(self) -> int:
        return self.view.version

    @property
    def jobs(self) -> dict[str, JobStatus]:
        return self.view.jobs

    @property
    def takes(self):
        return self.view.takes

    @property
    def queued(self) -> dict[Tier, list[tuple[float, str]]]:
        self._sync()
        return self._queued

    @property
    def running(self) -> set[str]:
        self._sync()
        return self._running

    @property
    def workers(self) -> dict[str, WorkerInfo]:
        return {k: w for k, w in self.view.workers.items() if w.model == self.model}

    def live_workers(self) -> list[WorkerInfo]:
        return [w for w in self.view.live_workers() if w.model == self.model]

    def recent_arrivals(self, tier: Tier, *, since: float) -> list[JobStatus]:
        return [s for s in self.view.recent_arrivals(tier, since=since) if model_of(s) == self.model]

    def position(self, status: JobStatus) -> int:
        queued = self.queued
        n = 0
        for tier in TIERS:
            if tier is status.tier:
                return n + bisect.bisect_left(queued[tier], (status.submitted_at, status.job_id))
            n += len(queued[tier])
        return n


class ModelViews:
    """The view and ETA cache a job's position and ETA come from: its model's, while the live workers
    serve more than one model and the job names one; else the whole view's."""

    def __init__(self, view: QueueView, etas: EtaCache, *, cache: Callable[[ModelView], EtaCache] = EtaCache):
        self.view = view
        self.etas = etas
        self.cache = cache
        self.by_model: dict[str, tuple[ModelView, EtaCache]] = {}

    def of(self, status: JobStatus) -> tuple[QueueView | ModelView, EtaCache]:
        model = model_of(status)
        if model is None or len({w.model for w in self.view.live_workers()}) <= 1:
            return self.view, self.etas
        found = self.by_model.get(model)
        if found is None:
            if len(self.by_model) >= MAX_MODELS:  # names in jobs published straight onto NATS are not checked
                self.by_model.clear()
            sub = ModelView(self.view, model)
            found = self.by_model[model] = (sub, self.cache(sub))
        return found
