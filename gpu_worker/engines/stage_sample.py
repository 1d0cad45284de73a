"""One sample stage as the stage runner runs it: a `Sample` (its model, sampler, schedule, window and the
steps it counts), fixed before the job's first step, and `sample()`, the pipeline call that denoises it for
a batch of tasks.

A request's own stage becomes a `Sample` with `from_stage`; a request without stages gets its implicit
plan from `implicit`: one sample stage for text-to-image, image-to-image and inpainting, two handing over
for `use_refiner`. The hand-over is the ensemble of experts of diffusers' `denoising_end` /
`denoising_start` at `refiner_split`, a fraction of the noise schedule: the stages carry that fraction as
it is (it need not fall on a whole step) and count the steps each model runs by its sampler's timesteps
(`schedulers.split_steps`), as users see them in progress.

The pipeline follows from the stage: text to image from noise, image to image from earlier latents or an
image (`strength`, or a hand-over continuing the schedule from `start`), inpainting where the stage is
(the first of a masked job's, and its refiner hand-over), the refiner's own pipeline for `model:
refiner`, and the ControlNet variants of the base's for a stage guided by a ControlNet.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from gpu_worker.engines import controlnet
from gpu_worker.engines.base import GenerationTask
from gpu_worker.engines.schedulers import UnknownScheduler, make_scheduler, split_steps
from gpu_worker.errors import JobFailed
from schemas.plan import SampleStage, stage_steps
from schemas.request import schedule_length

log = logging.getLogger("imagegen.worker.stages")


@dataclass(frozen=True)
class Sample:
    """A sample stage, ready to run: `schedule` is the schedule length asked of the pipeline, `runs` the
    steps it runs (its share of the progress count)."""

    where: str  # "stages.N" for a request's own stage, "" for an implicit one: how messages name it
    model: str  # "base" or "refiner"
    scheduler: Any  # a fresh diffusers scheduler, the job's own
    schedule: int
    runs: int
    guidance: float
    strength: float | None = None  # from an image or latents noised this far; None: from noise, or a hand-over
    start: float | None = None  # a hand-over: continue the schedule from this fraction (denoising_start)
    end: float | None = None  # stop at this fraction of the schedule, leaving noise for the next stage (denoising_end)
    inpaint: bool = False
    controlnet: Any = None  # schemas.plan.ControlNetUnit


def _scheduler(engine: Any, name: str | None, model: str, where: str) -> Any:
    try:
        return make_scheduler(name, engine._scheduler_configs[model])
    except UnknownScheduler as exc:
        raise JobFailed(f"{where}: {exc}" if where else str(exc)) from None


def implicit(engine: Any, task: GenerationTask) -> list[Sample]:
    """The plan of a request without stages: one sample stage, or base and refiner handing over at the split."""
    if task.use_refiner and not engine.has_refiner:
        raise JobFailed("use_refiner: this worker has no refiner loaded (start it with --refiner)")
    from_image = task.init_image is not None
    schedule = schedule_length(task.steps, task.strength) if from_image else task.steps
    run = task.total_steps  # image-to-image skips the first schedule - run steps
    only = Sample(
        where="", model="base", scheduler=_scheduler(engine, task.scheduler, "base", ""), schedule=schedule, runs=run,
        guidance=task.guidance, strength=task.strength if from_image else None,
        inpaint=from_image and task.mask_image is not None,
    )
    if not task.use_refiner:
        return [only]
    split = task.refiner_split or engine.settings.refiner_split
    base_steps, _ = split_steps(_scheduler(engine, task.scheduler, "base", ""), schedule, split)
    _, refiner_steps = split_steps(_scheduler(engine, task.scheduler, "refiner", ""), schedule, split)
    base_steps -= schedule - run
    if base_steps <= 0 or refiner_steps == 0:
        log.info(
            "job %s: %d steps%s split at %.2f leave one model no step; the base runs them all",
            task.job_id, task.steps, f" at strength {task.strength:g}" if from_image else "", split,
        )
        return [only]
    refiner = dataclasses.replace(
        only, model="refiner", scheduler=_scheduler(engine, task.scheduler, "refiner", ""), runs=refiner_steps,
        strength=None, start=split,
    )
    return [dataclasses.replace(only, runs=base_steps, end=split), refiner]


def from_stage(engine: Any, stage: SampleStage, index: int, task: GenerationTask, *, first: bool, from_source: bool) -> Sample:
    """A request's sample stage at `index`; `first`: the plan's first sample stage, `from_source`: it has
    an image or latents to start from."""
    where = f"stages.{index}"
    if stage.model == "refiner" and not engine.has_refiner:
        raise JobFailed(f"{where}: this worker has no refiner loaded (start it with --refiner)")
    steps = stage.steps or task.steps
    scheduler = _scheduler(engine, stage.scheduler or task.scheduler, stage.model, where)
    end = stage.end_step / steps if stage.end_step is not None and stage.end_step < steps else None
    schedule, strength, start = steps, None, None
    if from_source:
        if stage.start_step is not None:
            start = stage.start_step / steps
        else:
            strength = stage.denoise if stage.denoise is not None else (task.strength if first else 1.0)
            schedule = schedule_length(steps, strength)
    elif stage.start_step:
        raise JobFailed(f"{where}: start_step needs latents from a stage before it")
    inpaint = first and task.mask_image is not None and from_source
    if stage.controlnet is not None:
        if start is not None or end is not None:
            raise JobFailed(f"{where}: a ControlNet stage runs its whole schedule here: drop start_step/end_step")
        if inpaint:
            raise JobFailed(f"{where}: ControlNet with inpainting is not offered")
    elif stage.model == "refiner" and not from_source:
        raise JobFailed(f"{where}: the refiner refines: it needs a stage before it")
    runs = stage_steps(stage, task.steps, first_from_image=first and task.init_image is not None, strength=task.strength)
    return Sample(
        where=where, model=stage.model, scheduler=scheduler, schedule=schedule, runs=runs,
        guidance=stage.guidance if stage.guidance is not None else task.guidance,
        strength=strength, start=start, end=end, inpaint=inpaint, controlnet=stage.controlnet,
    )


def one(values: list[Any]) -> Any:
    """A batch's values as a pipeline takes them: the value itself for one task, else the list."""
    return values[0] if len(values) == 1 else values


