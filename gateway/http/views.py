"""Shapes of the HTTP responses and requests of the gateway's APIs, so the OpenAPI document and the handlers
share one definition. Gateway-only: a service on NATS never sees them (its wire types are in `schemas`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from schemas.request import JsonBool, JsonFloat, JsonInt, is_random_seed
from schemas.status import UploadRef
from schemas.workers import WorkerInfo


def _random_is_none(value: Any) -> Any:
    return None if is_random_seed(value) else value


JsonSeed = Annotated[JsonInt | None, BeforeValidator(_random_is_none)]
"""A JSON body's seed: an integer, or -1 (or absent) for a random one."""
FormSeed = Annotated[int | None, BeforeValidator(_random_is_none)]
"""A multipart form's seed: digits, or -1 (or absent) for a random one."""


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



class OpenAIImageRequest(BaseModel):
    """OpenAI's `POST /v1/images/generations` body, plus a few imagegen fields (send them with the
    OpenAI client's `extra_body`)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="What to draw.")
    model: str | None = Field(
        None, description="A served model, or an OpenAI name (dall-e-2, dall-e-3, gpt-image-1, ...) for the current one."
    )
    n: JsonInt = Field(
        1, ge=1, description="How many images, 1..the server's limit (8 unless configured); one job each, seeds seed, seed+1, ..."
    )
    size: str | None = Field(None, description="WIDTHxHEIGHT, multiples of 8 (e.g. 1024x1024), or auto (1024x1024).")
    quality: Literal["auto", "standard", "hd", "low", "medium", "high"] | None = Field(
        None,
        description="Scales the model's default steps: low half, standard/medium/auto the default, high/hd 1.5x.",
    )
    response_format: Literal["b64_json", "url"] | None = Field(
        None, description="b64_json or url (an absolute URL of /v1/jobs/{id}/image); as OpenAI, b64_json by default for "
        "gpt-image-* models, url for dall-e-*, no model and the models served here."
    )
    output_format: Literal["png", "jpeg", "webp"] | None = Field(None, description="Image encoding; png by default.")
    output_compression: JsonInt | None = Field(None, ge=0, le=100, description="jpeg/webp quality, 0..100.")
    style: Literal["vivid", "natural"] | None = Field(None, description="Accepted; has no effect.")
    background: Literal["auto", "opaque", "transparent"] | None = Field(
        None, description="auto or opaque; transparent is not available."
    )
    moderation: Literal["auto", "low"] | None = Field(None, description="Accepted; has no effect.")
    stream: JsonBool | None = Field(None, description="Only false: streaming is not available here.")
    user: str | None = Field(None, description="Accepted; has no effect.")
    safety_identifier: str | None = Field(None, description="Accepted; has no effect.")
    seed: JsonSeed = Field(None, ge=0, description="imagegen: seed of the first image; random when absent or -1.")
    negative_prompt: str | None = Field(None, description="imagegen: what not to draw.")
    steps: JsonInt | None = Field(None, description="imagegen: denoising steps; overrides quality.")
    guidance: JsonFloat | None = Field(None, description="imagegen: classifier-free guidance scale.")


class OpenAIEditRequest(BaseModel):
    """The text fields of OpenAI's `POST /v1/images/edits` form (the files, `image` or `image[]` and
    `mask`, come beside them), plus a few imagegen fields (the OpenAI client's `extra_body`)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="What the edited image shows.")
    model: str | None = Field(None, description="A served model, or an OpenAI name for the current one.")
    n: int = Field(1, ge=1, description="How many images, one job each, seeds seed, seed+1, ...")
    size: str | None = Field(None, description="WIDTHxHEIGHT (the image scaled and centre-cropped to it) or auto (the image's own size).")
    quality: Literal["auto", "standard", "hd", "low", "medium", "high"] | None = Field(None, description="Scales the model's default steps.")
    response_format: Literal["b64_json", "url"] | None = Field(None, description="As OpenAI: b64_json for gpt-image-*, else url by default.")
    output_format: Literal["png", "jpeg", "webp"] | None = Field(None, description="Image encoding; png by default.")
    output_compression: int | None = Field(None, ge=0, le=100, description="jpeg/webp quality, 0..100.")
    background: Literal["auto", "opaque", "transparent"] | None = Field(None, description="auto or opaque; transparent is not available.")
    input_fidelity: Literal["high", "low"] | None = Field(None, description="Accepted; has no effect.")
    stream: bool | None = Field(None, description="Only false: streaming is not available here.")
    user: str | None = Field(None, description="Accepted; has no effect.")
    safety_identifier: str | None = Field(None, description="Accepted; has no effect.")
    seed: FormSeed = Field(None, ge=0, description="imagegen: seed of the first image; random when absent or -1.")
    negative_prompt: str | None = Field(None, description="imagegen: what not to draw.")
    steps: int | None = Field(None, description="imagegen: denoising steps; overrides quality.")
    guidance: float | None = Field(None, description="imagegen: classifier-free guidance scale.")
    strength: float | None = Field(
        None, description="imagegen: how much to change the image, 0.01..1; 1 where a mask says (redrawn), 0.75 without one."
    )


class OpenAIVariationRequest(BaseModel):
    """The text fields of OpenAI's `POST /v1/images/variations` form (the file is `image`), plus a few
    imagegen fields."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="A served model, or an OpenAI name for the current one.")
    n: int = Field(1, ge=1, description="How many variations, one job each, seeds seed, seed+1, ...")
    size: str | None = Field(None, description="WIDTHxHEIGHT (the image scaled and centre-cropped to it) or auto (the image's own size).")
    response_format: Literal["b64_json", "url"] | None = Field(None, description="As OpenAI: url by default (b64_json for gpt-image-*).")
    user: str | None = Field(None, description="Accepted; has no effect.")
    prompt: str | None = Field(None, description="imagegen: what the variations show; a neutral prompt when absent.")
    seed: FormSeed = Field(None, ge=0, description="imagegen: seed of the first variation; random when absent or -1.")
    negative_prompt: str | None = Field(None, description="imagegen: what not to draw.")
    steps: int | None = Field(None, description="imagegen: denoising steps.")
    guidance: float | None = Field(None, description="imagegen: classifier-free guidance scale.")
    strength: float | None = Field(None, description="imagegen: how far from the image, 0.01..1; 0.6 when absent.")


class OpenAIModel(BaseModel):
    """A served model in OpenAI's shape (`GET /v1/models`)."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time its longest-running live worker started.")
    owned_by: str = "imagegen"


class OpenAIModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]


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


