"""A job's record read on its bell: a free worker reads the record of a job just published alongside
the pull that takes it, instead of after; when another worker takes the job, the read is dropped."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from nats.aio.msg import Msg
from nats.js.kv import KeyValue

from schemas import jobstore, names
from schemas.status import JobStatus

log = logging.getLogger("imagegen.worker")


class RecordPrefetch:
    def __init__(self, status_kv: KeyValue, *, paused: Callable[[], bool]):
        self.status_kv = status_kv
        self.paused = paused  # the worker takes no job now (too hot): nothing is read ahead
        self.waiting = False  # the worker is in the puller, free for the next job
        self.pending: tuple[str, asyncio.Task] | None = None  # a job's record, read on its bell

    def on_bell(self, msg: Msg) -> None:
        """A job was published: a free worker starts reading its record."""
        job_id = (msg.headers or {}).get(names.MSG_ID_HEADER)
        if not self.waiting or not job_id or self.paused():
            return
        if self.pending is not None:
            self.pending[1].cancel()
        read = asyncio.ensure_future(jobstore.read_status_at(self.status_kv, job_id))
        read.add_done_callback(lambda task: task.cancelled() or task.exception())  # failures: read again
        self.pending = (job_id, read)

    async def read_status(self, job_id: str) -> tuple[JobStatus | None, int]:
        """The job's record and its revision: the one read on its bell, or read now."""
        pending, self.pending = self.pending, None
        if pending is not None:
            if pending[0] == job_id:
                try:
                    return await pending[1]
                except Exception as exc:  # read it again, below
                    log.debug("job %s record read on its bell failed: %s", job_id, exc)
            else:
                pending[1].cancel()
        return await jobstore.read_status_at(self.status_kv, job_id)
