"""The generation request: every field a client may send, and every limit, validated here.

One model serves mflux-server's `/api/generate`, the native API and NATS publishers. Limits that an
operator configures (pixel budget, steps, prompt length) come in through `Limits`; `parse_request`
applies both, so the gateway and the worker check the same rules.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from urllib.parse import urlsplit
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from schemas.names import Tier
from schemas.plan import ControlNetUnit, HiresFix, Stage, plan_problems
from schemas.settings_fields import setting

MAX_SEED = 2**63 - 1
MAX_WEBHOOK_CHARS = 2048
FORMATS = ("JPEG", "PNG", "WEBP")
CONTENT_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
SCHEDULERS = (
    "euler",
    "euler_a",
    "dpmpp_2m",
    "dpmpp_2m_karras",
    "dpmpp_2m_sde",
    "dpmpp_2m_sde_karras",
    "ddim",
    "unipc",
    "deis",
)
"""Sampler names a request may pick; absent means the model's own scheduler."""
MIN_STRENGTH = 0.01
"""The smallest image-to-image strength: one step run of a schedule of 100."""
MAX_IMAGES = 64
"""The ceiling of `Limits.max_images`: no request, group or job message names more images than this."""
MAX_LORAS = 8
MAX_LORA_WEIGHT = 4.0
LORA_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


RANDOM_SEED = -1
"""A seed of -1 (or "-1") asks for a random one, as in AUTOMATIC1111: the same as no seed."""


def is_random_seed(value: Any) -> bool:
    """Whether a request's seed value is -1, as a number or as text."""
    if isinstance(value, bool):
        return False
    if isinstance(value, str):
        return value.strip() == str(RANDOM_SEED)
    return isinstance(value, (int, float)) and value == RANDOM_SEED


def json_kind(value: Any) -> str:
    """What a decoded JSON value is, for an error message: a string '512', true, 7.5, an object."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"a string {value[:40]!r}"
    if isinstance(value, (int, float)):
        return repr(value)
    return {dict: "an object", list: "a list", type(None): "null"}.get(type(value), type(value).__name__)


def _integer(value: Any) -> Any:
    """An integer as JSON sends it: a number without a fraction (JSON Schema counts 512.0 as one);
    not true or false, not a string of digits."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be an integer, got {json_kind(value)}")
    return value


def _boolean(value: Any) -> Any:
    """true or false; not 1, "yes" or "true"."""
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {json_kind(value)}")
    return value


