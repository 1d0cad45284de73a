"""The interface every engine follows, and the task it is given.

An engine turns one `GenerationTask` into a PIL image, calling `on_step` after every denoising step
(the callback may raise `JobCancelled` to stop at that step boundary). It runs in a worker thread,
never on the event loop. Engines: the diffusers SDXL pipeline (`sdxl.py`, also serving `tiny-sdxl`)
and a simulated one (`simulated.py`) for load tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

from PIL import Image

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


class Engine(Protocol):
    name: str
    device: str
    default_steps: int
    default_guidance: float
    has_refiner: bool

    def refiner_steps(self, task: GenerationTask) -> int:
        """How many of the task's steps run on the refiner (0 without one)."""
        ...

    def generate(self, task: GenerationTask, on_step: StepCallback) -> Image.Image: ...
