"""What the job service does with jobs once queued: read their records (from the queue view, else the
KV), wait for their end, tell their place and ETA, cancel, serve, delete and list them, and expire the
queued ones whose deadline passed. A mixin of `JobService`, which holds the connections and mirrors.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from typing import Iterable, Iterator

from nats.js.errors import NotFoundError, ObjectNotFoundError

from gateway.core.problems import NotReady, UnknownJob
from gateway.state.forecast import jobs_ahead
from schemas import jobstore, uploads
from schemas.events import JobEvent
from schemas.status import ImageRef, JobState, JobStatus

log = logging.getLogger("imagegen.gateway")

UNFINISHED = frozenset({JobState.QUEUED, JobState.RUNNING})


def listing_key(status: JobStatus) -> tuple[float, str]:
    """Where a job stands in a listing: by submit time, then id (two jobs may share a time)."""
    return (status.submitted_at, status.job_id)


class JobRecords:
    """The jobs once queued. Uses JobService's view, buckets, readers and `_event`/`_audit`."""

    async def expire_overdue(self) -> int:
        """Ends queued jobs whose deadline passed as `expired` and tells their followers."""
        now = time.time()
        queued = (self.view.jobs.get(job_id) for tier in self.view.queued.values() for _, job_id in tier)
        overdue = [s.job_id for s in queued if s is not None and s.state is JobState.QUEUED and s.deadline and s.deadline < now]
        ended = 0
        for job_id in overdue:
            def expire(s: JobStatus) -> JobStatus | None:
                if s.state is not JobState.QUEUED:
                    return None
                s.state, s.finished_at = JobState.EXPIRED, now
                s.error = f"expired: no worker started it within {s.deadline - s.submitted_at:.0f}s"
                return s

            status, revision, changed = await jobstore.change_status_at(self.status_kv, job_id, expire)
            if changed and status is not None:
                self.view.apply(status, revision)
                await self._event(JobEvent(type="expired", job_id=job_id, reason=status.error))
                await self._audit(status, "expired")
                ended += 1
        return ended

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                await self.expire_overdue()
            except Exception as exc:  # broker away: try again next round
                log.debug("expiry sweep skipped: %s", exc)

    async def get(self, job_id: str, *, owner: str | None = None) -> JobStatus:
        status = self.view.jobs.get(job_id)
        if status is None:
            status = await jobstore.read_status(self.status_kv, job_id) if _plausible(job_id) else None
        if status is None or status.deleted or (owner is not None and status.owner != owner):
            raise UnknownJob(job_id)
        return status

    async def wait_final(self, job_id: str, *, owner: str | None = None, wait_s: float) -> JobStatus:
        """The job's record once it is final, or as it is after `wait_s` seconds (a long poll): woken
        by the queue view, which watches every record, so waiting costs no read."""
        status = await self.get(job_id, owner=owner)
        if status.state.final or wait_s <= 0:
            return status
        ended = asyncio.get_running_loop().create_future()
        waiters = self.final_waiters.setdefault(job_id, set())
        waiters.add(ended)
        try:
            seen = self.view.jobs.get(job_id)  # its end may have come while its record was read
            if seen is None or not seen.state.final:
                await asyncio.wait((ended,), timeout=wait_s)
        finally:
            waiters.discard(ended)
            if not waiters and self.final_waiters.get(job_id) is waiters:
                del self.final_waiters[job_id]
        return await self.get(job_id, owner=owner)

    def _wake_final_waiters(self, old: JobStatus | None, status: JobStatus) -> None:
        if status.state.final:
            _wake(self.final_waiters.get(status.job_id, ()))

    def release_waiters(self) -> None:
        """Every wait answers now, with its job as it is (the gateway is stopping)."""
        for waiters in self.final_waiters.values():
            _wake(waiters)

    def position(self, status: JobStatus) -> int | None:
        """Jobs ahead in the queue: of those its workers take (its model's, when several are served)."""
        return self.model_views.of(status)[0].position(status) if status.state is JobState.QUEUED else None

    def eta(self, status: JobStatus) -> float | None:
        status = self.newest(status)
        return self.model_views.of(status)[1].forecast(status)

    def task_length(self, status: JobStatus) -> int:
        status = self.newest(status)
        return jobs_ahead(self.model_views.of(status)[0], status)

    def newest(self, status: JobStatus) -> JobStatus:
        """The job's record as far along as this gateway knows it: a submit is answered once the broker
        acked it, and an idle worker may have taken the job by then (its ETA is then the running job's,
        not its cost once more behind itself)."""
        held = self.view.jobs.get(status.job_id)
        return held if held is not None and _stage(held) > _stage(status) else status

    async def cancel(self, job_id: str, *, owner: str | None = None) -> JobStatus:
        await self.get(job_id, owner=owner)
        self.connected()
        status, revision = await jobstore.request_cancel(self.nc, self.status_kv, job_id)
        if status is None:
            raise UnknownJob(job_id)
        self.view.apply(status, revision)
        return status

    async def cancel_each(self, job_ids: list[str], *, owner: str | None = None) -> None:
        """Cancels each of the jobs (those already gone are passed over)."""
        for job_id in job_ids:
            try:
                await self.cancel(job_id, owner=owner)
            except UnknownJob:
                continue

    async def image(self, job_id: str, *, owner: str | None = None) -> tuple[JobStatus, bytes]:
        status = await self.get(job_id, owner=owner)
        if not status.state.final:  # the view trails the store: a client just told "done" may ask first
            self.connected()
            status = await jobstore.read_status(self.status_kv, job_id) or status
        if status.state is not JobState.DONE or status.image is None:
            raise NotReady(f"job {job_id} is {status.state.value}" + (f": {status.error}" if status.error else ""))
        self.connected()
        data = await self.fresh.get(job_id, status.image)
        if data is not None:
            return status, data
        try:
            data = await self._read_image(status.image)
        except (ObjectNotFoundError, NotFoundError):
            raise NotReady(f"the image of job {job_id} is no longer stored") from None
        return status, data

    async def _read_image(self, image: ImageRef) -> bytes:
        return await asyncio.wait_for(self._image_bytes(image), timeout=self.settings.nats_timeout_s * 6)

    async def _image_bytes(self, image: ImageRef) -> bytes:
        """Every chunk in one batched Direct Get, checked against the size: named by the record (as
        every worker writes it), else by the object's description read first."""
        if image.chunks_id:
            data = await self.image_reader.chunks(image.chunks_id, size=image.size)
            if data is not None:
                return data  # else the image was replaced since (a later try): its description says how
        return await self.image_reader.read(await self.image_reader.info(image.name))

    async def delete(self, job_id: str, *, owner: str | None = None) -> None:
        status = await self.get(job_id, owner=owner)
        self.connected()
        if not status.state.final:
            await self.cancel(job_id, owner=owner)

        def tombstone(s: JobStatus) -> JobStatus:
            # Kept, not deleted: a queued job's message may still be in the stream, and a worker that
            # found no record would take it for a job published straight onto NATS and run it.
            s.deleted, s.image = True, None
            return s

        self.fresh.drop(job_id)
        await self.cache.keep(status)
        await jobstore.change_status(self.status_kv, job_id, tombstone)
        if status.image is not None:
            try:
                await self.images.delete(status.image.name)
            except (ObjectNotFoundError, NotFoundError):
                pass
        await uploads.release(self.status_kv, self.uploads, status)
        self.view.forget(job_id)

    def list(self, *, owner: str | None = None) -> list[JobStatus]:
        """The jobs whose records are stored, oldest first. A job being submitted here is in the queue
        view before (its position and ETA count it); listed then, it would be one that a cancel, which
        reads the store, does not find yet."""
        return sorted(self._listed(owner), key=listing_key)

    def page(self, *, owner: str | None = None, states: frozenset[JobState] | None = None,
               before: tuple[float, str] | None = None, limit: int) -> list[JobStatus]:
        """Up to `limit` stored jobs, newest first: in `states` when given, submitted before the
        `before` key (a page's last job, by `listing_key`) when given."""
        found = (
            s for s in self._listed(owner, states)
            if (states is None or s.state in states) and (before is None or listing_key(s) < before)
        )
        return heapq.nlargest(limit, found, key=listing_key)

    def _listed(self, owner: str | None, states: frozenset[JobState] | None = None) -> Iterator[JobStatus]:
        """The stored records, the owner's when given; for unfinished states only, read from the view's
        queue and running set instead of every record it holds for the job TTL."""
        view = self.view
        if states is not None and states <= UNFINISHED:
            ids = itertools.chain(view.running, (job_id for queue in view.queued.values() for _, job_id in queue))
            records: Iterable[JobStatus] = (view.jobs[job_id] for job_id in ids if job_id in view.jobs)
        else:
            records = view.jobs.values()
        return (s for s in records if view.stored(s.job_id) and (owner is None or s.owner == owner))

    async def clear(self, *, owner: str | None = None) -> int:
        jobs = self.list(owner=owner)
        for status in jobs:
            try:
                await self.delete(status.job_id, owner=owner)
            except UnknownJob:
                pass
        return len(jobs)


def _wake(waiters) -> None:
    for ended in waiters:
        if not ended.done():
            ended.set_result(None)


def _plausible(job_id: str) -> bool:
    return 8 <= len(job_id) <= 64 and all(c.isalnum() or c in "-_" for c in job_id)


def _stage(status: JobStatus) -> int:
    """How far along a record is: queued, running, ended."""
    return 2 if status.state.final else int(status.state is JobState.RUNNING)
