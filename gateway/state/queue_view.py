"""Every job record and live worker, kept in memory by watching the KV buckets.

The view is a cache of JetStream, rebuilt on start and kept current by KV watchers, so any number of
gateways agree and a restart loses nothing. It answers positions and forecasts without a KV read per
poll. A watcher that fails (say, across a broker restart) is recreated.
"""

from __future__ import annotations

import asyncio
import bisect
from collections import deque
import logging
import time
from typing import Callable

import nats.errors
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from schemas.take_order import TakeCounts
from schemas.codec import DecodeError, decode
from schemas.names import TIERS, Tier
from schemas.status import JobState, JobStatus
from schemas.workers import DEFAULT_FAIRNESS, WorkerInfo

log = logging.getLogger("imagegen.gateway.view")


class QueueView:
    def __init__(self, *, worker_ttl_s: float):
        self.worker_ttl_s = worker_ttl_s
        self.jobs: dict[str, JobStatus] = {}
        self.revisions: dict[str, int] = {}
        self.queued: dict[Tier, list[tuple[float, str]]] = {tier: [] for tier in TIERS}
        self.running: set[str] = set()
        self.arrivals: dict[Tier, deque[tuple[float, JobStatus]]] = {tier: deque(maxlen=4096) for tier in TIERS}
        self.workers: dict[str, WorkerInfo] = {}
        self.takes = TakeCounts()  # each worker's fairness count, from the jobs it marks running
        self.version = 0  # goes up on every change, so answers derived from the view can be cached
        self.unfinished: dict[str, int] = {}  # owner -> jobs not final yet, for quotas without a scan
        self.ready = asyncio.Event()
        self.listeners: list[Callable[[JobStatus | None, JobStatus], None]] = []  # (old, new), per record taken
        self.forgotten: list[Callable[[JobStatus], None]] = []  # each record dropped (deleted, purged)
        self._tasks: list[asyncio.Task] = []
        self._watches: list[tuple] = []

    # -- applying records ---------------------------------------------------------------------

    def apply(self, status: JobStatus, revision: int) -> None:
        """Takes a record at a KV revision; an older revision than the one held is ignored, so the
        gateway's own write cannot overtake a worker's newer one that the watcher brought first."""
        if revision < self.revisions.get(status.job_id, 0):
            return
        self.version += 1
        old = self.jobs.get(status.job_id)
        if old is None and status.job_id not in self.revisions:
            self.arrivals[status.tier].append((status.submitted_at, status))
        self.revisions[status.job_id] = revision
        if old is not None:
            self._unindex(old)
        self.jobs[status.job_id] = status
        if status.owner is not None and not status.state.final:
            self.unfinished[status.owner] = self.unfinished.get(status.owner, 0) + 1
        if status.state is JobState.QUEUED:
            bisect.insort(self.queued[status.tier], (status.submitted_at, status.job_id))
        elif status.state is JobState.RUNNING:
            self.running.add(status.job_id)
        self._count_take(old, status)
        for listener in self.listeners:
            listener(old, status)

    def _count_take(self, old: JobStatus | None, new: JobStatus) -> None:
        """Keeps each worker's fairness count (schemas.take_order) from the records: a job marked running
        is a take; a job that ends while nothing is queued leaves its worker without work."""
        if new.state is JobState.RUNNING and new.worker:
            if old is None or old.state is not JobState.RUNNING or old.attempt != new.attempt:
                worker = self.workers.get(new.worker)
                self.takes.taken(
                    new.worker, new.tier,
                    lower_waiting=any(self.queued[tier] for tier in TIERS[new.tier.rank + 1 :]),
                    fairness=worker.fairness if worker is not None else DEFAULT_FAIRNESS,
                )
        elif new.state.final and old is not None and old.state is JobState.RUNNING and old.worker:
            if not any(self.queued.values()):
                self.takes.idle(old.worker)

    def confirm(self, status: JobStatus, revision: int) -> None:
        """The KV revision of a record this gateway wrote and applied already (at revision 0): noted
        without applying it again, unless the watcher brought that record or a newer one meanwhile."""
        if self.jobs.get(status.job_id) is status and self.revisions.get(status.job_id, 0) < revision:
            self.revisions[status.job_id] = revision

    def stored(self, job_id: str) -> bool:
        """Whether the view holds the job's record at a KV revision: a job this gateway noted (at
        revision 0) while sending it is not stored until its record comes back or its write is acked."""
        return bool(self.revisions.get(job_id))

    def forget(self, job_id: str) -> None:
        self.version += 1
        self.revisions.pop(job_id, None)
        old = self.jobs.pop(job_id, None)
        if old is not None:
            self._unindex(old)
            for listener in self.forgotten:
                listener(old)

    def _unindex(self, status: JobStatus) -> None:
        if status.owner is not None and not status.state.final:
            left = self.unfinished.get(status.owner, 0) - 1
            if left > 0:
                self.unfinished[status.owner] = left
            else:
                self.unfinished.pop(status.owner, None)
        if status.state is JobState.QUEUED:
            queue = self.queued[status.tier]
            i = bisect.bisect_left(queue, (status.submitted_at, status.job_id))
            if i < len(queue) and queue[i][1] == status.job_id:
                del queue[i]
        self.running.discard(status.job_id)

    # -- questions ----------------------------------------------------------------------------

    def position(self, status: JobStatus) -> int:
        n = 0
        for tier in TIERS:
            queue = self.queued[tier]
            if tier is status.tier:
                return n + bisect.bisect_left(queue, (status.submitted_at, status.job_id))
            n += len(queue)
        return n

    def queue_depth(self) -> dict[str, int]:
        return {tier.value: len(self.queued[tier]) for tier in TIERS}

    def recent_arrivals(self, tier: Tier, *, since: float) -> list[JobStatus]:
        return [status for at, status in self.arrivals[tier] if at >= since]

    def live_workers(self) -> list[WorkerInfo]:
        now = time.time()
        return [w for w in self.workers.values() if now - w.seen_at < self.worker_ttl_s]

    # -- watching -----------------------------------------------------------------------------

    def start(self, status_kv: KeyValue, workers_kv: KeyValue) -> None:
        jobs_ready, workers_ready = asyncio.Event(), asyncio.Event()
        self._watches = [(status_kv, self._on_job, jobs_ready), (workers_kv, self._on_worker, workers_ready)]
        self._tasks = [asyncio.create_task(self._watch(*watch)) for watch in self._watches]

        async def both_ready() -> None:
            await jobs_ready.wait()
            await workers_ready.wait()
            self.ready.set()

        self._tasks.append(asyncio.create_task(both_ready()))

    def watch_also(self, kv: KeyValue, on_entry) -> asyncio.Event:
        """Watches another bucket as these two are watched, recreated with them on reconnect:
        `on_entry(key, value or None when deleted, revision)`. The event is set once it has caught up."""
        ready = asyncio.Event()
        watch = (kv, on_entry, ready)
        self._watches.append(watch)
        self._tasks.insert(len(self._watches) - 1, asyncio.create_task(self._watch(*watch)))
        return ready

    def rewatch(self) -> None:
        """Recreates the KV watchers. Called on reconnect: a watcher's ordered consumer does not fail
        when the broker restarts, it stalls (until two heartbeats are missed) while the view goes stale."""
        for task in self._tasks[: len(self._watches)]:
            task.cancel()
        self._tasks[: len(self._watches)] = [asyncio.create_task(self._watch(*watch)) for watch in self._watches]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _on_job(self, key: str, value: bytes | None, revision: int) -> None:
        if value is None:
            self.forget(key)
            return
        if revision <= self.revisions.get(key, 0):  # held already: this gateway's own write, come back
            return
        try:
            status = decode(value, JobStatus)
            if status.deleted:
                self.forget(key)
                self.revisions[key] = revision  # an older record arriving late must not bring it back
            else:
                self.apply(status, revision)
        except DecodeError as exc:
            log.warning("job record %s unreadable: %s", key, exc)

    def _on_worker(self, key: str, value: bytes | None, revision: int) -> None:
        self.version += 1
        if value is None:
            self.workers.pop(key, None)
            return
        try:
            self.workers[key] = decode(value, WorkerInfo)
        except DecodeError as exc:
            log.warning("worker record %s unreadable: %s", key, exc)

    async def _watch(self, kv: KeyValue, on_entry, ready: asyncio.Event) -> None:
        while True:
            watcher = None
            try:
                watcher = await kv.watchall()
                while True:
                    if asyncio.current_task().cancelling():  # a stop that the timed wait below swallowed
                        raise asyncio.CancelledError
                    try:
                        entry = await watcher.updates(timeout=30)
                    except nats.errors.TimeoutError:  # idle
                        continue
                    if entry is None:
                        ready.set()
                        continue
                    deleted = entry.operation in (KV_DEL, KV_PURGE)
                    on_entry(entry.key, None if deleted else entry.value, entry.revision)
            except asyncio.CancelledError:
                if watcher is not None:
                    try:
                        await watcher.stop()
                    except Exception:
                        pass
                raise
            except Exception as exc:
                log.warning("kv watch on %s failed (%s); recreating", kv._name, exc)
                await asyncio.sleep(0.5)
