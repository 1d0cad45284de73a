"""The stage runner: the one way the SDXL engine makes images. A job's plan (schemas/plan.py) runs in
order on the engine's loaded pipelines, for one task or for a batch of tasks whose plans have one shape.

A task with `stages` runs them; a task without runs its implicit plan (`stage_sample.implicit`: one
sample stage, or base and refiner handing over). Every sample stage is fixed before the first step
(`plan_of`), so a plan that cannot run fails before any. Latents stay in memory between stages; a sample
stage is one pipeline call for the whole batch (`stage_sample.sample`: one prompt and one generator per
task, so each image is the one its task makes alone), an upscale resizes the latents (torch
interpolation) or the decoded pixels (PIL). Progress counts over every stage's steps and goes to each
task's callback after every step; a task whose callback raises JobCancelled drops out at that step
boundary while the others go on, and the run stops once none is left. Each image is decoded on its own;
inpainting pastes the init image back where the mask keeps it.
"""

from __future__ import annotations

import logging
from typing import Any

from PIL import Image

from gpu_worker.engines.base import GenerationTask, StepCallback, fit
from gpu_worker.engines.stage_sample import Sample, from_stage, implicit, sample
from gpu_worker.errors import JobCancelled, JobFailed
from schemas.plan import UpscaleStage

log = logging.getLogger("imagegen.worker.stages")

PIXEL_FILTERS = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                 "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}


def plan_of(engine: Any, task: GenerationTask) -> list[Any]:
    """The task's plan as it runs: each sample stage a `Sample`, each upscale as the request gave it."""
    if not task.stages:
        return list(implicit(engine, task))
    plan: list[Any] = []
    first, has_source, has_latents = True, task.init_image is not None, False
    for index, stage in enumerate(task.stages):
        if isinstance(stage, UpscaleStage):
            if stage.space == "latent" and not has_latents:
                raise JobFailed(f"stages.{index}: a latent upscale needs latents from a sample stage before it")
            has_latents = has_latents and stage.space == "latent"
            plan.append(stage)
            continue
        plan.append(from_stage(engine, stage, index, task, first=first, from_source=has_source))
        first, has_source, has_latents = False, True, True
    return plan


class Progress:
    """The step callback of a batch's pipeline calls: counts steps over the whole plan and tells each task
    still running; `outcomes` holds, per task, the JobCancelled that ended it (None while it runs)."""

    def __init__(self, on_steps: list[StepCallback], total: int, device: str):
        import torch

        self.on_steps, self.total, self.done = on_steps, total, 0
        self.outcomes: list[Any] = [None] * len(on_steps)
        self.cuda = torch.device(device) if device.startswith("cuda") else None

    def __call__(self, pipe: Any, step: int, timestep: Any, kwargs: dict) -> dict:
        import torch

        self.done += 1
        if self.cuda is not None:  # the step has ended on the GPU, not only been queued: progress, ETA
            torch.cuda.synchronize(self.cuda)  # and cancel follow the GPU, CUDA graphs or not
        latents = kwargs.get("latents")
        for i, on_step in enumerate(self.on_steps):
            if self.outcomes[i] is not None:
                continue
            try:
                on_step(min(self.done, self.total), self.total, latents[i : i + 1] if latents is not None else None)
            except JobCancelled as exc:
                self.outcomes[i] = exc
        if all(outcome is not None for outcome in self.outcomes):
            raise JobCancelled()
        return kwargs


def run_plan(engine: Any, tasks: list[GenerationTask], on_steps: list[StepCallback]) -> list[Any]:
    """Runs the tasks (their plans of the first task's shape) together, in torch's inference mode; returns,
    per task, its image or the exception that ended it (JobCancelled, JobFailed). Raises JobFailed when
    the plan cannot run; out of memory propagates."""
    import torch

    plan = plan_of(engine, tasks[0])
    progress = Progress(on_steps, sum(s.runs for s in plan if isinstance(s, Sample)), engine.device)
    first = tasks[0]
    width, height = first.width, first.height
    source: Any = [fit(t.init_image, width, height, mode="RGB") for t in tasks] if first.init_image is not None else None
    masks = [fit(t.mask_image, width, height, mode="L") for t in tasks] if first.mask_image is not None else None
    generators = [torch.Generator(device="cpu").manual_seed(t.seed) for t in tasks]
    with torch.inference_mode():
        try:
            for stage in plan:
                if isinstance(stage, UpscaleStage):
                    source, width, height = upscale(engine, stage, tasks, source, width, height)
                else:
                    source = sample(engine, stage, tasks, source=source, masks=masks, width=width, height=height,
                                    generators=generators, callback=progress)
        except JobCancelled:  # every task was cancelled
            return progress.outcomes
        return finish(engine, tasks, source, masks, progress.outcomes)


def upscale(engine: Any, stage: UpscaleStage, tasks: list[GenerationTask], source: Any, width: int, height: int) -> tuple[Any, int, int]:
    """(the source upscaled, its width, its height): latents interpolated, or images (decoded first) resized."""
    import torch.nn.functional as F

    width, height = stage.size(width, height)
    if stage.space == "latent":
        factor = engine._base.vae_scale_factor
        options = {"align_corners": False} if stage.method in ("bilinear", "bicubic") else {}
        size = (height // factor, width // factor)
        source = F.interpolate(source.float(), size=size, mode=stage.method, **options).to(source.dtype)
    else:
        if not isinstance(source, list):
            source = [engine._decoder.decode(source[i : i + 1], job_id=task.job_id) for i, task in enumerate(tasks)]
        source = [image.convert("RGB").resize((width, height), PIXEL_FILTERS[stage.method]) for image in source]
    log.info("job %s: upscaled (%s, %s) to %dx%d", tasks[0].job_id, stage.space, stage.method, width, height)
    return source, width, height


def finish(engine: Any, tasks: list[GenerationTask], source: Any, masks: list[Any] | None, outcomes: list[Any]) -> list[Any]:
    """Each running task's image: its latents decoded on their own, the init image pasted back where its mask keeps it."""
    for i, task in enumerate(tasks):
        if outcomes[i] is not None:
            continue
        try:
            image = source[i] if isinstance(source, list) else engine._decoder.decode(source[i : i + 1], job_id=task.job_id)
        except JobFailed as exc:
            outcomes[i] = exc
            continue
        if masks is not None and image.size == (task.width, task.height):
            image = Image.composite(image, fit(task.init_image, task.width, task.height, mode="RGB"), masks[i])
        outcomes[i] = image
    return outcomes
