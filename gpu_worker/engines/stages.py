"""The stage runner: one job's plan (schemas/plan.py) run in order on the SDXL engine's loaded pipelines.

Latents stay in memory between stages. A sample stage picks its pipeline from what it starts from:
text to image from noise, image to image from earlier latents or an image (with `denoise` as strength,
or continuing a shared schedule from `start_step` for a hand-over), inpainting for a first stage with a
mask, the refiner's own pipeline for `model: refiner`, and the ControlNet variants of the base's when
the stage names a ControlNet. An upscale resizes the latents (torch interpolation) or the decoded
pixels (PIL). Progress counts over every stage's steps, so cancel lands between any two steps.
"""

from __future__ import annotations

import logging
from typing import Any

from PIL import Image

from gpu_worker.engines import controlnet
from gpu_worker.engines.base import GenerationTask, StepCallback, fit
from gpu_worker.errors import JobFailed
from schemas.plan import SampleStage, UpscaleStage, total_steps
from schemas.request import schedule_length

log = logging.getLogger("imagegen.worker.stages")

PIXEL_FILTERS = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                 "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}


def canny(image: Image.Image, *, low: int = 100, high: int = 200) -> Image.Image:
    """Canny-like edges with numpy only: Sobel gradients, thresholds with hysteresis by one dilation;
    white edges on black, as SDXL canny ControlNets take them."""
    import numpy as np

    grey = np.asarray(image.convert("L"), dtype=np.float32)
    padded = np.pad(grey, 1, mode="edge")
    gx = (padded[:-2, 2:] + 2 * padded[1:-1, 2:] + padded[2:, 2:]) - (padded[:-2, :-2] + 2 * padded[1:-1, :-2] + padded[2:, :-2])
    gy = (padded[2:, :-2] + 2 * padded[2:, 1:-1] + padded[2:, 2:]) - (padded[:-2, :-2] + 2 * padded[:-2, 1:-1] + padded[:-2, 2:])
    magnitude = np.hypot(gx, gy) / 4
    strong = magnitude >= high
    weak = magnitude >= low
    grown = np.pad(strong, 1)
    near = np.zeros_like(strong)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            near |= grown[dy:dy + strong.shape[0], dx:dx + strong.shape[1]]
    edges = strong | (weak & near)
    return Image.fromarray((edges * 255).astype(np.uint8), mode="L").convert("RGB")


def control_image(task: GenerationTask, stage: SampleStage, width: int, height: int) -> Image.Image:
    if task.control_image is None:
        raise JobFailed("controlnet: the plan names a ControlNet but the job carries no control image")
    image = fit(task.control_image, width, height, mode="RGB")
    unit = stage.controlnet
    return canny(image, low=unit.low_threshold, high=unit.high_threshold) if unit.preprocessor == "canny" else image