class A1111Txt2ImgRequest(BaseModel):
    """AUTOMATIC1111 web UI's `POST /sdapi/v1/txt2img` body. Fields left out take the served model's
    defaults (not A1111's 512x512, 50 steps and CFG 7). Fields of features not offered here are accepted
    only at their "off" values; every other field is refused by name."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field("", description="What to draw.")
    negative_prompt: str | None = Field(None, description="What not to draw.")
    seed: JsonInt | None = Field(None, description="Seed of the first image; -1 or absent: random.")
    sampler_name: str | None = Field(None, description="Euler, Euler a, DPM++ 2M, DPM++ 2M SDE, DDIM, UniPC or DEIS (GET /sdapi/v1/samplers).")
    sampler_index: str | None = Field(None, description="The older name of sampler_name; sampler_name wins.")
    scheduler: str | None = Field(None, description="Automatic, Uniform or Karras (Karras with the DPM++ samplers only).")
    batch_size: JsonInt = Field(1, ge=1, description="Images per batch; batch_size x n_iter images in all, one job each.")
    n_iter: JsonInt = Field(1, ge=1, description="Batches.")
    steps: JsonInt | None = Field(None, description="Denoising steps; the model's default when absent.")
    cfg_scale: JsonFloat | None = Field(None, description="Classifier-free guidance scale; the model's default when absent.")
    width: JsonInt | None = Field(None, description="Multiple of 8; the model's default when absent.")
    height: JsonInt | None = Field(None, description="Multiple of 8; the model's default when absent.")
    refiner_checkpoint: str | None = Field(None, description="Any name: the SDXL refiner the workers loaded takes the last part.")
    refiner_switch_at: JsonFloat | None = Field(None, description="With refiner_checkpoint: the share of the schedule the base runs.")
    override_settings: dict[str, Any] | None = Field(
        None, description="sd_model_checkpoint: a served model for this request; CLIP_stop_at_last_layers (1) and sd_vae "
        "(Automatic, None) only at their defaults."
    )
    override_settings_restore_afterwards: JsonBool | None = Field(None, description="Accepted; settings are per request here.")
    send_images: JsonBool | None = Field(None, description="false: the answer carries no images.")
    save_images: JsonBool | None = Field(None, description="Accepted; nothing is saved to the server's disk.")
    do_not_save_samples: JsonBool | None = Field(None, description="Accepted; nothing is saved to the server's disk.")
    do_not_save_grid: JsonBool | None = Field(None, description="Accepted; nothing is saved to the server's disk.")
    force_task_id: str | None = Field(None, description="Accepted; the jobs' ids are in the answer's info.")
    comments: dict[str, Any] | None = Field(None, description="Accepted; has no effect.")
    disable_extra_networks: JsonBool | None = Field(None, description="Accepted; prompts carry no extra networks here.")
    subseed: JsonInt | None = Field(None, description="Accepted; variation seeds are not offered (subseed_strength 0).")
    # Features not offered: accepted only when off.
    subseed_strength: JsonFloat | None = Field(None, description="Only 0.")
    seed_resize_from_h: JsonInt | None = Field(None, description="Only -1 or 0.")
    seed_resize_from_w: JsonInt | None = Field(None, description="Only -1 or 0.")
    styles: list[str] | None = Field(None, description="Only empty.")
    restore_faces: JsonBool | None = Field(None, description="Only false.")
    tiling: JsonBool | None = Field(None, description="Only false.")
    enable_hr: JsonBool | None = Field(None, description="txt2img: the hires fix, with the hr_* fields and denoising_strength (0.7); "
                                       "without it the hr_* fields are ignored, as A1111 does.")
    eta: JsonFloat | None = Field(
        None, description="DDIM: the noise each step adds, 0..1 (0 when absent). Euler a and DPM++ 2M SDE: only 1, "
        "their fixed noise here (A1111's default). Ignored by the other samplers, as A1111 does."
    )
    s_min_uncond: JsonFloat | None = Field(None, description="Only 0.")
    s_churn: JsonFloat | None = Field(None, description="Only 0.")
    s_tmax: JsonFloat | None = Field(None, description="Only absent or 0.")
    s_tmin: JsonFloat | None = Field(None, description="Only 0.")
    s_noise: JsonFloat | None = Field(None, description="Only 1.")
    script_name: str | None = Field(None, description="Only absent: scripts are not offered.")
    script_args: list[Any] | None = Field(None, description="Only empty.")
    alwayson_scripts: dict[str, Any] | None = Field(None, description="Only the ControlNet extension's: {\"controlnet\": {\"args\": [unit]}}, one enabled unit.")
    infotext: str | None = Field(None, description="Only absent or empty.")
    firstpass_image: str | None = Field(None, description="Only absent.")
    # The hires fix's settings, used only with enable_hr (gateway/apis/a1111/plans.py), as in A1111.
    denoising_strength: JsonFloat | None = None
    firstphase_width: JsonInt | None = None
    firstphase_height: JsonInt | None = None
    hr_scale: JsonFloat | None = None
    hr_upscaler: str | None = None
    hr_second_pass_steps: JsonInt | None = None
    hr_resize_x: JsonInt | None = None
    hr_resize_y: JsonInt | None = None
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str | None = None
    hr_negative_prompt: str | None = None
    hr_additional_modules: list[Any] | None = None


class A1111Img2ImgRequest(A1111Txt2ImgRequest):
    """AUTOMATIC1111's `POST /sdapi/v1/img2img` body: txt2img's fields, the init image and, to inpaint,
    a mask with A1111's settings for it (unused without a mask, as in A1111)."""

    init_images: list[str] | None = Field(None, description="Exactly one image, base64 or a data:image/...;base64, URL.")
    denoising_strength: JsonFloat | None = Field(None, description="How much to change the image, 0.01..1; 0.75 (A1111's default) when absent.")
    resize_mode: JsonInt | None = Field(
        None, description="0 (the default): stretched to width x height; 1: scaled and centre-cropped to fit. "
        "Without width and height the output takes the init image's size."
    )
    include_init_images: JsonBool | None = Field(None, description="Only false.")
    image_cfg_scale: JsonFloat | None = Field(None, description="Accepted; used by instruct-pix2pix models only, none here.")
    mask: str | None = Field(
        None, description="Inpainting: a picture of the init image's size, white (or, with transparency, opaque) where to paint."
    )
    mask_blur: JsonInt | None = Field(None, description="Pixels of Gaussian blur at the mask's edges, both ways (0..64); overrides the next two.")
    mask_blur_x: JsonInt | None = Field(None, description="Across (0..64); 4 when absent.")
    mask_blur_y: JsonInt | None = Field(None, description="Down (0..64); 4 when absent.")
    mask_round: JsonBool | None = Field(None, description="Round the mask to black and white before blurring it (the default).")
    inpainting_fill: JsonInt | None = Field(
        None, description="What the model starts from under the mask: 0 (the default) the surroundings' colours, 1 the image as it is."
    )
    inpaint_full_res: JsonBool | None = Field(
        None, description="true (the default): only the masked area, cut out and inpainted at width x height, then pasted back "
        "(the answer has the init image's size); false: the whole picture at width x height."
    )
    inpaint_full_res_padding: JsonInt | None = Field(None, description="Pixels around the masked area taken with it (0..256); 0 when absent.")
    inpainting_mask_invert: JsonInt | None = Field(None, description="1: paint where the mask is black instead.")
    initial_noise_multiplier: JsonFloat | None = Field(None, description="Only 1.")
    latent_mask: str | None = Field(None, description="Only absent.")


