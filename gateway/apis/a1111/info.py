"""The `info` of a txt2img or img2img answer, as A1111 writes it (JSON text): the prompts, the seeds, the
size made, the sampler, steps, CFG scale and model used, the job ids (made and cancelled), and one
A1111-style infotext per image."""

from __future__ import annotations

import time

from gateway.apis.a1111.fields import Generation
from gateway.apis.a1111.init_image import mask_settings
from gateway.apis.a1111.inpaint import MaskSettings
from gateway.core.problems import UnknownJob
from gateway.core.service import JobService
from gateway.http.views.a1111 import A1111Img2ImgRequest
from schemas.request import GenerateRequest
from schemas.status import JobState, JobStatus
from schemas.version import __version__


async def info_of(jobs: JobService, asked: Generation, finished: list[JobStatus], owner: str | None) -> dict:
    """A1111's `info` for the request's jobs, once they all ended; the cancelled ones are named apart."""
    ask, base = asked.ask, asked.base
    made = [status for status in finished if status.state is JobState.DONE]
    cancelled = [status.job_id for status in finished if status.state is JobState.CANCELLED]
    job_ids = [status.job_id for status in made]
    used_model = asked.model or await jobs.current_model()
    workers = jobs.served_models().get(used_model or "", [])  # after the wait: the workers that ran the jobs
    steps = base.steps or (workers[0].default_steps if workers else None)
    cfg = base.guidance if base.guidance is not None else (workers[0].default_guidance if workers else None)
    seeds = [status.seed for status in made]
    if asked.paste_back is not None:
        width, height = asked.paste_back.original.size
    else:
        width, height = await made_size(jobs, job_ids[0], owner, base) if made else (base.width, base.height)
    inpainting = mask_settings(ask) if isinstance(ask, A1111Img2ImgRequest) and ask.mask is not None else None
    n = len(job_ids)
    return {
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
        "sampler_name": asked.sampler,
        "scheduler": asked.schedule,
        "cfg_scale": cfg,
        "steps": steps,
        "batch_size": ask.batch_size,
        "restore_faces": False,
        "sd_model_name": used_model,
        "denoising_strength": base.strength if base.init_image else (base.hires.denoise if base.hires else None),
        "extra_generation_params": asked.extra,
        "index_of_first_image": 0,
        "infotexts": [
            infotext(base, seed=s, size=(width, height), steps=steps, cfg=cfg, sampler=asked.sampler, schedule=asked.schedule,
                     model=used_model, prompt=ask.prompt, inpainting=inpainting, params=asked.extra)
            for s in seeds
        ],
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": 1,
        "version": f"imagegen {__version__}",
        "job_ids": job_ids,
        "cancelled_job_ids": cancelled,
    }


async def made_size(jobs: JobService, job_id: str, owner: str | None, base: GenerateRequest) -> tuple[int, int]:
    """The size the images came out at (with an init image and no size asked, the image's own)."""
    try:
        image = (await jobs.get(job_id, owner=owner)).image
    except UnknownJob:
        image = None
    return (image.width, image.height) if image is not None else (base.width, base.height)


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