def _number(value: Any) -> Any:
    """A JSON number (7 and 7.5 alike); not true or false, not a string."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be a number, got {json_kind(value)}")
    return value


JsonInt = Annotated[int, BeforeValidator(_integer)]
"""An int field that takes only a JSON integer (or a number with no fraction), never a string or a boolean."""
JsonBool = Annotated[bool, BeforeValidator(_boolean)]
"""A bool field that takes only true or false."""
JsonFloat = Annotated[float, BeforeValidator(_number)]
"""A float field that takes only a JSON number."""


@dataclass(frozen=True, kw_only=True)
class Limits:
    """What one deployment accepts. The defaults fit SDXL on a 24 GB GPU."""

    max_pixels: int = setting(2048 * 2048, help="pixel budget per image", group="limits")
    max_side: int = 4096
    min_side: int = 64
    max_steps: int = setting(100, help="most steps per image", group="limits")
    max_prompt_chars: int = setting(2000, help="longest prompt", group="limits")
    max_images: int = setting(8, help="most images (n) per request", group="limits")
    max_upload_bytes: int = setting(8 * 1024 * 1024, help="largest init or mask image", group="limits")  # in bytes as decoded
    max_stages: int = setting(4, help="most stages in one job's plan (hires fix, refiner, ControlNet)", group="limits")  # schemas.plan

    def __post_init__(self) -> None:
        if not 1 <= self.max_images <= MAX_IMAGES:
            raise ValueError(f"max_images must be between 1 and {MAX_IMAGES}, got {self.max_images}")


DEFAULT_LIMITS = Limits()
MAX_FIELDS = 200  # fields of one request object; a request has about 30


class RequestInvalid(ValueError):
    """A request that breaks a rule; `errors` names each field and what is wrong with it."""

    def __init__(self, errors: list[dict[str, str]]):
        self.errors = errors
        super().__init__("; ".join(f"{e['field']}: {e['message']}" for e in errors))

    @classmethod
    def from_validation_error(cls, exc: ValidationError) -> "RequestInvalid":
        errors = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "body"
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                message = "unknown field"
            errors.append({"field": field, "message": message})
        return cls(errors)


class GenerateRequest(BaseModel):
    """An image request: text-to-image, image-to-image with `init_image`, inpainting with `mask_image` too.
    Field names follow mflux-server, plus the SDXL fields of the FastAPI tutorial."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)

    prompt: str = Field(description="What to draw.")
    negative_prompt: str = Field("", description="What not to draw.")
    seed: int | None = Field(
        None,
        description="Seed; a number or a string of digits. The server picks one when absent or -1 "
        "(AUTOMATIC1111's way of asking for a random seed).",
    )
    width: JsonInt = Field(1024, description="Image width in pixels, a multiple of 8.")
    height: JsonInt = Field(1024, description="Image height in pixels, a multiple of 8.")
    steps: JsonInt | None = Field(None, description="Denoising steps; the model's default when absent.")
    guidance: JsonFloat | None = Field(None, ge=0.0, le=30.0, description="Classifier-free guidance scale.")
    format: Literal["JPEG", "PNG", "WEBP"] = Field("JPEG", description="Image encoding.")
    quality: JsonInt = Field(85, ge=1, le=100, description="JPEG/WEBP quality, 1..100.")
    priority: JsonBool = Field(False, description="mflux-server's priority flag: the high tier.")
    tier: Tier | None = Field(None, description="Priority tier: high, normal or low. Overrides `priority`.")
    use_refiner: JsonBool = Field(False, description="Hand the latents to the SDXL refiner for the last steps.")
    refiner_split: JsonFloat | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="With use_refiner: the fraction of the noise schedule the base model denoises before the "
        "refiner takes over (0.8 hands the last 20% to the refiner); the worker's default when absent.",
    )
    scheduler: str | None = Field(
        None, description=f"Sampler: one of {', '.join(SCHEDULERS)}; the model's own when absent."
    )
    eta: JsonFloat | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="DDIM's eta, 0..1: how much fresh noise each step adds (0, the default: none, deterministic; 1: as "
        "DDPM). Used by the ddim scheduler only; the others ignore it.",
    )
    loras: dict[str, JsonFloat] | None = Field(
        None,
        description="LoRA adapters loaded on the worker, by name, with their weights, e.g. {\"pixel-art\": 0.8}.",
    )
    model: str | None = Field(None, description="Model to use; the service's current model when absent.")
    init_image: str | None = Field(
        None,
        description="Image-to-image: the picture to start from, base64 or a data:image/...;base64, URL (mflux-server's "
        "field). Without width and height the output takes its size (rounded down to multiples of 8); with them it is "
        "scaled and centre-cropped to fit. Over NATS, upload it to object store imagegen-uploads and reference it from "
        "the job message instead.",
    )
    mask_image: str | None = Field(
        None,
        description="Inpainting, with init_image: a mask of the init image's size, base64 or data URL; white areas are "
        "redrawn, black ones kept (grey blends).",
    )
    strength: JsonFloat = Field(
        0.4,
        ge=MIN_STRENGTH,
        le=1.0,
        description=f"With init_image: how much to change it, {MIN_STRENGTH} <= strength <= 1 (mflux-server's default "
        "0.4). The denoiser runs int(steps x strength) of the steps, at least one; 1.0 redraws from noise.",
    )
    n: JsonInt = Field(
        1,
        ge=1,
        description="How many images: one job each, with seeds seed, seed+1, ..., grouped under one group id; at most "
        "the server's limit (8 unless configured).",
    )
    stages: list[Stage] | None = Field(
        None,
        min_length=1,
        description="A plan: stages run in order in one job (sample, upscale; see docs/workflows.md). Absent: one sample "
        "stage (two with use_refiner).",
    )
    hires: HiresFix | None = Field(None, description="Hires fix: after the first pass, upscale and denoise again part-way.")
    controlnet: ControlNetUnit | None = Field(None, description="A ControlNet guiding the first sample stage.")
    timeout_s: JsonFloat | None = Field(
        None, gt=0, le=7 * 24 * 3600, description="Give up if no worker has started the job after this many seconds."
    )
    cache: JsonBool | None = Field(
        None,
        description="Result cache: true also caches a request without a seed, false never uses the cache; "
        "absent: requests with a seed are answered from (and stored in) the cache.",
    )
    webhook: str | None = Field(
        None,
        max_length=MAX_WEBHOOK_CHARS,
        description="An http(s) URL the service POSTs the job to (as GET /v1/jobs/{id} shows it) when it starts and when "
        "it ends, as `webhook_events_filter` says; retried with backoff until the receiver answers 2xx.",
    )
    webhook_events_filter: list[Literal["start", "completed"]] | None = Field(
        None,
        min_length=1,
        description="With webhook: which moments to send, `start` (a worker began the job) and `completed` (it is done, "
        "failed, cancelled or expired); absent: [\"completed\"].",
    )

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("seed", mode="before")
    @classmethod
    def _seed_from_string(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("must be a whole number or a string of digits")
        if is_random_seed(value):
            return None
        if isinstance(value, str):
            text = value.strip()
            if not text:
                return None
            if not text.isdigit():
                raise ValueError(f"must be a whole number or a string of digits (-1: random), got {value!r}")
            return int(text)
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"must be a whole number, got {value!r}")
            return int(value)
        return value

    @field_validator("seed")
    @classmethod
    def _seed_range(cls, value: int | None) -> int | None:
        if value is not None and not 0 <= value <= MAX_SEED:
            raise ValueError(f"must be between 0 and {MAX_SEED}, or -1 for a random seed")
        return value

    @field_validator("format", mode="before")
    @classmethod
    def _format_upper(cls, value: Any) -> Any:
        if isinstance(value, str) and value.upper() in FORMATS:
            return value.upper()
        if isinstance(value, str):
            raise ValueError(f"must be one of {', '.join(FORMATS)}, got {value!r}")
        return value

    @field_validator("scheduler", mode="before")
    @classmethod
    def _known_scheduler(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, str):
            raise ValueError(f"must be one of {', '.join(SCHEDULERS)}")
        name = value.strip().lower()
        if not name:
            return None
        if name not in SCHEDULERS:
            raise ValueError(f"must be one of {', '.join(SCHEDULERS)}, got {value!r}")
        return name

    @field_validator("loras")
    @classmethod
    def _lora_weights(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if not value:
            return None
        if len(value) > MAX_LORAS:
            raise ValueError(f"at most {MAX_LORAS} adapters per request, got {len(value)}")
        for name, weight in value.items():
            if not LORA_NAME.match(name):
                raise ValueError(f"adapter name {name!r} must be 1-64 letters, digits, '_', '-' or '.'")
            if not math.isfinite(weight) or abs(weight) > MAX_LORA_WEIGHT:
                raise ValueError(f"weight of {name!r} must be between -{MAX_LORA_WEIGHT:g} and {MAX_LORA_WEIGHT:g}, got {weight!r}")
        return value

    @field_validator("webhook")
    @classmethod
    def _webhook_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        problem = webhook_url_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("webhook_events_filter")
    @classmethod
    def _filter_needs_webhook(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if value is not None and "webhook" in info.data and info.data["webhook"] is None:  # absent, not refused
            raise ValueError("names the moments a webhook is sent; set webhook too")
        return value

    @field_validator("init_image", "mask_image", mode="before")
    @classmethod
    def _upload_text(cls, value: Any) -> Any:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None  # mflux-server's web UI sends an empty init_image when nothing was uploaded
        if not isinstance(value, str):
            raise ValueError("must be a base64 string or a data:image/...;base64, URL")
        return value

    @field_validator("mask_image")
    @classmethod
    def _mask_needs_init(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("init_image") is None:
            raise ValueError("inpainting needs an init_image to paint into")
        return value

    @field_validator("n")
    @classmethod
    def _seeds_in_range(cls, value: int, info: ValidationInfo) -> int:
        seed = info.data.get("seed")
        if seed is not None and seed + value - 1 > MAX_SEED:
            raise ValueError(f"seed + n - 1 must not exceed {MAX_SEED}")
        return value

    @field_validator("hires")
    @classmethod
    def _hires_alone(cls, value: HiresFix | None, info: ValidationInfo) -> HiresFix | None:
        if value is not None and info.data.get("stages"):
            raise ValueError("stages already name every stage: put the hires fix in them")
        return value

    @property
    def effective_tier(self) -> Tier:
        if self.tier is not None:
            return self.tier
        return Tier.HIGH if self.priority else Tier.NORMAL

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.format]

    @property
    def pixels(self) -> int:
        return self.width * self.height


def webhook_url_problem(url: str) -> str | None:
    """What makes `url` unusable as a webhook (not http or https, no host, a user name or password in
    it, spaces); None when it is usable. Where it may point is the gateway's check (gateway.http.webhooks)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number or out of range
    except ValueError as exc:
        return f"not a URL: {exc}"
    if parts.scheme not in ("http", "https"):
        return f"must be an http or https URL, got scheme {parts.scheme!r}" if parts.scheme else "must be an http or https URL"
    if not parts.hostname:
        return "must name a host"
    if parts.username is not None or parts.password is not None:
        return "must not carry a user name or password; sign with the gateway's webhook secret instead"
    if any(c.isspace() for c in url) or not url.isprintable():
        return "must not contain spaces or control characters"
    return None


def field_named_by(reason: str | None) -> str | None:
    """The request field a job's failure reason begins with ("init_image: not an image"), if any: the
    job failed on what was asked, not on the service."""
    field = (reason or "").split(":", 1)[0].strip()
    return field if field in GenerateRequest.model_fields else None


def budget_text(max_pixels: int) -> str:
    """A pixel budget as a person reads it: '2048x2048 (4194304 pixels)'."""
    side = math.isqrt(max_pixels)
    square = f"{side}x{side}" if side * side == max_pixels else f"about {side}x{side}"
    return f"{square} ({max_pixels} pixels)"


def limit_problems(request: GenerateRequest, limits: Limits) -> list[dict[str, str]]:
    """The configured limits a valid-looking request breaks, one entry per field."""
    problems: list[dict[str, str]] = []
    for name in ("prompt", "negative_prompt"):
        if len(getattr(request, name)) > limits.max_prompt_chars:
            problems.append({"field": name, "message": f"exceeds {limits.max_prompt_chars} characters"})
    for name in ("width", "height"):
        side = getattr(request, name)
        if side % 8:
            problems.append({"field": name, "message": f"must be a multiple of 8, got {side}"})
        elif not limits.min_side <= side <= limits.max_side:
            problems.append(
                {"field": name, "message": f"must be between {limits.min_side} and {limits.max_side}, got {side}"}
            )
    if not problems and request.pixels > limits.max_pixels:
        problems.append(
            {
                "field": "width",
                "message": f"{request.width}x{request.height} (width x height) is over the pixel budget of "
                f"{budget_text(limits.max_pixels)}; make width or height smaller",
            }
        )
    if request.steps is not None and not 1 <= request.steps <= limits.max_steps:
        problems.append({"field": "steps", "message": f"must be between 1 and {limits.max_steps}, got {request.steps}"})
    problems += plan_problems(request, limits)
    if request.n > limits.max_images:
        problems.append({"field": "n", "message": f"must be between 1 and {limits.max_images}, got {request.n}"})
    return problems


def parse_request(data: Any, *, limits: Limits = DEFAULT_LIMITS) -> GenerateRequest:
    """Validates a decoded body against the model and the limits; raises RequestInvalid naming each bad field."""
    if not isinstance(data, dict):
        raise RequestInvalid([{"field": "body", "message": "must be a JSON object"}])
    if len(data) > MAX_FIELDS:  # validating (and naming) each of 10,000 unknown fields costs ~0.1 s
        raise RequestInvalid([{"field": "body", "message": f"has {len(data)} fields; a request has at most {MAX_FIELDS}"}])
    try:
        request = GenerateRequest.model_validate(data)
    except ValidationError as exc:
        raise RequestInvalid.from_validation_error(exc) from None
    problems = limit_problems(request, limits)
    if problems:
        raise RequestInvalid(problems)
    return request


def schedule_length(steps: int, strength: float) -> int:
    """The schedule to ask the pipeline for so that image-to-image runs `int(steps * strength)` steps
    (diffusers' rule), stretched when that would be none: strength 0.1 with 4 steps schedules 10 and
    runs 1. A strength below MIN_STRENGTH (which no request carries) counts as MIN_STRENGTH."""
    if not strength >= MIN_STRENGTH:
        strength = MIN_STRENGTH
    length = max(steps, math.ceil(1 / min(strength, 1.0)))
    if int(length * strength) < 1:  # 1 / strength rounded a hair short
        length += 1
    return length


DEFAULT_REFINER_SPLIT = 0.8  # the share of the noise schedule the base denoises when a request names none


def refiner_steps(steps: int, split: float | None) -> int:
    """How many of `steps` run on the refiner when the base hands over at `split`: those past it, none
    when the split leaves either model no step. (The SDXL engine splits by its scheduler's timesteps,
    which may differ by a step.)"""
    refiner = steps - int(steps * (split or DEFAULT_REFINER_SPLIT))
    return refiner if 0 < refiner < steps else 0


def steps_run(steps: int, strength: float) -> int:
    """Denoising steps image-to-image runs for `steps` at `strength`: at least one."""
    return int(schedule_length(steps, strength) * strength)
