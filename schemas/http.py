"""Shapes of the HTTP responses, so the OpenAPI document and the handlers share one definition."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.status import UploadRef
from schemas.workers import WorkerInfo


class ErrorBody(BaseModel):
    error: str = Field(description="What is wrong, naming the field.")
    field: str | None = None
    errors: list[dict[str, str]] | None = None


class MfluxGenerateResponse(BaseModel):
    task_id: str
    task_length: int = Field(description="Jobs ahead of this one, running ones included, plus itself.")
    expected_time_seconds: float
    task_ids: list[str] | None = Field(None, description="With n > 1: every task of the request, task_id first.")
    group_id: str | None = Field(None, description="With n > 1: the group of the tasks (GET /v1/groups/{group_id}).")
    cached: bool | None = Field(None, description="true when answered from the result cache: the image is ready now.")


class MfluxStatusResponse(BaseModel):
    status: str = Field(description="waiting (queued or running), done, or error.")
    pos: int | None = Field(None, description="Jobs queued ahead; 0 when running or next.")
    wait_remaining: float | None = Field(None, description="Seconds until the image is expected.")
    error: str | None = None
    cached: bool | None = Field(None, description="true when the image came from the result cache.")
    nsfw: bool | None = Field(None, description="true when the safety check replaced the image by a black one.")


class MfluxTask(BaseModel):
    task_id: str
    status: str
    prompt: str
    seed: int
    width: int
    height: int
    steps: int | None = None
    guidance: float | None = None
    format: str
    quality: int
    priority: bool
    start_time: float | None = None
    compute_time: float | None = None
    end_time: float | None = None


class ModelInfo(BaseModel):
    steps: int
    guidance: float
    refiner: bool = False
    workers: int = 0


class MfluxPs(BaseModel):
    model: str | None
    quantize: Any = None
    default_steps: int | None = None
    default_guidance: float | None = None
    workers: int = 0


class LoadRequest(BaseModel):
    model: str


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
    group_id: str | None = Field(None, description="With n > 1: the group this job belongs to.")
    group_index: int = Field(0, description="Its place in the group; its seed is the first seed + group_index.")
    job_ids: list[str] | None = Field(None, description="With n > 1: every job of the group, in seed order.")
    group_url: str | None = Field(None, description="With n > 1: where the whole group is shown.")


class GroupView(BaseModel):
    """The jobs one request of n images made, in seed order."""

    group_id: str
    size: int = Field(description="Jobs the request made (its n).")
    job_ids: list[str]
    states: dict[str, int] = Field(description="How many of the jobs still there are in each state.")
    finished: bool = Field(description="Every job still there has ended (done, failed, cancelled or expired).")
    jobs: list[JobView]



class OpenAIImageRequest(BaseModel):
    """OpenAI's `POST /v1/images/generations` body, plus a few imagegen fields (send them with the
    OpenAI client's `extra_body`)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="What to draw.")
    model: str | None = Field(
        None, description="A served model, or an OpenAI name (dall-e-2, dall-e-3, gpt-image-1, ...) for the current one."
    )
    n: int = Field(
        1, ge=1, description="How many images, 1..the server's limit (8 unless configured); one job each, seeds seed, seed+1, ..."
    )
    size: str | None = Field(None, description="WIDTHxHEIGHT, multiples of 8 (e.g. 1024x1024), or auto (1024x1024).")
    quality: Literal["auto", "standard", "hd", "low", "medium", "high"] | None = Field(
        None,
        description="Scales the model's default steps: low half, standard/medium/auto the default, high/hd 1.5x.",
    )
    response_format: Literal["b64_json", "url"] | None = Field(
        None, description="b64_json (the default) or url: an absolute URL of /v1/jobs/{id}/image."
    )
    output_format: Literal["png", "jpeg", "webp"] | None = Field(None, description="Image encoding; png by default.")
    output_compression: int | None = Field(None, ge=0, le=100, description="jpeg/webp quality, 0..100.")
    style: Literal["vivid", "natural"] | None = Field(None, description="Accepted; has no effect.")
    background: Literal["auto", "opaque", "transparent"] | None = Field(
        None, description="auto or opaque; transparent is not available."
    )
    moderation: Literal["auto", "low"] | None = Field(None, description="Accepted; has no effect.")
    stream: bool | None = Field(None, description="Only false: streaming is not available here.")
    user: str | None = Field(None, description="Accepted; has no effect.")
    safety_identifier: str | None = Field(None, description="Accepted; has no effect.")
    seed: int | None = Field(None, ge=0, description="imagegen: seed of the first image; random when absent.")
    negative_prompt: str | None = Field(None, description="imagegen: what not to draw.")
    steps: int | None = Field(None, description="imagegen: denoising steps; overrides quality.")
    guidance: float | None = Field(None, description="imagegen: classifier-free guidance scale.")


class OpenAIImage(BaseModel):
    b64_json: str | None = Field(None, description="The image, base64 (response_format b64_json).")
    url: str | None = Field(None, description="Where to fetch the image (response_format url).")
    revised_prompt: str | None = None
    job_id: str | None = Field(None, description="imagegen: the job that made this image.")
    seed: int | None = Field(None, description="imagegen: the seed it was made with.")


class OpenAIImagesResponse(BaseModel):
    created: int = Field(description="Unix time the images were finished.")
    data: list[OpenAIImage]
    size: str | None = None
    output_format: str | None = None


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, permission_error, rate_limit_error or server_error.")
    param: str | None = Field(None, description="The request field at fault.")
    code: str | None = None


class OpenAIError(BaseModel):
    """An error in OpenAI's shape, as OpenAI's client libraries expect it."""

    error: OpenAIErrorDetail
