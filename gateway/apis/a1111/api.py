"""AUTOMATIC1111 web UI's API on the gateway (`/sdapi/v1`), for the tools built to call it: text to
image, image to image and inpainting, LoRA tags in prompts (`gateway.apis.a1111.prompt`), progress with a
live preview, interrupt and skip, the models, LoRAs and samplers, and the current model.

`POST /sdapi/v1/txt2img` makes batch_size x n_iter jobs (seeds seed, seed+1, ...; a random first seed for
-1), queued as one group through `gateway.core.submission` like a native request with `n`, and answers once
all are done with their PNGs in base64, the request as sent (`parameters`) and `info` (JSON text with
the seeds, size, sampler, steps, model, job ids and A1111-style infotexts). Fields left out take the
served model's defaults. Features this service does not offer (the hires fix, face restoration,
tiling, variation seeds, styles, scripts, sampler noise settings) are accepted only at their "off"
values, as A1111's own clients send them; anything else is refused by name, never ignored. `eta` is
DDIM's noise, as in A1111; the ancestral samplers run at A1111's default eta 1 and the others ignore it.

`POST /sdapi/v1/img2img` adds one init image and `denoising_strength` (A1111's 0.75 when absent). Resize
mode 0 (A1111's default, "just resize") is done here, before queueing: the image is stretched to the
width and height asked; mode 1 ("crop and resize") is the engine's own fitting. With a `mask` it
inpaints, with A1111's mask settings and its "only masked" area (`gateway.apis.a1111.inpaint`).

`POST /sdapi/v1/interrupt` cancels the caller's newest unfinished request (the job in hand stops at its
next step, the queued ones are dropped) and `POST /sdapi/v1/skip` only its job in hand; the waiting
txt2img or img2img call then answers with the images made, as A1111 does.

Errors come in FastAPI's shape, as A1111's do: 422 `{"detail": [{"loc": ["body", field], "msg", "type"}]}`
for a bad field, `{"detail": message}` otherwise (403/429 for the API key's limits, 502 when a job
failed on a worker, 503 while NATS is away, 504 after WAIT_S).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import time
from dataclasses import dataclass

from aiohttp import web
from PIL import Image
from pydantic import ValidationError

from gateway.apis.a1111.inpaint import MaskSettings, PasteBack, b64png
from gateway.apis.a1111.inpaint import prepare as prepare_inpainting
from gateway.apis.a1111.plans import controlnet_of, hires_of
from gateway.apis.a1111.prompt import TagProblem, loras_of
from gateway.state.event_hub import decoded_event
from gateway.http.body import takes_images
from gateway.http.http_errors import read_json
from gateway.core.problems import Problem, UnknownJob, classify
from gateway.core.records import UNFINISHED
from gateway.core.service import JobService
from gateway.core.caller import SERVICE, caller, owner_of
from gateway.core.waiting import image_data, until_done
from gateway.core.caller import tier_for
from gateway.core.submission import group_jobs
from schemas.version import __version__
from gateway.http.views.a1111 import A1111Img2ImgRequest, A1111Txt2ImgRequest
from schemas.job import new_seed
from schemas.request import GenerateRequest, RequestInvalid, parse_request
from schemas.status import JobState, JobStatus
from schemas.uploads import decode_upload

log = logging.getLogger("imagegen.gateway.a1111")
routes = web.RouteTableDef()

WAIT_S = 600.0


@dataclass(frozen=True)
class Sampler:
    name: str
    aliases: tuple[str, ...]
    uniform: str  # this service's scheduler for the Uniform schedule
    karras: str | None = None  # and for Karras, where it has one
    automatic: str | None = ""  # for Automatic: "" the uniform one, None not available


SAMPLERS = (
    Sampler("Euler", ("k_euler",), "euler"),
    Sampler("Euler a", ("k_euler_a", "k_euler_ancestral"), "euler_a"),
    # A1111 runs DPM++ 2M on the Karras schedule when the schedule is Automatic.
    Sampler("DPM++ 2M", ("k_dpmpp_2m",), "dpmpp_2m", "dpmpp_2m_karras", automatic="dpmpp_2m_karras"),
    # ... and DPM++ 2M SDE on the exponential one, which is not available here.
    Sampler("DPM++ 2M SDE", ("k_dpmpp_2m_sde",), "dpmpp_2m_sde", "dpmpp_2m_sde_karras", automatic=None),
    Sampler("DDIM", ("ddim",), "ddim"),
    Sampler("UniPC", ("unipc",), "unipc"),
    Sampler("DEIS", ("deis",), "deis"),
)
OLD_KARRAS_NAMES = {"dpm++ 2m karras": "DPM++ 2M", "dpm++ 2m sde karras": "DPM++ 2M SDE"}  # before A1111 1.9
SCHEDULES = {"automatic": "Automatic", "uniform": "Uniform", "karras": "Karras"}
# A1111 settings its clients send along with the model (in override_settings, or to /sdapi/v1/options),
# accepted at the values that change nothing here.
SETTINGS_AT_DEFAULT: dict[str, tuple] = {"CLIP_stop_at_last_layers": (1,), "sd_vae": ("Automatic", "None", "", None)}

# Fields of features not offered, and the values that leave them off.
OFF_VALUES: dict[str, tuple] = {
    "subseed_strength": (None, 0),
    "seed_resize_from_h": (None, -1, 0),
    "seed_resize_from_w": (None, -1, 0),
    "styles": (None, []),
    "restore_faces": (None, False),
    "tiling": (None, False),
    "s_min_uncond": (None, 0),
    "s_churn": (None, 0),
    "s_tmax": (None, 0),
    "s_tmin": (None, 0),
    "s_noise": (None, 1),
    "script_name": (None, ""),
    "script_args": (None, []),
    "infotext": (None, ""),
    "firstpass_image": (None, ""),
}
WHY_OFF = {
    "restore_faces": "face restoration is not offered here",
    "tiling": "tiling is not offered here",
    "subseed_strength": "variation seeds are not offered here",
    "styles": "saved styles are not offered here; put the style in the prompt",
    "script_name": "scripts are not offered here",
    "script_args": "scripts are not offered here",
    "infotext": "reading settings from an infotext is not offered here; send the fields",
}
# This service's request fields, by the A1111 field they come from.
A1111_FIELD = {"guidance": "cfg_scale", "n": "batch_size", "scheduler": "sampler_name", "model": "override_settings",
               "use_refiner": "refiner_checkpoint", "refiner_split": "refiner_switch_at", "format": "body",
               "init_image": "init_images", "strength": "denoising_strength", "mask_image": "mask",
               "loras": "prompt", "eta": "eta", "hires": "enable_hr", "controlnet": "alwayson_scripts"}
# Samplers whose noise A1111 scales by eta: DDIM's (eta 0 by default) and the ancestral ones (1). Here
# DDIM takes any eta, the ancestral ones run at 1 only; the others ignore it, as A1111 does.
ETA_ANCESTRAL = {"euler_a": "Euler a", "dpmpp_2m_sde": "DPM++ 2M SDE", "dpmpp_2m_sde_karras": "DPM++ 2M SDE"}
IMG2IMG_STRENGTH = 0.75  # A1111's denoising_strength when a request leaves it out
MAX_MASK_BLUR, MAX_PADDING = 64, 256  # pixels, the ranges of A1111's own controls


class A1111Failure(Exception):
    """An answer in FastAPI's error shape, as A1111's API gives them."""

    def __init__(self, status: int, message: str, *, field: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers

    def response(self) -> web.Response:
        if self.status == 422:
            loc = ["body"] if self.field in (None, "body") else ["body", self.field]
            detail: object = [{"loc": loc, "msg": self.message, "type": "value_error"}]
        else:
            detail = self.message
        return web.json_response({"detail": detail}, status=self.status, headers=self.headers)


def invalid(field: str | None, message: str) -> A1111Failure:
    return A1111Failure(422, f"{field}: {message}" if field and field != "body" else message, field=field)


def from_request_invalid(exc: RequestInvalid) -> A1111Failure:
    """A request this service refused, under the A1111 names of its fields."""
    errors = exc.errors or [{"field": "body", "message": str(exc)}]
    named = [(A1111_FIELD.get(e["field"], e["field"]), e["message"]) for e in errors]
    return A1111Failure(422, "; ".join(f"{field}: {message}" for field, message in named), field=named[0][0])


def parse_body(body: object, kind: type[A1111Txt2ImgRequest]) -> A1111Txt2ImgRequest:
    if not isinstance(body, dict):
        raise invalid("body", "the body must be a JSON object")
    try:
        return kind.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "body"
        if err["type"] == "extra_forbidden":
            what = "img2img" if kind is A1111Img2ImgRequest else "txt2img"
            raise invalid(field, f"not a field of {what} here (see /openapi.json)") from None
        raise invalid(field, err["msg"].removeprefix("Value error, ")) from None


def refuse_unoffered(ask: A1111Txt2ImgRequest) -> None:
    for field, off in OFF_VALUES.items():
        value = getattr(ask, field)
        if value not in off:
            why = WHY_OFF.get(field, "only its default is accepted here")
            raise invalid(field, f"{why} (got {value!r})")


def refuse_unoffered_img2img(ask: A1111Img2ImgRequest) -> None:
    if ask.include_init_images:
        raise invalid("include_init_images", "only false: the answer carries the generated images only")
    if ask.resize_mode not in (None, 0, 1):
        raise invalid("resize_mode", f"only 0 (just resize) and 1 (crop and resize) are offered here, got {ask.resize_mode!r}")
    if len(ask.init_images or []) != 1:
        raise invalid("init_images", f"exactly one image is needed here, got {len(ask.init_images or [])}")
    if ask.mask is None:  # the mask settings are unused without a mask, as in A1111
        return
    if ask.inpainting_fill not in (None, 0, 1):
        raise invalid(
            "inpainting_fill",
            f"only 0 (fill) and 1 (original) are offered here, got {ask.inpainting_fill!r}; "
            "for new content where the mask is, send one of them with denoising_strength 1",
        )
    if ask.inpainting_mask_invert not in (None, 0, 1):
        raise invalid("inpainting_mask_invert", f"0 (inpaint the white part) or 1 (the black part), got {ask.inpainting_mask_invert!r}")
    for field, most in (("mask_blur", MAX_MASK_BLUR), ("mask_blur_x", MAX_MASK_BLUR), ("mask_blur_y", MAX_MASK_BLUR),
                        ("inpaint_full_res_padding", MAX_PADDING)):
        value = getattr(ask, field)
        if value is not None and not 0 <= value <= most:
            raise invalid(field, f"pixels, 0..{most}, got {value!r}")
    if ask.initial_noise_multiplier not in (None, 1, 1.0):
        raise invalid("initial_noise_multiplier", f"only 1 (the noise as the sampler draws it) is offered here, got {ask.initial_noise_multiplier!r}")
    if ask.latent_mask is not None:
        raise invalid("latent_mask", "a second mask for the latents is not offered here; the mask serves both")


def mask_settings(ask: A1111Img2ImgRequest) -> MaskSettings:
    """A1111's inpainting settings, its defaults for those left out."""
    blur_x = ask.mask_blur if ask.mask_blur is not None else ask.mask_blur_x
    blur_y = ask.mask_blur if ask.mask_blur is not None else ask.mask_blur_y
    return MaskSettings(
        invert=ask.inpainting_mask_invert == 1,
        round=ask.mask_round is not False,
        blur_x=4 if blur_x is None else blur_x,
        blur_y=4 if blur_y is None else blur_y,
        fill=ask.inpainting_fill in (None, 0),
        only_masked=ask.inpaint_full_res is not False,
        padding=ask.inpaint_full_res_padding or 0,
    )


