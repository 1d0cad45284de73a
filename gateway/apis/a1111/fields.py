"""This service's request for an A1111 txt2img or img2img body: its fields mapped (batch_size x n_iter
jobs with seeds seed, seed+1, ..., a random first seed for -1; the sampler, the model, LoRA tags in the
prompt, the hires fix and ControlNet), checked as a native request is, before the init image is touched."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.apis.a1111.failures import from_request_invalid, invalid
from gateway.apis.a1111.init_image import init_fields
from gateway.apis.a1111.inpaint import PasteBack
from gateway.apis.a1111.options import model_of
from gateway.apis.a1111.plans import controlnet_of, hires_of
from gateway.apis.a1111.prompt import TagProblem, loras_of
from gateway.apis.a1111.refusals import parse_body, refuse_unoffered, refuse_unoffered_img2img
from gateway.apis.a1111.samplers import eta_of, scheduler_of
from gateway.core.service import JobService
from gateway.http.views.a1111 import A1111Img2ImgRequest, A1111Txt2ImgRequest
from schemas.job import new_seed
from schemas.request import GenerateRequest, RequestInvalid, parse_request


@dataclass(frozen=True)
class Generation:
    """An A1111 body read: this service's request for it, and what the answer's `info` reports of it."""

    ask: A1111Txt2ImgRequest
    base: GenerateRequest
    model: str | None  # the model asked in override_settings; None: the current one
    sampler: str  # the sampler's A1111 name
    schedule: str  # the schedule's label
    extra: dict  # the hires fix's and ControlNet's infotext entries
    paste_back: PasteBack | None  # how the answer's images are made from the jobs' ("only masked" inpainting)


async def generation_of(jobs: JobService, body: object, kind: type[A1111Txt2ImgRequest]) -> Generation:
    """The body read, mapped and checked, every field before the init image is touched."""
    ask = parse_body(body, kind)
    refuse_unoffered(ask)
    img2img = isinstance(ask, A1111Img2ImgRequest)
    if img2img:
        refuse_unoffered_img2img(ask)
    scheduler, sampler, schedule = scheduler_of(ask)
    model = model_of(jobs, ask.override_settings)
    limits = jobs.settings.limits
    fields = request_fields(ask, scheduler, model, limits)
    if img2img and ask.enable_hr:
        raise invalid("enable_hr", "the hires fix is txt2img's; img2img runs at the size asked")
    hires, hires_params = (None, {}) if img2img else hires_of(ask, invalid)
    controlnet, controlnet_params = controlnet_of(ask.alwayson_scripts, invalid)
    fields.update({k: v for k, v in (("hires", hires), ("controlnet", controlnet)) if v is not None})
    base = checked(fields, limits)  # every field checked before the init image is touched
    paste_back = None
    if img2img:
        init, paste_back = await init_fields(ask, base, limits)
        base = checked({**fields, **init}, limits)
    return Generation(ask=ask, base=base, model=model, sampler=sampler, schedule=schedule,
                      extra={**hires_params, **controlnet_params}, paste_back=paste_back)


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