def sample(
    engine: Any, stage: Sample, tasks: list[GenerationTask], *, source: Any, masks: list[Any] | None,
    width: int, height: int, generators: list[Any], callback: Any,
) -> Any:
    """The latents the stage leaves for the batch: from noise (`source` None), from the latents of the
    stages before, or from images (a list, one per task)."""
    first = tasks[0]
    call: dict[str, Any] = dict(
        prompt=one([t.prompt for t in tasks]),
        negative_prompt=one([t.negative_prompt for t in tasks]) if first.negative_prompt else None,
        guidance_scale=stage.guidance,
        generator=one(generators),
        callback_on_step_end=callback,
        output_type="latent",
        num_inference_steps=stage.schedule,
    )
    if first.eta is not None:  # diffusers hands it to the schedulers whose step takes it (DDIM's); one per batch
        call["eta"] = first.eta
    if stage.end is not None:
        call["denoising_end"] = stage.end
    if source is None:
        call.update(width=width, height=height)
    else:
        call["image"] = one(source) if isinstance(source, list) else source
        if stage.start is not None:
            call["denoising_start"] = stage.start
        else:
            call["strength"] = stage.strength
        if stage.inpaint:
            call.update(mask_image=one(masks), width=width, height=height)
    pipe = _pipeline(engine, stage, tasks, call, from_source=source is not None, width=width, height=height)
    pipe.scheduler = stage.scheduler
    log.log(
        logging.INFO if stage.where else logging.DEBUG, "job %s: %s sample on %s, %d of %d steps%s", first.job_id,
        stage.where or "stage", stage.model, stage.runs, stage.schedule,
        "".join(f" {k}={call[k]:g}" for k in ("strength", "denoising_start", "denoising_end") if k in call),
    )
    return pipe(**call).images


def _pipeline(engine: Any, stage: Sample, tasks: list[GenerationTask], call: dict, *, from_source: bool, width: int, height: int) -> Any:
    """The pipeline that runs the stage (a ControlNet's control image and options go into `call`)."""
    if stage.controlnet is not None:
        unit = stage.controlnet
        pipe = controlnet.pipeline(engine, "controlnet-img2img" if from_source else "controlnet", unit.model)
        control = one([controlnet.control_image(t, unit, width, height) for t in tasks])
        call["control_image" if from_source else "image"] = control
        call.update(controlnet_conditioning_scale=unit.weight, control_guidance_start=unit.start, control_guidance_end=unit.end)
        return pipe
    if stage.model == "refiner":
        return engine._derived_pipe("refiner-inpaint") if stage.inpaint else engine._refiner
    if not from_source:
        return engine._base
    return engine._derived_pipe("inpaint" if stage.inpaint else "img2img")