def stretched(text: str, width: int, height: int, limits) -> str:
    """The init image resized to width x height regardless of its aspect ratio (A1111's resize mode 0),
    as base64 PNG. In a thread: decoding, resizing and encoding take tens of milliseconds."""
    upload = decode_upload("init_images", text, limits)
    return b64png(upload.image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS))


async def init_fields(ask: A1111Img2ImgRequest, base: GenerateRequest, limits) -> tuple[dict, PasteBack | None]:
    """The init image, its strength and, for inpainting, the mask, for `base` (the request checked without
    them), and how the answer's images are made from the jobs' when only the masked part is inpainted.
    Resize mode 0 with both sides given stretches the image to them here; otherwise the engine's own
    fitting applies (scaled and centre-cropped to both sides, or the image's own size and aspect ratio)."""
    strength = {"strength": ask.denoising_strength if ask.denoising_strength is not None else IMG2IMG_STRENGTH}
    stretch = ask.resize_mode in (None, 0) and ask.width is not None and ask.height is not None
    loop = asyncio.get_running_loop()
    try:
        if ask.mask is not None:
            inpainting = await loop.run_in_executor(None, functools.partial(
                prepare_inpainting, ask.init_images[0], ask.mask, mask_settings(ask),
                width=base.width, height=base.height, stretch=stretch, limits=limits,
            ))
            return {**inpainting.fields, **strength}, inpainting.paste_back
        init = ask.init_images[0]
        if stretch:
            init = await loop.run_in_executor(None, stretched, init, base.width, base.height, limits)
    except RequestInvalid as exc:
        raise from_request_invalid(exc) from None
    return {"init_image": init, **strength}, None