class A1111Images(BaseModel):
    images: list[str] = Field(description="The images, base64 PNG, in seed order.")
    parameters: dict[str, Any] = Field(description="The request as sent.")
    info: str = Field(description="JSON text: seed, all_seeds, sizes, sampler, steps, model, job_ids, infotexts.")


class A1111Error(BaseModel):
    """An error in FastAPI's shape, as AUTOMATIC1111's API gives them: a list of field problems (422), else a message."""

    detail: str | list[dict[str, Any]]


class ComfyPromptRequest(BaseModel):
    """ComfyUI's `POST /prompt` body."""

    prompt: dict[str, Any] = Field(description="The node graph in ComfyUI's API format: {node_id: {class_type, inputs}}.")
    client_id: str | None = Field(None, description="The clientId of the /ws that follows the run.")
    prompt_id: str | None = Field(None, description="An id of the caller's own (1-64 letters, digits, '-', '_'); sent again, it queues nothing more.")
    extra_data: dict[str, Any] | None = Field(None, description="Kept with the prompt and given back in /history and /queue.")
    front: JsonBool | None = Field(None, description="Only false: the order of the queue is the tiers' (an API key's tier).")


class ComfyPromptQueued(BaseModel):
    prompt_id: str
    number: int = Field(description="Milliseconds since the epoch when it was queued.")
    node_errors: dict[str, Any]


