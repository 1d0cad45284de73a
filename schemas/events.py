"""Progress events published on `imagegen.events.<job_id>` and kept in stream IMAGEGEN_EVENTS."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, Field

from schemas.status import ImageRef

EventType = Literal["queued", "started", "progress", "preview", "done", "failed", "cancelled", "expired"]
FINAL_EVENTS = frozenset({"done", "failed", "cancelled", "expired"})


class JobEvent(BaseModel):
    """One thing that happened to a job. Fields not relevant to the type are left out."""

    type: EventType
    job_id: str
    ts: float = Field(default_factory=time.time)
    position: int | None = Field(None, description="queued: jobs ahead in the queue.")
    eta_s: float | None = Field(None, description="Seconds until the image is expected to be done.")
    worker: str | None = None
    attempt: int | None = None
    step: int | None = None
    total: int | None = None
    elapsed_s: float | None = None
    preview: bytes | None = Field(None, description="preview: a small JPEG.")
    image: ImageRef | None = None
    timings: dict[str, float] | None = None
    reason: str | None = None

    @property
    def final(self) -> bool:
        return self.type in FINAL_EVENTS