def scheduler_of(ask: A1111Txt2ImgRequest) -> tuple[str, str, str]:
    """(this service's scheduler, the sampler's A1111 name, the schedule's label)."""
    asked = ask.sampler_name or ask.sampler_index or "Euler"
    field = "sampler_name" if ask.sampler_name else "sampler_index" if ask.sampler_index else "sampler_name"
    schedule = (ask.scheduler or "automatic").strip().lower()
    key = asked.strip().lower()
    if key in OLD_KARRAS_NAMES:
        key, schedule = OLD_KARRAS_NAMES[key].lower(), "karras"
    sampler = next((s for s in SAMPLERS if key == s.name.lower() or key in s.aliases), None)
    if sampler is None:
        names = ", ".join(s.name for s in SAMPLERS)
        raise invalid(field, f"{asked!r} is not available here; one of {names} (GET /sdapi/v1/samplers)")
    if schedule not in SCHEDULES:
        raise invalid("scheduler", f"{ask.scheduler!r} is not available here; one of {', '.join(SCHEDULES.values())}")
    if schedule == "karras":
        if sampler.karras is None:
            raise invalid("scheduler", f"Karras is not available with {sampler.name} here; use Automatic or Uniform")
        return sampler.karras, sampler.name, SCHEDULES[schedule]
    if schedule == "automatic":
        if sampler.automatic is None:
            raise invalid(
                "scheduler", f"{sampler.name}'s automatic schedule (exponential) is not available here; ask for Karras or Uniform"
            )
        return sampler.automatic or sampler.uniform, sampler.name, SCHEDULES[schedule]
    return sampler.uniform, sampler.name, SCHEDULES[schedule]


