"""A job's plan: a short chain of stages that one worker runs in order, holding the latents in memory.

Stages are `sample` (denoise: text to image, from the latents the stages before left, or from an init
image; on the base or the refiner; with its own steps, sampler, guidance, `denoise`, or a hand-over
window `start_step`/`end_step` on a shared schedule; optionally guided by a ControlNet) and `upscale`
(of the latents or of the decoded pixels, by a factor or to a size). SDXL's standard graphs are plans
of two to four stages: base + refiner is two samples handing over at a step, the hires fix is sample,
upscale, sample with `denoise` < 1.

A request names a plan with `stages`, or with the shorthands `hires` (the hires fix after its first
pass) and `controlnet` (a ControlNet on its first sample stage); `expand` turns any request into its
list of stages, and `plan_problems` checks one against the limits (stage count, every stage's size,
total steps), naming the field.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

if TYPE_CHECKING:
    from schemas.request import GenerateRequest, Limits

LATENT_UPSCALERS = ("nearest-exact", "bilinear", "bicubic", "area")
PIXEL_UPSCALERS = ("nearest", "bilinear", "bicubic", "lanczos")
PREPROCESSORS = ("none", "canny")
"""ControlNet preprocessing the worker runs itself (no model needed): the image as given, or canny edges."""
DEFAULT_CANNY = (100, 200)
"""Canny's low and high thresholds on the 0-255 scale when a request leaves them out (A1111's defaults)."""
MAX_UPSCALE = 4.0
MAX_CONTROLNET_WEIGHT = 2.0
DEFAULT_HIRES_DENOISE = 0.55


class ControlNetUnit(BaseModel):
    """A ControlNet guiding a sample stage: which one (loaded on the worker), its control image, how strongly and when."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$", description="A ControlNet the worker loaded (`--controlnet NAME=SOURCE`).")
    image: str | None = Field(
        None, description="The control image, base64 or a data URL (HTTP only; it travels as an upload, `control_image` in the job message)."
    )
    preprocessor: Literal["none", "canny"] = Field("none", description="none: the image as given; canny: its edges, found by the worker.")
    low_threshold: int = Field(
        DEFAULT_CANNY[0], ge=1, le=255,
        description="Canny only: gradient strength (0-255 scale) an edge pixel needs when it touches a strong one.",
    )
    high_threshold: int = Field(DEFAULT_CANNY[1], ge=1, le=255, description="Canny only: gradient strength that makes an edge pixel on its own.")
    weight: float = Field(1.0, ge=0.0, le=MAX_CONTROLNET_WEIGHT, description="Conditioning scale; 0 leaves the image unguided.")
    start: float = Field(0.0, ge=0.0, le=1.0, description="Fraction of the stage's steps at which guidance starts.")
    end: float = Field(1.0, ge=0.0, le=1.0, description="Fraction of the stage's steps at which it stops.")

    @model_validator(mode="after")
    def _window(self) -> "ControlNetUnit":
        if self.start >= self.end:
            raise ValueError(f"start ({self.start:g}) must be below end ({self.end:g})")
        if self.low_threshold > self.high_threshold:
            raise ValueError(f"low_threshold ({self.low_threshold}) must not be above high_threshold ({self.high_threshold})")
        if self.preprocessor != "canny" and (self.low_threshold, self.high_threshold) != DEFAULT_CANNY:
            raise ValueError("low_threshold and high_threshold are for preprocessor canny")
        return self


