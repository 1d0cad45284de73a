"""What a live worker publishes in KV `imagegen-workers`: its model and its measured speed.

The speed model is what ETAs are computed from: a fixed cost per job plus a cost per denoising step
that grows with the pixel count, plus a cost per megapixel for the VAE decode and image encoding; with
the refiner, a hand-over cost and its steps at their own measured ratio to a base step of the same size.
Workers measure it on every job; gateways read it.
"""

from __future__ import annotations

import time

from pydantic import BaseModel, Field


DEFAULT_FAIRNESS = 5  # a worker's jobs in a row from higher tiers before a lower tier's turn


class SpeedModel(BaseModel):
    fixed_s: float = Field(0.05, description="Seconds per job that do not depend on size or steps.")
    step_s: float = Field(0.01, description="Seconds per step that do not depend on size.")
    step_s_per_mpx: float = Field(0.1, description="Seconds per step per megapixel.")
    decode_s_per_mpx: float = Field(0.05, description="Seconds per megapixel for decode and encoding.")
    refiner_step_ratio: float = Field(1.0, description="A refiner step's seconds over a base step's at the same size.")
    refiner_fixed_s: float = Field(
        0.0, description="Seconds a job with the refiner spends handing over to it (its prompt encoding, its set-up), besides its steps."
    )
    samples: int = 0

    def estimate(self, *, width: int, height: int, steps: int, refiner_steps: int = 0) -> float:
        """Seconds for a job of `steps` base steps and `refiner_steps` refiner steps."""
        mpx = width * height / 1e6
        per_step = self.step_s + self.step_s_per_mpx * mpx
        return self.fixed_s + per_step * steps + self.refiner_part_s(per_step, refiner_steps) + self.decode_s_per_mpx * mpx

    def left_s(self, *, step: int, total: int, refiner_steps: int, step_s: float, mpx: float) -> float:
        """Seconds left of a running job after `step` of its `total` steps (the last `refiner_steps` of
        them the refiner's), its base steps taking `step_s` each (as measured on this job)."""
        base = total - refiner_steps
        if step > base:  # in the refiner's steps
            left = (total - step) * step_s * self.refiner_step_ratio
        else:
            left = (base - step) * step_s + self.refiner_part_s(step_s, refiner_steps)
        return left + self.decode_s_per_mpx * mpx

    def plan_left_s(self, parts: list[tuple[int, float, bool]], *, step: int, final_mpx: float, scale: float = 1.0) -> float:
        """Seconds left of a plan after `step` of its steps, each sample stage (steps, megapixels, on the
        refiner) costed at its own size; `scale`: the step time measured on this job over the modelled one."""
        left, seen = (self.fixed_s if step == 0 else 0.0), 0
        for steps, mpx, refiner in parts:
            remaining = max(0, min(steps, seen + steps - step))
            seen += steps
            per_step = (self.step_s + self.step_s_per_mpx * mpx) * scale
            if refiner:
                per_step *= self.refiner_step_ratio
                left += self.refiner_fixed_s if remaining == steps else 0.0
            left += remaining * per_step
        return left + self.decode_s_per_mpx * final_mpx

    def refiner_part_s(self, base_step_s: float, refiner_steps: int) -> float:
        """Seconds of the refiner's part: its hand-over and its steps."""
        return self.refiner_fixed_s + base_step_s * self.refiner_step_ratio * refiner_steps if refiner_steps else 0.0


class WorkerInfo(BaseModel):
    worker_id: str
    model: str
    default_steps: int
    default_guidance: float
    has_refiner: bool = False
    device: str = "cpu"
    state: str = "idle"
    job_id: str | None = None
    jobs_done: int = 0
    paused_hot: bool = Field(False, description="Takes no new job until its GPU cools below the resume temperature.")
    gpu_temp_c: float | None = Field(None, description="The GPU temperature last read, when a sensor is configured.")
    fairness: int = Field(
        DEFAULT_FAIRNESS, description="After this many jobs in a row taken from a higher tier while a lower one had work, the next is taken from the lowest tier with work."
    )
    version: str = Field("", description="The imagegen release the worker runs; empty from releases that did not publish it.")
    loras: list[str] | None = Field(None, description="The LoRA adapters it loaded, by name; null from releases that did not publish them.")
    controlnets: list[str] | None = Field(None, description="The ControlNets it loaded, by name; null from releases that did not publish them.")
    model_sha256: str | None = Field(
        None, description="The sha256 of its model's UNet weights (gpu_worker.model_hash), as AUTOMATIC1111's sd-models "
        "shows a checkpoint's; null when they are not on its disk, or from releases that did not publish it."
    )
    started_at: float = Field(default_factory=time.time)
    seen_at: float = Field(default_factory=time.time)
    speed: SpeedModel = Field(default_factory=SpeedModel)