def settings_problem(settings: dict) -> tuple[str, str] | None:
    """(the setting, why) for the first A1111 setting other than sd_model_checkpoint that is not at its
    default (A1111's clients send some of them along); None when there is none."""
    for name, value in settings.items():
        if name == "sd_model_checkpoint":
            continue
        if name not in SETTINGS_AT_DEFAULT:
            return name, "only sd_model_checkpoint can be set here"
        if value not in SETTINGS_AT_DEFAULT[name]:
            allowed = " or ".join(repr(v) for v in SETTINGS_AT_DEFAULT[name])
            return name, f"only its default ({allowed}) is accepted here, got {value!r}"
    return None


def model_of(jobs: JobService, overrides: dict | None) -> str | None:
    if not overrides:
        return None
    if (problem := settings_problem(overrides)) is not None:
        raise invalid("override_settings", f"{problem[0]}: {problem[1]}")
    if "sd_model_checkpoint" not in overrides:
        return None
    model = overrides["sd_model_checkpoint"]
    served = jobs.served_models()
    if not isinstance(model, str) or model not in served:
        known = ", ".join(sorted(served)) or "none (no worker is running)"
        raise invalid("override_settings", f"sd_model_checkpoint: unknown model {model!r}; served: {known}")
    return model


def eta_of(eta: float | None, scheduler: str) -> float | None:
    """The request's eta for `scheduler`, as A1111 uses it: DDIM's noise; an ancestral sampler's, which
    runs at 1 here (A1111's default for them); ignored by the other samplers, as in A1111."""
    if eta is None:
        return None
    if scheduler == "ddim":
        return eta
    if scheduler in ETA_ANCESTRAL and eta != 1:
        raise invalid("eta", f"{ETA_ANCESTRAL[scheduler]} runs with eta 1 here (A1111's default for it), got {eta!r}; "
                             "DDIM takes any eta from 0 to 1")
    return None


