"""The interface every engine follows, and the task it is given.

An engine turns one `GenerationTask` into a PIL image, calling `on_step` after every denoising step
(the callback may raise `JobCancelled` to stop at that step boundary). A task with an `init_image` is
image-to-image: it runs `steps_run(steps, strength)` of its steps, starting from the init image noised
to that point; with a `mask_image` too it is inpainting, and pixels where the mask is black come back
as they were. It runs in a worker thread,
never on the event loop: on the engine's own thread (`executor`) when it has one, so that loading,
warm-up and every job share the thread CUDA graphs were recorded on. Engines: the diffusers SDXL pipeline (`sdxl.py`, also serving `tiny-sdxl`)
and a simulated one (`simulated.py`) for load tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

from PIL import Image

from schemas.plan import total_steps
from schemas.request import steps_run

StepCallback = Callable[[int, int, Any], None]
"""on_step(step, total_steps, latents_or_None): step counts from 1."""


@dataclass(frozen=True, kw_only=True)
class GenerationTask:
    job_id: str
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance: float
    seed: int
    use_refiner: bool = False
    refiner_split: float | None = None  # None: the engine's default
    scheduler: str | None = None  # one of schemas.request.SCHEDULERS; None: the model's own
    loras: tuple[tuple[str, float], ...] = ()  # (adapter name, weight) pairs, in the request's order
    init_image: Image.Image | None = None  # image-to-image: the picture to start from, any size and mode
    mask_image: Image.Image | None = None  # inpainting: white is redrawn, black kept; the init image's size
    strength: float = 1.0  # image-to-image: how far from the init image, 0 < strength <= 1
    eta: float | None = None  # DDIM's eta (used by the ddim scheduler only); None: 0
    stages: tuple[Any, ...] = ()  # the request's plan (schemas.plan stages); (): the implicit plan of its fields
    control_image: Image.Image | None = None  # the ControlNet stages' control image

    @property
    def total_steps(self) -> int:
        """The denoising steps the task runs (progress counts to this)."""
        if self.stages:
            return total_steps(list(self.stages), self.steps, from_image=self.init_image is not None, strength=self.strength)
        return steps_run(self.steps, self.strength) if self.init_image is not None else self.steps


def fit(image: Image.Image, width: int, height: int, *, mode: str) -> Image.Image:
    """The image in `mode`, scaled to cover width x height and centre-cropped to it."""
    from PIL import ImageOps

    image = image.convert(mode)
    if image.size == (width, height):
        return image
    return ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS)


class Engine(Protocol):
    name: str
    device: str
    default_steps: int
    default_guidance: float
    has_refiner: bool
    lora_names: tuple[str, ...]  # the LoRA adapters loaded, by name
    executor: Any  # the single-thread executor the engine was loaded on and runs on; None: any one thread

    def refiner_steps(self, task: GenerationTask) -> int:
        """How many of the task's steps run on the refiner (0 without one)."""
        ...

    def generate(self, task: GenerationTask, on_step: StepCallback) -> Image.Image: ...
