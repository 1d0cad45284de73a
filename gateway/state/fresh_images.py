"""Images of the jobs this gateway queued, read from the object store as soon as the queue view sees
each job done, so that the client's fetch, which follows its `done`, is answered without the two
Direct Gets it would wait for otherwise.

An entry holds the bytes the object store had once the job was done (read as `JobService` reads any
image: size checked), for the job's image as its record names it. Entries are bounded in
number, bytes and age, and dropped when their job is deleted; a fetch that finds no entry, or one
whose read failed, reads the store as before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Awaitable, Callable

from schemas.status import ImageRef, JobState, JobStatus

log = logging.getLogger("imagegen.gateway.images")


class FreshImages:
    def __init__(
        self,
        read: Callable[[ImageRef], Awaitable[bytes]],
        *,
        max_images: int = 256,
        max_bytes: int = 32 * 1024 * 1024,
        keep_s: float = 30.0,
        max_waiting: int = 10_000,
    ):
        self.read = read  # an image's bytes
        self.max_images = max_images
        self.max_bytes = max_bytes
        self.keep_s = keep_s
        self.max_waiting = max_waiting
        self.waiting: OrderedDict[str, None] = OrderedDict()  # jobs queued here, not final yet
        self.held: OrderedDict[str, tuple[ImageRef, asyncio.Future, float]] = OrderedDict()  # job id -> read
        self.bytes = 0

    def want(self, job_id: str) -> None:
        """Reads the image of this job once it is done."""
        self.waiting[job_id] = None
        while len(self.waiting) > self.max_waiting:  # jobs whose end this gateway never saw
            self.waiting.popitem(last=False)

    def on_change(self, old: JobStatus | None, status: JobStatus) -> None:
        """A queue view listener: starts the read when a job queued here is done."""
        if not status.state.final or status.job_id not in self.waiting:
            return
        del self.waiting[status.job_id]
        if status.state is JobState.DONE and status.image is not None and self.max_images > 0:
            read = asyncio.ensure_future(self.read(status.image))
            self.held[status.job_id] = (status.image, read, time.monotonic())
            read.add_done_callback(lambda done, job_id=status.job_id: self._read_done(job_id, done))
            self._trim()

    def _read_done(self, job_id: str, read: asyncio.Future) -> None:
        if read.cancelled() or read.exception() is not None:
            if job_id in self.held and self.held[job_id][1] is read:
                del self.held[job_id]
            return
        if job_id in self.held and self.held[job_id][1] is read:
            self.bytes += len(read.result())
            self._trim()

    def _trim(self) -> None:
        now = time.monotonic()
        while self.held:
            job_id, (_, read, at) = next(iter(self.held.items()))
            if len(self.held) <= self.max_images and self.bytes <= self.max_bytes and now - at < self.keep_s:
                break
            self.drop(job_id)

    def drop(self, job_id: str) -> None:
        held = self.held.pop(job_id, None)
        self.waiting.pop(job_id, None)
        if held is None:
            return
        _, read, _ = held
        if read.done():
            if not read.cancelled() and read.exception() is None:
                self.bytes -= len(read.result())
        else:
            read.cancel()

    def close(self) -> None:
        for job_id in list(self.held):
            self.drop(job_id)
        self.waiting.clear()

    async def get(self, job_id: str, image: ImageRef) -> bytes | None:
        """The bytes of this job's image when held (waiting for a read under way); None otherwise."""
        held = self.held.get(job_id)
        if held is None:
            return None
        ref, read, at = held
        if ref.name != image.name or ref.size != image.size or time.monotonic() - at >= self.keep_s:
            self.drop(job_id)
            return None
        try:
            return await asyncio.shield(read)
        except asyncio.CancelledError:
            if read.cancelled():  # dropped meanwhile, not this caller cancelled
                return None
            raise
        except Exception as exc:  # the caller reads the store itself
            log.debug("job %s image read on done failed: %s", job_id, exc, extra={"job_id": job_id})
            return None