def request_fields(ask: A1111Txt2ImgRequest, scheduler: str, model: str | None, limits) -> dict:
    """This service's request fields for an A1111 request (its init image apart)."""
    if ask.batch_size * ask.n_iter > limits.max_images:
        raise invalid(
            "batch_size",
            f"batch_size x n_iter is {ask.batch_size * ask.n_iter} images, over the limit of {limits.max_images} per request",
        )
    random_seed = ask.seed is None or ask.seed == -1
    try:
        prompt, loras = loras_of(ask.prompt)
    except TagProblem as exc:
        raise invalid("prompt", str(exc)) from None
    fields: dict = {
        "prompt": prompt,
        "format": "PNG",
        "n": ask.batch_size * ask.n_iter,
        "seed": new_seed() if random_seed else ask.seed,
        "scheduler": scheduler,
    }
    optional = {
        "negative_prompt": ask.negative_prompt,
        "steps": ask.steps,
        "guidance": ask.cfg_scale,
        "width": ask.width,
        "height": ask.height,
        "model": model,
        "use_refiner": True if ask.refiner_checkpoint else None,
        "refiner_split": ask.refiner_switch_at if ask.refiner_checkpoint else None,
        "cache": False if random_seed else None,  # a seed picked here never repeats: not worth caching
        "loras": loras or None,
        "eta": eta_of(ask.eta, scheduler),
    }
    if ask.refiner_switch_at is not None and not ask.refiner_checkpoint:
        raise invalid("refiner_switch_at", "needs refiner_checkpoint")
    fields.update({k: v for k, v in optional.items() if v is not None})
    return fields


def checked(fields: dict, limits) -> GenerateRequest:
    try:
        return parse_request(fields, limits=limits)
    except RequestInvalid as exc:
        raise from_request_invalid(exc) from None


def infotext(
    base: GenerateRequest, *, seed: int, size: tuple[int, int], steps: int | None, cfg: float | None, sampler: str, schedule: str,
    model: str | None, prompt: str, inpainting: MaskSettings | None = None, params: dict | None = None,
) -> str:
    lines = [prompt]
    if base.negative_prompt:
        lines.append(f"Negative prompt: {base.negative_prompt}")
    settings = [f"Steps: {steps}", f"Sampler: {sampler}", f"Schedule type: {schedule}", f"CFG scale: {cfg:g}" if cfg is not None else "CFG scale: the model's", f"Seed: {seed}",
                f"Size: {size[0]}x{size[1]}", f"Model: {model}", f"Version: imagegen {__version__}"]
    if base.init_image:
        settings.insert(-2, f"Denoising strength: {base.strength:g}")
    if base.use_refiner:
        settings.insert(-1, f"Refiner switch at: {base.refiner_split:g}")
    if inpainting is not None:  # in A1111's words
        blur = inpainting.blur_x if inpainting.blur_x == inpainting.blur_y else f"{inpainting.blur_x}x{inpainting.blur_y}"
        extra = [f"Mask blur: {blur}", f"Masked content: {'fill' if inpainting.fill else 'original'}"]
        if inpainting.invert:
            extra.append("Mask mode: Inpaint not masked")
        if inpainting.only_masked:
            extra += ["Inpaint area: Only masked", f"Masked area padding: {inpainting.padding}"]
        settings[-2:-2] = extra
    if params:  # the hires fix's and ControlNet's, as A1111 writes them
        settings[-2:-2] = [f"{key}: {value}" for key, value in params.items()]
    return "\n".join([*lines, ", ".join(settings)])


