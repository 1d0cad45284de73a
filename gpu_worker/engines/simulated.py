"""A simulated engine for load and scale tests: no torch, a configurable time per step.

It sleeps `fixed_s` plus `step_s` (+ `step_s_per_mpx` per megapixel) per step, with the refiner its
steps past the split `refiner_step_factor` times as long after a hand-over of `refiner_fixed_s`, and returns a flat image
whose colour comes from the seed, so that different seeds give different images. Image-to-image blends
that colour over the init image by `strength` (running the steps the real engine would), and inpainting
keeps the init image where the mask is black. With `fail_marker`
set, a prompt containing it makes the engine raise `RuntimeError` after the first step, every time:
a poison job, for testing retries and dead letters against real processes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from PIL import Image

from gpu_worker.engines.base import GenerationTask, StepCallback, fit
from schemas.plan import sizes
from schemas.request import DEFAULT_REFINER_SPLIT, refiner_steps

SIMULATED = "simulated"


@dataclass(kw_only=True)
class SimulatedEngine:
    step_s: float = 0.0
    step_s_per_mpx: float = 0.0
    fixed_s: float = 0.0
    name: str = SIMULATED
    device: str = "cpu"
    default_steps: int = 4
    default_guidance: float = 5.0
    has_refiner: bool = True
    lora_names: tuple[str, ...] = ()
    executor: object = None  # no thread of its own: the worker's GPU thread runs it
    refiner_split: float = DEFAULT_REFINER_SPLIT  # when the request names none
    refiner_step_factor: float = 1.0  # a refiner step's time over a base step's
    refiner_fixed_s: float = 0.0  # the hand-over to the refiner, before its first step
    fail_marker: str = ""  # a prompt containing this crashes the engine (off when empty)

    def refiner_steps(self, task: GenerationTask) -> int:
        """The last steps past the split, as the SDXL engine hands them to its refiner; none when the
        split leaves either model no step."""
        if not (task.use_refiner and self.has_refiner):
            return 0
        return refiner_steps(task.total_steps, task.refiner_split or self.refiner_split)

    def generate(self, task: GenerationTask, on_step: StepCallback) -> Image.Image:
        if self.fixed_s:
            time.sleep(self.fixed_s)
        per_step = self.step_s + self.step_s_per_mpx * task.width * task.height / 1e6
        total = task.total_steps
        refiner = self.refiner_steps(task)
        for step in range(1, total + 1):
            on_refiner = step > total - refiner
            if on_refiner and step == total - refiner + 1 and self.refiner_fixed_s:
                time.sleep(self.refiner_fixed_s)
            if per_step:
                time.sleep(per_step * (self.refiner_step_factor if on_refiner else 1.0))
            on_step(step, total, None)
            if self.fail_marker and self.fail_marker in task.prompt:
                raise RuntimeError(f"simulated engine crash: the prompt contains {self.fail_marker!r}")
        colour = (task.seed % 251, (task.seed // 251) % 241, (task.seed // 60491) % 239)
        size = sizes(list(task.stages), task.width, task.height)[-1] if task.stages else (task.width, task.height)
        image = Image.new("RGB", size, colour)
        if size != (task.width, task.height):
            return image
        if task.init_image is None:
            return image
        init = fit(task.init_image, task.width, task.height, mode="RGB")
        image = Image.blend(init, image, task.strength)
        if task.mask_image is not None:
            image = Image.composite(image, init, fit(task.mask_image, task.width, task.height, mode="L"))
        return image