class SampleStage(BaseModel):
    """Denoise: from noise (a first stage without an init image), else from what the stages before left."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["sample"] = "sample"
    model: Literal["base", "refiner"] = Field("base", description="The base model or the worker's refiner.")
    steps: int | None = Field(None, ge=1, description="Schedule length; the request's steps when absent.")
    scheduler: str | None = Field(None, description="Sampler; the request's when absent.")
    guidance: float | None = Field(None, ge=0.0, le=30.0, description="Guidance; the request's when absent.")
    denoise: float | None = Field(
        None, gt=0.0, le=1.0,
        description="From an image or earlier latents: noise them this far and denoise again (a hires fix's second pass). "
        "A first stage with an init image takes the request's strength when absent.",
    )
    start_step: int | None = Field(None, ge=0, description="Hand-over: continue the earlier latents from this step of `steps`.")
    end_step: int | None = Field(None, ge=1, description="Hand-over: stop after this step of `steps`, leaving noise for the next stage.")
    controlnet: ControlNetUnit | None = None

    @model_validator(mode="after")
    def _window(self) -> "SampleStage":
        if self.denoise is not None and self.start_step is not None:
            raise ValueError("denoise and start_step both say where to start: give one")
        if self.start_step is not None and self.end_step is not None and self.start_step >= self.end_step:
            raise ValueError(f"start_step ({self.start_step}) must be below end_step ({self.end_step})")
        if self.steps is not None:
            for name in ("start_step", "end_step"):
                value = getattr(self, name)
                if value is not None and value > self.steps:
                    raise ValueError(f"{name} ({value}) must not exceed steps ({self.steps})")
        if self.model == "refiner" and self.controlnet is not None:
            raise ValueError("a ControlNet guides the base model only")
        return self


class UpscaleStage(BaseModel):
    """Make the image larger: its latents (cheap, blurry until the next sample stage) or its decoded pixels."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["upscale"] = "upscale"
    space: Literal["latent", "pixel"] = "latent"
    scale: float | None = Field(None, gt=0.0, le=MAX_UPSCALE, description="By this factor (rounded down to multiples of 8).")
    width: int | None = Field(None, ge=8, description="To this width (with height), a multiple of 8.")
    height: int | None = Field(None, ge=8, description="To this height (with width), a multiple of 8.")
    upscaler: str | None = Field(
        None, description=f"latent: {', '.join(LATENT_UPSCALERS)} (nearest-exact when absent); pixel: {', '.join(PIXEL_UPSCALERS)} (lanczos)."
    )

    @model_validator(mode="after")
    def _size(self) -> "UpscaleStage":
        if (self.scale is None) == (self.width is None and self.height is None):
            raise ValueError("give scale, or width and height")
        if (self.width is None) != (self.height is None):
            raise ValueError("give width and height together")
        offered = LATENT_UPSCALERS if self.space == "latent" else PIXEL_UPSCALERS
        if self.upscaler is not None and self.upscaler not in offered:
            raise ValueError(f"upscaler {self.upscaler!r}: a {self.space} upscale offers {', '.join(offered)}")
        return self

    @property
    def method(self) -> str:
        return self.upscaler or ("nearest-exact" if self.space == "latent" else "lanczos")

    def size(self, width: int, height: int) -> tuple[int, int]:
        if self.width is not None and self.height is not None:
            return self.width, self.height
        scale = self.scale or 1.0
        return max(8, int(width * scale) // 8 * 8), max(8, int(height * scale) // 8 * 8)


def _stage_kind(value: Any) -> str:
    kind = value.get("kind", "sample") if isinstance(value, dict) else getattr(value, "kind", "sample")
    return kind if kind in ("sample", "upscale") else "sample"  # an unknown kind then fails as the literal's error


Stage = Annotated[Union[Annotated[SampleStage, Tag("sample")], Annotated[UpscaleStage, Tag("upscale")]], Discriminator(_stage_kind)]


class HiresFix(BaseModel):
    """The hires fix as one field: after the first pass, upscale, then denoise again part-way."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scale: float | None = Field(None, gt=1.0, le=MAX_UPSCALE, description="Upscale factor (2 when neither it nor width/height is given).")
    width: int | None = Field(None, ge=8)
    height: int | None = Field(None, ge=8)
    steps: int | None = Field(None, ge=1, description="Second pass schedule; the request's steps when absent.")
    denoise: float = Field(DEFAULT_HIRES_DENOISE, gt=0.0, le=1.0, description="How far the second pass re-noises the upscaled image.")
    space: Literal["latent", "pixel"] = "latent"
    upscaler: str | None = None

    @model_validator(mode="after")
    def _runnable(self) -> "HiresFix":
        if (self.width is None) != (self.height is None):
            raise ValueError("give width and height together")
        if self.scale is not None and self.width is not None:
            raise ValueError("give scale, or width and height")
        offered = LATENT_UPSCALERS if self.space == "latent" else PIXEL_UPSCALERS
        if self.upscaler is not None and self.upscaler not in offered:
            raise ValueError(f"upscaler {self.upscaler!r}: a {self.space} upscale offers {', '.join(offered)}")
        return self

    def stages(self) -> list[Any]:
        size = dict(width=self.width, height=self.height) if self.width is not None else dict(scale=self.scale or 2.0)
        return [UpscaleStage(space=self.space, upscaler=self.upscaler, **size), SampleStage(steps=self.steps, denoise=self.denoise)]


def expand(request: "GenerateRequest", *, default_steps: int = 30, refiner_split: float | None = None) -> list[Any]:
    """The request's stages: its `stages`, or those its fields and shorthands make (one sample stage
    for today's text-to-image, image-to-image and inpainting; two with `use_refiner`)."""
    if request.stages:
        stages = list(request.stages)
    else:
        steps = request.steps or default_steps
        if request.use_refiner:
            split = request.refiner_split or refiner_split or 0.8
            hand = int(steps * split)
            if 0 < hand < steps:
                stages = [SampleStage(steps=steps, end_step=hand), SampleStage(model="refiner", steps=steps, start_step=hand)]
            else:
                stages = [SampleStage()]
        else:
            stages = [SampleStage()]
        if request.hires is not None:
            stages += request.hires.stages()
    if request.controlnet is not None:
        first = next(i for i, s in enumerate(stages) if isinstance(s, SampleStage))
        stages[first] = stages[first].model_copy(update={"controlnet": request.controlnet})
    return stages


def is_plan(request: "GenerateRequest") -> bool:
    """Whether the request needs the stage runner (stages, a hires fix or a ControlNet)."""
    return bool(request.stages) or request.hires is not None or request.controlnet is not None


def stage_steps(stage: Any, default_steps: int, *, first_from_image: bool = False, strength: float = 1.0) -> int:
    """The denoising steps a sample stage runs (0 for an upscale)."""
    from schemas.request import steps_run

    if not isinstance(stage, SampleStage):
        return 0
    steps = stage.steps or default_steps
    if stage.start_step is not None or stage.end_step is not None:
        return max(1, (stage.end_step or steps) - (stage.start_step or 0))
    if stage.denoise is not None:
        return steps_run(steps, stage.denoise)
    if first_from_image:
        return steps_run(steps, strength)
    return steps


def total_steps(stages: list[Any], default_steps: int, *, from_image: bool = False, strength: float = 1.0) -> int:
    """The progress count over the whole plan."""
    first = next((i for i, s in enumerate(stages) if isinstance(s, SampleStage)), -1)
    return sum(stage_steps(s, default_steps, first_from_image=from_image and i == first, strength=strength) for i, s in enumerate(stages))


def stage_parts(
    stages: list[Any], width: int, height: int, default_steps: int, *, from_image: bool = False, strength: float = 1.0
) -> list[tuple[int, float, bool]]:
    """(steps, megapixels, on the refiner) of each sample stage, in order: what an ETA costs stage by stage."""
    parts, first = [], True
    for stage, (w, h) in zip(stages, sizes(stages, width, height)):
        if isinstance(stage, SampleStage):
            steps = stage_steps(stage, default_steps, first_from_image=from_image and first, strength=strength)
            parts.append((steps, w * h / 1e6, stage.model == "refiner"))
            first = False
    return parts


def sizes(stages: list[Any], width: int, height: int) -> list[tuple[int, int]]:
    """The image size after each stage."""
    out = []
    for stage in stages:
        if isinstance(stage, UpscaleStage):
            width, height = stage.size(width, height)
        out.append((width, height))
    return out


def plan_problems(request: "GenerateRequest", limits: "Limits") -> list[dict[str, str]]:
    """What makes the request's plan unrunnable under the limits, each naming its field."""
    from schemas.request import SCHEDULERS

    if not is_plan(request):
        return []
    field = "stages" if request.stages else "hires" if request.hires is not None else "controlnet"
    stages = expand(request, default_steps=request.steps or 30)
    problems: list[dict[str, str]] = []
    if len(stages) > limits.max_stages:
        return [{"field": field, "message": f"at most {limits.max_stages} stages, this plan has {len(stages)}"}]
    if not isinstance(stages[0], SampleStage):
        problems.append({"field": f"{field}.0" if request.stages else field, "message": "the first stage must be a sample stage"})
    for i, stage in enumerate(stages):
        where = f"stages.{i}" if request.stages else field
        if isinstance(stage, SampleStage):
            if i == 0 and stage.start_step is not None:
                problems.append({"field": where, "message": "a first stage has no earlier latents to continue from: drop start_step"})
            if stage.scheduler is not None and stage.scheduler not in SCHEDULERS:
                problems.append({"field": where, "message": f"scheduler must be one of {', '.join(SCHEDULERS)}, got {stage.scheduler!r}"})
            if stage.steps is not None and stage.steps > limits.max_steps:
                problems.append({"field": where, "message": f"steps must be between 1 and {limits.max_steps}, got {stage.steps}"})
        if isinstance(stage, UpscaleStage) and stage.width is not None:
            for side in (stage.width, stage.height):
                if side % 8:
                    problems.append({"field": where, "message": f"width and height must be multiples of 8, got {stage.width}x{stage.height}"})
                    break
    for i, (width, height) in enumerate(sizes(stages, request.width, request.height)):
        where = f"stages.{i}" if request.stages else field
        if width * height > limits.max_pixels or max(width, height) > limits.max_side:
            problems.append({"field": where, "message": f"{width}x{height} exceeds the pixel budget of {limits.max_pixels} pixels (or the largest side, {limits.max_side})"})
            break
    samples = sum(1 for s in stages if isinstance(s, SampleStage))
    total = total_steps(stages, request.steps or 30)
    if total > limits.max_steps * samples:
        problems.append({"field": field, "message": f"{total} steps in all exceed {limits.max_steps} x {samples} sample stages"})
    return problems


def control_image_text(request: "GenerateRequest") -> str | None:
    """The control image a request sends inline (base64), if any; a plan has one control image."""
    units = [request.controlnet] + [s.controlnet for s in request.stages or [] if isinstance(s, SampleStage)]
    return next((u.image for u in units if u is not None and u.image is not None), None)


def without_control_image(request: "GenerateRequest") -> "GenerateRequest":
    """The request with its inline control images taken out (they travel as an upload)."""
    update: dict[str, Any] = {}
    if request.controlnet is not None:
        update["controlnet"] = request.controlnet.model_copy(update={"image": None})
    if request.stages:
        update["stages"] = [
            s.model_copy(update={"controlnet": s.controlnet.model_copy(update={"image": None})})
            if isinstance(s, SampleStage) and s.controlnet is not None else s
            for s in request.stages
        ]
    return request.model_copy(update=update)


def controlnet_names(request: "GenerateRequest") -> list[str]:
    """The ControlNets a request's plan uses."""
    return sorted({s.controlnet.model for s in expand(request) if isinstance(s, SampleStage) and s.controlnet is not None})


def uses_refiner(request: "GenerateRequest") -> bool:
    return any(isinstance(s, SampleStage) and s.model == "refiner" for s in expand(request)) if is_plan(request) else request.use_refiner
