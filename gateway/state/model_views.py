"""One model's part of the queue, for positions and ETAs when the live workers serve several models.

A job naming a model goes to that model's lane, which only its workers read (schemas.names.jobs_subject),
so the jobs ahead of it are the ones naming the same model, and the workers that will run them are
that model's. A `ModelView` answers what the forecast asks of a `QueueView` (queued jobs by tier,
running jobs, live workers, recent arrivals, positions) for one model's jobs and workers, indexed from
the whole view's changes as they come. Jobs naming no model, which any worker may take, are
answered from the whole view.
"""

from __future__ import annotations

import bisect
import time
from typing import Callable

from gateway.state.forecast import EtaCache
from gateway.state.queue_view import QueueView
from schemas.names import TIERS, Tier
from schemas.status import JobState, JobStatus
from schemas.workers import WorkerInfo

MAX_MODELS = 64  # per-model views kept at once
SEVERAL_MAX_AGE_S = 0.5  # a worker of a new model counts within this (a lost one leaves after the worker TTL anyway)


def model_of(status: JobStatus) -> str | None:
    model = status.request.get("model") if status.request else None
    return model if isinstance(model, str) else None


class ModelView:
    """Keeps its model's queued and running jobs from the view's changes as they come (built once from
    the whole view), so a position or an ETA read costs what it does on the whole view."""

    def __init__(self, view: QueueView, model: str):
        self.view = view
        self.model = model
        self.queued: dict[Tier, list[tuple[float, str]]] = {tier: [] for tier in TIERS}
        self.running: set[str] = set()
        for status in view.jobs.values():
            self._index(status)
        view.listeners.append(self._on_change)
        view.forgotten.append(self._on_forget)

    def close(self) -> None:
        """Stops following the view."""
        self.view.listeners.remove(self._on_change)
        self.view.forgotten.remove(self._on_forget)

    def _on_change(self, old: JobStatus | None, new: JobStatus) -> None:
        if old is not None:
            self._unindex(old)
        self._index(new)

    def _on_forget(self, old: JobStatus) -> None:
        self._unindex(old)

    def _index(self, status: JobStatus) -> None:
        if model_of(status) != self.model:
            return
        if status.state is JobState.QUEUED:
            bisect.insort(self.queued[status.tier], (status.submitted_at, status.job_id))
        elif status.state is JobState.RUNNING:
            self.running.add(status.job_id)

    def _unindex(self, status: JobStatus) -> None:
        if model_of(status) != self.model:
            return
        queue = self.queued[status.tier]
        i = bisect.bisect_left(queue, (status.submitted_at, status.job_id))
        if i < len(queue) and queue[i][1] == status.job_id:
            del queue[i]
        self.running.discard(status.job_id)

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
    def workers(self) -> dict[str, WorkerInfo]:
        return {k: w for k, w in self.view.workers.items() if w.model == self.model}

    def live_workers(self) -> list[WorkerInfo]:
        return [w for w in self.view.live_workers() if w.model == self.model]

    def recent_arrivals(self, tier: Tier, *, since: float) -> list[JobStatus]:
        return [s for s in self.view.recent_arrivals(tier, since=since) if model_of(s) == self.model]

    def position(self, status: JobStatus) -> int:
        n = 0
        for tier in TIERS:
            if tier is status.tier:
                return n + bisect.bisect_left(self.queued[tier], (status.submitted_at, status.job_id))
            n += len(self.queued[tier])
        return n


class ModelViews:
    """The view and ETA cache a job's position and ETA come from: its model's, while the live workers
    serve more than one model and the job names one; else the whole view's."""

    def __init__(self, view: QueueView, etas: EtaCache, *, cache: Callable[[ModelView], EtaCache] = EtaCache):
        self.view = view
        self.etas = etas
        self.cache = cache
        self.by_model: dict[str, tuple[ModelView, EtaCache]] = {}
        self._several: tuple[float, bool] = (float("-inf"), False)  # (when read, monotonic; the answer)

    def several(self) -> bool:
        """Whether the live workers serve more than one model: read from the registry at most every
        SEVERAL_MAX_AGE_S (a status read asks it for its position and its ETA, a page of jobs for each)."""
        read_at, answer = self._several
        now = time.monotonic()
        if now - read_at >= SEVERAL_MAX_AGE_S:
            answer = len({w.model for w in self.view.live_workers()}) > 1
            self._several = (now, answer)
        return answer

    def of(self, status: JobStatus) -> tuple[QueueView | ModelView, EtaCache]:
        model = model_of(status)
        if model is None or not self.several():
            return self.view, self.etas
        found = self.by_model.get(model)
        if found is None:
            if len(self.by_model) >= MAX_MODELS:  # names in jobs published straight onto NATS are not checked
                for sub, _ in self.by_model.values():
                    sub.close()
                self.by_model.clear()
            sub = ModelView(self.view, model)
            found = self.by_model[model] = (sub, self.cache(sub))
        return found