def run_plan(engine: Any, task: GenerationTask, on_step: StepCallback) -> Image.Image:
    """The image a staged task makes (in torch's inference mode, on the engine's pipelines)."""
    import torch
    import torch.nn.functional as F

    from gpu_worker.engines.schedulers import UnknownScheduler, make_scheduler

    stages = list(task.stages)
    total = total_steps(stages, task.steps, from_image=task.init_image is not None, strength=task.strength)
    done = 0

    def callback(pipe: Any, step: int, timestep: Any, kwargs: dict) -> dict:
        nonlocal done
        done += 1
        on_step(min(done, total), total, kwargs.get("latents"))
        return kwargs

    generator = torch.Generator(device="cpu").manual_seed(task.seed)
    factor = engine._base.vae_scale_factor
    width, height = task.width, task.height
    latents: Any = None
    image: Image.Image | None = fit(task.init_image, width, height, mode="RGB") if task.init_image is not None else None
    mask = fit(task.mask_image, width, height, mode="L") if task.mask_image is not None else None
    first_sample = True
    for index, stage in enumerate(stages):
        if isinstance(stage, UpscaleStage):
            width, height = stage.size(width, height)
            if stage.space == "latent":
                if latents is None:
                    raise JobFailed(f"stages.{index}: a latent upscale needs latents from a sample stage before it")
                mode = stage.method
                options = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
                latents = F.interpolate(latents.float(), size=(height // factor, width // factor), mode=mode, **options).to(latents.dtype)
            else:
                if latents is not None:
                    image, latents = engine._decoder.decode(latents, job_id=task.job_id), None
                image = image.convert("RGB").resize((width, height), PIXEL_FILTERS[stage.method])
            log.info("job %s: stage %d upscaled (%s, %s) to %dx%d", task.job_id, index, stage.space, stage.method, width, height)
            continue
        if stage.model == "refiner" and not engine.has_refiner:
            raise JobFailed(f"stages.{index}: this worker has no refiner loaded (start it with --refiner)")
        steps = stage.steps or task.steps
        try:
            scheduler = make_scheduler(stage.scheduler or task.scheduler, engine._scheduler_configs[stage.model])
        except UnknownScheduler as exc:
            raise JobFailed(f"stages.{index}: {exc}") from None
        call: dict[str, Any] = dict(
            prompt=task.prompt,
            negative_prompt=task.negative_prompt or None,
            guidance_scale=stage.guidance if stage.guidance is not None else task.guidance,
            generator=generator,
            callback_on_step_end=callback,
            output_type="latent",
            num_inference_steps=steps,
        )
        if task.eta is not None:
            call["eta"] = task.eta
        source = latents if latents is not None else image
        inpaint = first_sample and mask is not None and source is not None
        if stage.end_step is not None and stage.end_step < steps:
            call["denoising_end"] = stage.end_step / steps
        if source is not None:
            if stage.start_step is not None:
                call["denoising_start"] = stage.start_step / steps
            else:
                strength = stage.denoise if stage.denoise is not None else (task.strength if first_sample else 1.0)
                call["strength"] = strength
                call["num_inference_steps"] = schedule_length(steps, strength)
            call["image"] = source
            if inpaint:
                call.update(mask_image=mask, width=width, height=height)
        else:
            call.update(width=width, height=height)
            if stage.start_step:
                raise JobFailed(f"stages.{index}: start_step needs latents from a stage before it")
        if stage.controlnet is not None:
            if "denoising_start" in call or "denoising_end" in call:
                raise JobFailed(f"stages.{index}: a ControlNet stage runs its whole schedule here: drop start_step/end_step")
            if inpaint:
                raise JobFailed(f"stages.{index}: ControlNet with inpainting is not offered")
            unit = stage.controlnet
            pipe = controlnet.pipeline(engine, "controlnet-img2img" if source is not None else "controlnet", unit.model)
            control = control_image(task, stage, width, height)
            if source is not None:
                call["control_image"] = control
            else:
                call["image"] = control
            call.update(controlnet_conditioning_scale=unit.weight, control_guidance_start=unit.start, control_guidance_end=unit.end)
        elif stage.model == "refiner":
            if source is None:
                raise JobFailed(f"stages.{index}: the refiner refines: it needs a stage before it")
            pipe = engine._derived_pipe("refiner-inpaint") if inpaint else engine._refiner
        elif source is None:
            pipe = engine._base
        else:
            pipe = engine._derived_pipe("inpaint" if inpaint else "img2img")
        pipe.scheduler = scheduler
        log.info("job %s: stage %d sample on %s, %d steps%s", task.job_id, index, stage.model, steps,
                 "".join(f" {k}={call[k]:g}" for k in ("strength", "denoising_start", "denoising_end") if k in call))
        latents, image = pipe(**call).images, None
        first_sample = False
    result = engine._decoder.decode(latents, job_id=task.job_id) if latents is not None else image
    if mask is not None and result.size == (task.width, task.height):
        init = fit(task.init_image, task.width, task.height, mode="RGB")
        result = Image.composite(result, init, mask)
    return result