async def made_size(jobs: JobService, job_id: str, owner: str | None, base: GenerateRequest) -> tuple[int, int]:
    """The size the images came out at (with an init image and no size asked, the image's own)."""
    try:
        image = (await jobs.get(job_id, owner=owner)).image
    except UnknownJob:
        image = None
    return (image.width, image.height) if image is not None else (base.width, base.height)


async def run_generation(request: web.Request, kind: type[A1111Txt2ImgRequest]) -> web.Response:
    jobs = request.app[SERVICE]
    body = await read_json(request)
    ask = parse_body(body, kind)
    refuse_unoffered(ask)
    if isinstance(ask, A1111Img2ImgRequest):
        refuse_unoffered_img2img(ask)
    scheduler, sampler, schedule = scheduler_of(ask)
    model = model_of(jobs, ask.override_settings)
    limits = jobs.settings.limits
    fields = request_fields(ask, scheduler, model, limits)
    if isinstance(ask, A1111Img2ImgRequest) and ask.enable_hr:
        raise invalid("enable_hr", "the hires fix is txt2img's; img2img runs at the size asked")
    hires, hires_params = (None, {}) if isinstance(ask, A1111Img2ImgRequest) else hires_of(ask, invalid)
    controlnet, controlnet_params = controlnet_of(ask.alwayson_scripts, invalid)
    extra = {**hires_params, **controlnet_params}
    fields.update({k: v for k, v in (("hires", hires), ("controlnet", controlnet)) if v is not None})
    base = checked(fields, limits)  # every field checked before the init image is touched
    paste_back = None
    if isinstance(ask, A1111Img2ImgRequest):
        init, paste_back = await init_fields(ask, base, limits)
        base = checked({**fields, **init}, limits)
    who = caller(request)
    owner = who.get("owner")
    if (tier := tier_for(who.get("key"))) is not None:
        base = base.model_copy(update={"tier": tier})
    started = time.monotonic()

    async def collect(finished: list[JobStatus]) -> list[str]:
        if ask.send_images is False:
            return []
        images = []
        for status in finished:
            if status.state is JobState.DONE:
                data = await image_data(jobs, status.job_id, owner)
                if paste_back is not None:  # only the masked part was made: put it back into the init image
                    data = await asyncio.get_running_loop().run_in_executor(None, paste_back.apply, data)
                images.append(base64.b64encode(data).decode("ascii"))
        return images

    # Jobs cancelled meanwhile (/sdapi/v1/interrupt, /sdapi/v1/skip, DELETE /v1/jobs/{id}) are left out
    # of the answer, as A1111 answers an interrupted batch with the images it made.
    finished, images = await until_done(jobs, base, who, collect, wait_s=WAIT_S, keep_cancelled=True)
    made = [status for status in finished if status.state is JobState.DONE]
    cancelled = [status.job_id for status in finished if status.state is JobState.CANCELLED]
    job_ids = [status.job_id for status in made]
    used_model = model or await jobs.current_model()
    workers = jobs.served_models().get(used_model or "", [])  # after the wait: the workers that ran the jobs
    steps = base.steps or (workers[0].default_steps if workers else None)
    cfg = base.guidance if base.guidance is not None else (workers[0].default_guidance if workers else None)
    seeds = [status.seed for status in made]
    if paste_back is not None:
        width, height = paste_back.original.size
    else:
        width, height = await made_size(jobs, job_ids[0], owner, base) if made else (base.width, base.height)
    log.info(
        "%s %s: %d done, %d cancelled, in %.1fs, %dx%d", "img2img" if base.init_image else "txt2img",
        ",".join(s.job_id for s in finished), len(made), len(cancelled), time.monotonic() - started, width, height,
    )
    n = len(job_ids)
    info = {
        "prompt": ask.prompt,
        "all_prompts": [ask.prompt] * n,
        "negative_prompt": base.negative_prompt,
        "all_negative_prompts": [base.negative_prompt] * n,
        "seed": seeds[0] if seeds else finished[0].seed,
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * n,
        "subseed_strength": 0,
        "width": width,
        "height": height,
        "sampler_name": sampler,
        "scheduler": schedule,
        "cfg_scale": cfg,
        "steps": steps,
        "batch_size": ask.batch_size,
        "restore_faces": False,
        "sd_model_name": used_model,
        "denoising_strength": base.strength if base.init_image else (base.hires.denoise if base.hires else None),
        "extra_generation_params": extra,
        "index_of_first_image": 0,
        "infotexts": [
            infotext(base, seed=s, size=(width, height), steps=steps, cfg=cfg, sampler=sampler, schedule=schedule, model=used_model,
                     prompt=ask.prompt, inpainting=mask_settings(ask) if isinstance(ask, A1111Img2ImgRequest) and ask.mask is not None else None,
                     params=extra)
            for s in seeds
        ],
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": 1,
        "version": f"imagegen {__version__}",
        "job_ids": job_ids,
        "cancelled_job_ids": cancelled,
    }
    return web.json_response({"images": images, "parameters": body, "info": json.dumps(info)})


