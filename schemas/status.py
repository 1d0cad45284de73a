"""The status record of a job, kept in KV bucket `imagegen-jobs` under the job id."""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field

from schemas.names import Tier


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED, JobState.EXPIRED})


class ImageRef(BaseModel):
    """Where a finished image lies: object store `imagegen-images`, object name = job id."""

    name: str
    content_type: str
    size: int
    width: int
    height: int
    digest: str | None = Field(None, description="The object store's digest of the bytes: SHA-256= and its URL-safe base64.")
    chunks_id: str | None = Field(None, description="The object's chunk subject id (its NUID): the gateway reads every chunk with one request.")


class UploadRef(BaseModel):
    """An uploaded image a job reads (init or mask): object `name` in object store `imagegen-uploads`.
    The other fields describe it and may be left out by a publisher; the worker reads the object itself."""

    name: str = Field(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9_.=/-]+$")
    size: int | None = Field(None, ge=0, description="Bytes.")
    width: int | None = None
    height: int | None = None


class JobStatus(BaseModel):
    model_config = ConfigDict(extra="ignore")

    job_id: str
    state: JobState = JobState.QUEUED
    tier: Tier = Tier.NORMAL
    request: dict = Field(default_factory=dict, description="The request's fields, as submitted.")
    seed: int = 0
    owner: str | None = None
    deadline: float | None = None
    submitted_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    worker: str | None = None
    attempt: int = 0
    step: int = 0
    total_steps: int = 0
    step_s: float | None = Field(None, description="Seconds per step, measured by the worker.")
    step_at: float | None = Field(None, description="When `step` was reached.")
    error: str | None = None
    image: ImageRef | None = None
    cancel_requested: bool = False
    cached: bool = Field(False, description="Answered from the result cache: no GPU ran for this job.")
    cache_key: str | None = Field(None, description="The result-cache key this job's image is stored under once done.")
    request_digest: str | None = Field(
        None, description="With an Idempotency-Key: the fingerprint of the request it came with; a repeat of the key "
        "with another request is refused.",
    )
    nsfw: bool = Field(False, description="The safety check flagged the image; it was replaced by a black one.")
    deleted: bool = Field(
        False, description="Removed by its owner: hidden everywhere; the record stays until its TTL as a tombstone."
    )
    init_image: UploadRef | None = Field(None, description="Image-to-image: the uploaded init image.")
    mask_image: UploadRef | None = Field(None, description="Inpainting: the uploaded mask.")
    control_image: UploadRef | None = Field(None, description="A plan's ControlNet stages: the uploaded control image.")
    group_id: str | None = Field(None, description="The request of n images this job belongs to (n > 1).")
    group_index: int = Field(0, description="This job's place in its group: seed = first seed + group_index.")
    group_size: int = Field(1, description="Jobs in the group (the request's n).")

    @property
    def compute_time(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at
