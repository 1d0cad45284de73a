"""The job a worker is handling, as a context variable, so that every log line written while it is
handled (on the event loop or in the GPU thread) can carry its id and try number."""

from __future__ import annotations

import contextvars
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass


@dataclass
class JobContext:
    job_id: str
    attempt: int
    duration_s: float | None = None  # set once the try has ended, for the lines that report it


current_job: contextvars.ContextVar[JobContext | None] = contextvars.ContextVar("imagegen_job", default=None)


class ContextThreadPool(ThreadPoolExecutor):
    """A thread pool whose calls run in the caller's context (`loop.run_in_executor` does not carry it)."""

    def submit(self, fn, /, *args, **kwargs):
        return super().submit(contextvars.copy_context().run, fn, *args, **kwargs)