class ComfyError(BaseModel):
    """An error in ComfyUI's shape: {type, message, details, extra_info}, and the problems of each node."""

    error: dict[str, Any]
    node_errors: dict[str, Any] | list[Any]


class A1111Lora(BaseModel):
    """A LoRA adapter the workers loaded, as AUTOMATIC1111 lists them; prompts use it as <lora:NAME:WEIGHT>."""

    name: str
    alias: str
    path: str = Field(description="Its name: adapters are loaded by the workers at start, not read from files here.")
    metadata: dict[str, Any]


class A1111Model(BaseModel):
    title: str
    model_name: str
    hash: str | None = Field(None, description="A1111's short hash: the first 10 hex digits of sha256.")
    sha256: str | None = Field(None, description="The sha256 of the model's UNet weights, as its workers publish it; null when not on their disk.")
    filename: str
    config: str | None = None


class A1111Memory(BaseModel):
    """AUTOMATIC1111's memory figures: the gateway's RAM ({free, used, total} bytes) and CUDA's ({"error": "unavailable"} here)."""

    ram: dict[str, Any]
    cuda: dict[str, Any]


class A1111Scripts(BaseModel):
    txt2img: list[str] = Field(description="None here: scripts are not offered.")
    img2img: list[str]


class A1111Embeddings(BaseModel):
    loaded: dict[str, Any] = Field(description="None here: textual-inversion embeddings are not offered.")
    skipped: dict[str, Any]


class A1111Sampler(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class A1111Schedule(BaseModel):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float
    need_inner_model: bool


class A1111Options(BaseModel):
    sd_model_checkpoint: str | None = Field(description="The current model: the one requests that name none get.")


class A1111OptionsUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sd_model_checkpoint: str | None = Field(None, description="A served model (GET /sdapi/v1/sd-models) to make the current one.")
    CLIP_stop_at_last_layers: JsonInt | None = Field(None, description="Only 1 (the default).")
    sd_vae: str | None = Field(None, description="Only Automatic or None (the model's own VAE).")


class A1111ProgressState(BaseModel):
    skipped: bool
    interrupted: bool
    stopping_generation: bool
    job: str = Field(description="The job in hand: the request's first unfinished job.")
    job_count: int = Field(description="The request's jobs (batch_size x n_iter); 0 when the caller has none unfinished.")
    job_timestamp: str
    job_no: int = Field(description="The job in hand's place among them, from 0.")
    sampling_step: int
    sampling_steps: int


class A1111Progress(BaseModel):
    """AUTOMATIC1111's `GET /sdapi/v1/progress`, for the caller's newest unfinished request."""

    progress: float = Field(description="Steps done over all steps of the request's jobs, 0..1.")
    eta_relative: float = Field(description="Seconds until the request's last job is expected done.")
    state: A1111ProgressState
    current_image: str | None = Field(
        None,
        description="The job in hand's newest preview (a small JPEG in base64, every few steps as the workers' --preview-every says); "
        "null while it is queued, before its first preview, or with skip_current_image=true.",
    )
    textinfo: str | None = None