async def answered(run, request: web.Request) -> web.Response:
    """`run(request)`, with every failure in FastAPI's shape."""
    try:
        return await run(request)
    except A1111Failure as exc:
        return exc.response()
    except RequestInvalid as exc:
        return from_request_invalid(exc).response()
    except web.HTTPRequestEntityTooLarge as exc:
        return A1111Failure(413, f"body too large: {exc.text}").response()
    except Exception as exc:
        if (problem := classify(exc)) is None:
            raise
        return from_problem(problem, exc).response()


def from_problem(problem: Problem, exc: BaseException) -> A1111Failure:
    """A neutral Problem in FastAPI's shape: a job that failed over a field of its request is a 422
    naming the A1111 field; the rest keep their status, with Retry-After when advised."""
    if problem.status == 503:
        log.warning("sdapi request: broker unavailable: %s", exc)
    if problem.status == 400 and problem.field is not None:
        return invalid(A1111_FIELD.get(problem.field, problem.field), problem.message)
    headers = None if problem.retry_after_s is None else {"Retry-After": str(problem.retry_after_s)}
    return A1111Failure(problem.status, problem.message, headers=headers)


@routes.post("/sdapi/v1/txt2img")
async def txt2img(request: web.Request) -> web.Response:
    return await answered(lambda r: run_generation(r, A1111Txt2ImgRequest), request)


@routes.post("/sdapi/v1/img2img")
@takes_images
async def img2img(request: web.Request) -> web.Response:
    return await answered(lambda r: run_generation(r, A1111Img2ImgRequest), request)


async def newest_request(jobs: JobService, owner: str | None) -> list[JobStatus]:
    """The jobs of the caller's newest request with a job still unfinished (with API keys, the key's own;
    without, anyone's, as A1111 serves one user), in their order; empty when there is none."""
    newest = jobs.page(owner=owner, states=UNFINISHED, limit=1)
    if not newest:
        return []
    if not newest[0].group_id:
        return newest
    try:
        return await group_jobs(jobs, newest[0].group_id, owner=owner)
    except UnknownJob:  # deleted meanwhile
        return newest


def in_hand(members: list[JobStatus]) -> JobStatus:
    """The request's job being made, or next to be: its first unfinished one."""
    return next((m for m in members if not m.state.final), members[-1])


async def latest_preview(jobs: JobService, job_id: str) -> str | None:
    """The newest preview its worker sent for the job, as base64 JPEG; None before the first."""
    stored = await jobs.events.stored(job_id) or []
    for _, data in reversed(stored):
        event = decoded_event(data)
        if event is not None and event.type == "preview" and event.preview:
            return base64.b64encode(event.preview).decode("ascii")
    return None


