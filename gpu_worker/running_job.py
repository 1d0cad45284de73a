"""A job in a worker's hands: its message, its try, its cancel flag, and what its run has measured
and written so far (steps, the record's revision, whether another try took it over)."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

from nats.aio.msg import Msg

from gpu_worker.speed import StepStamps
from schemas.job import JobEnvelope
from schemas.status import JobStatus


@dataclass
class RunningJob:
    envelope: JobEnvelope
    msg: Msg
    attempt: int
    cancel: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.monotonic)
    stamps: StepStamps = field(default_factory=StepStamps)
    base_step_s: float | None = None  # a base step's seconds, as measured on this job
    last_status_write: float = 0.0
    step: int = 0
    total: int = 0
    record: tuple[JobStatus, int] | None = None  # the status record as last read or written, and its revision
    marking: asyncio.Future | None = None  # the write that marks the job running, while it is under way
    parts: list[tuple[int, float, bool]] = field(default_factory=list)  # a plan's sample stages: (steps, mpx, refiner)
    final_mpx: float = 0.0  # a plan's output size
    batch: int = 1  # images in the engine call that made this job's (above 1: taken together with others)
    checked_at: float = field(default_factory=time.monotonic)  # when the record last said this try holds the job
    lost: str | None = None  # why this try no longer holds the job (another try took it over)

    def remember(self, status: JobStatus | None, revision: int) -> None:
        if status is not None and revision > (self.record[1] if self.record else 0):
            self.record = (status, revision)
