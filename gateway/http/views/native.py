"""The native API's shapes (`/v1/...`): a job, a group of jobs, the limits, the live workers, and the
error body every native answer uses."""

from __future__ import annotations

from pydantic import BaseModel, Field

from schemas.status import UploadRef
from schemas.workers import WorkerInfo


class ErrorBody(BaseModel):
    error: str = Field(description="What is wrong, naming the field.")
    field: str | None = None
    errors: list[dict[str, str]] | None = None


class LimitsView(BaseModel):
    """What this gateway accepts: a request past any of these gets a 400 naming the field."""

    max_images: int = Field(description="Most images (`n`) one request may ask for.")
    max_steps: int = Field(description="Most denoising steps.")
    max_pixels: int = Field(description="Most pixels (width x height) of one image.")
    max_side: int = Field(description="Longest side, in pixels.")
    min_side: int = Field(description="Shortest side, in pixels.")
    max_prompt_chars: int = Field(description="Longest prompt (and negative prompt), in characters.")
    max_upload_bytes: int = Field(description="Largest init or mask image, in bytes as decoded.")


class WorkersView(BaseModel):
    """The live workers, as each last published itself in `imagegen-workers`."""

    workers: list[WorkerInfo] = Field(
        description="Sorted by worker_id. `job_id` names a worker's running job only where the caller may see that "
        "job (every job without API keys; with keys, the key's own)."
    )
    gateway_version: str = Field(description="The imagegen release this gateway runs.")


class JobView(BaseModel):
    """A job as the native API shows it."""

    job_id: str
    state: str
    tier: str
    position: int | None = Field(None, description="Jobs queued ahead (queued jobs only).")
    eta_s: float | None = Field(None, description="Seconds until the image is expected (queued and running).")
    step: int = 0
    total_steps: int = 0
    seed: int
    request: dict
    submitted_at: float
    started_at: float | None = None
    finished_at: float | None = None
    worker: str | None = None
    attempt: int = 0
    error: str | None = None
    cached: bool = Field(False, description="Answered from the result cache: no GPU ran for this job.")
    nsfw: bool = Field(False, description="The safety check flagged the image; it was replaced by a black one.")
    image_url: str | None = None
    events_url: str
    websocket_url: str
    init_image: UploadRef | None = Field(None, description="Image-to-image: the stored init image.")
    mask_image: UploadRef | None = Field(None, description="Inpainting: the stored mask.")
    control_image: UploadRef | None = Field(None, description="A plan's ControlNet stages: the stored control image.")
    group_id: str | None = Field(None, description="With n > 1: the group this job belongs to.")
    group_index: int = Field(0, description="Its place in the group; its seed is the first seed + group_index.")
    job_ids: list[str] | None = Field(None, description="With n > 1: every job of the group, in seed order.")
    group_url: str | None = Field(None, description="With n > 1: where the whole group is shown.")
    deleted: bool = Field(False, description="In the answer to DELETE of a finished job: it and its image are removed; "
                          "reading it answers 404 from now on.")


class GroupView(BaseModel):
    """The jobs one request of n images made, in seed order."""

    group_id: str
    size: int = Field(description="Jobs the request made (its n).")
    job_ids: list[str]
    states: dict[str, int] = Field(description="How many of the jobs still there are in each state.")
    finished: bool = Field(description="Every job still there has ended (done, failed, cancelled or expired).")
    jobs: list[JobView]