@routes.get("/sdapi/v1/progress")
async def progress(request: web.Request) -> web.Response:
    """The progress of the caller's newest unfinished request: its jobs' steps done over their steps, the
    seconds still expected, the job in hand, and that job's newest preview as `current_image` (unless
    `skip_current_image=true`)."""
    jobs = request.app[SERVICE]
    members = await newest_request(jobs, owner_of(request))
    state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
             "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
    if not members:
        return web.json_response({"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None})
    done = sum(1.0 if m.state.final else (m.step / m.total_steps if m.total_steps else 0.0) for m in members)
    current = in_hand(members)
    etas = [eta for m in members if (eta := jobs.eta(m)) is not None]
    state |= {
        "interrupted": current.cancel_requested,
        "job": current.job_id,
        "job_count": len(members),
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(members[0].submitted_at)),
        "job_no": members.index(current),
        "sampling_step": current.step,
        "sampling_steps": current.total_steps or 0,
    }
    if current.state is JobState.QUEUED:
        textinfo = f"queued, {jobs.position(current)} ahead"
    else:
        textinfo = f"step {current.step} of {current.total_steps or '?'}"
    skip_image = request.query.get("skip_current_image", "false").lower() in ("true", "1")
    image = None if skip_image or current.state is not JobState.RUNNING else await latest_preview(jobs, current.job_id)
    return web.json_response({
        "progress": round(done / len(members), 4),
        "eta_relative": round(max(etas, default=0.0), 3),
        "state": state,
        "current_image": image,
        "textinfo": textinfo,
    })


async def run_interrupt(request: web.Request) -> web.Response:
    jobs = request.app[SERVICE]
    owner = owner_of(request)
    members = await newest_request(jobs, owner)
    await jobs.cancel_each([m.job_id for m in members if not m.state.final], owner=owner)
    return web.json_response({})


async def run_skip(request: web.Request) -> web.Response:
    jobs = request.app[SERVICE]
    owner = owner_of(request)
    members = await newest_request(jobs, owner)
    if members:
        await jobs.cancel_each([in_hand(members).job_id], owner=owner)
    return web.json_response(None)


@routes.post("/sdapi/v1/interrupt")
async def interrupt(request: web.Request) -> web.Response:
    """Stops the caller's newest unfinished request: its job in hand stops at its next step and its queued
    jobs are dropped; its txt2img or img2img call answers with the images made before."""
    return await answered(run_interrupt, request)


@routes.post("/sdapi/v1/skip")
async def skip(request: web.Request) -> web.Response:
    """Drops the job in hand of the caller's newest unfinished request; the request goes on with the next."""
    return await answered(run_skip, request)


@routes.get("/sdapi/v1/loras")
async def lora_list(request: web.Request) -> web.Response:
    """The LoRA adapters the current model's workers loaded (`--lora NAME=SOURCE`), for `<lora:NAME:WEIGHT>`."""
    jobs = request.app[SERVICE]
    names = jobs.loaded_loras(await jobs.current_model()) or set()
    return web.json_response([{"name": n, "alias": n, "path": n, "metadata": {}} for n in sorted(names)])


@routes.post("/sdapi/v1/refresh-loras")
async def refresh_loras(request: web.Request) -> web.Response:
    """Nothing to rescan: workers load their adapters at start, and /sdapi/v1/loras lists the live ones."""
    return web.json_response(None)


@routes.get("/sdapi/v1/samplers")
async def samplers(request: web.Request) -> web.Response:
    return web.json_response([{"name": s.name, "aliases": list(s.aliases), "options": {}} for s in SAMPLERS])


@routes.get("/sdapi/v1/schedulers")
async def schedulers(request: web.Request) -> web.Response:
    return web.json_response(
        [{"name": name, "label": label, "aliases": None, "default_rho": -1, "need_inner_model": False} for name, label in SCHEDULES.items()]
    )


@routes.get("/sdapi/v1/options")
async def get_options(request: web.Request) -> web.Response:
    return web.json_response({"sd_model_checkpoint": await request.app[SERVICE].current_model()})


async def run_set_options(request: web.Request) -> web.Response:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise invalid("body", "the body must be a JSON object")
    if (problem := settings_problem(body)) is not None:
        raise invalid(*problem)
    if "sd_model_checkpoint" not in body:  # only settings at their defaults: nothing to change
        return web.json_response(None)
    model = body["sd_model_checkpoint"]
    if not isinstance(model, str) or not model.strip():
        raise invalid("sd_model_checkpoint", "a model name is required (GET /sdapi/v1/sd-models)")
    try:
        await request.app[SERVICE].load_model(model.strip())
    except RequestInvalid as exc:
        raise invalid("sd_model_checkpoint", exc.errors[0]["message"] if exc.errors else str(exc)) from None
    return web.json_response(None)


@routes.post("/sdapi/v1/options")
async def set_options(request: web.Request) -> web.Response:
    return await answered(run_set_options, request)
