"""Small runs before a worker serves: they load kernels and give the first ETAs a measurement of the
fixed, per-step and per-pixel costs (and, with a refiner, of its hand-over and steps)."""

from __future__ import annotations

import asyncio
import io
import time
from typing import TYPE_CHECKING

from PIL import Image

from gpu_worker.engines.base import GenerationTask
from gpu_worker.speed import StepStamps

if TYPE_CHECKING:
    from gpu_worker.worker import Worker


async def run_warm_up(worker: Worker) -> None:
    """Runs small jobs at a few sizes on the worker's GPU thread, teaching its speed model."""
    loop = asyncio.get_running_loop()
    engine = worker.engine
    runs = [(64, False, False), (256, True, False), (512, True, False)]  # the first run pays one-off costs
    if engine.has_refiner:
        runs += [(64, False, True), (256, True, True)]
    for side, measured, use_refiner in runs:
        task = GenerationTask(
            job_id="warm-up",
            prompt="warm-up",
            negative_prompt="",
            width=side,
            height=side,
            steps=6 if use_refiner else 3,
            guidance=engine.default_guidance,
            seed=0,
            use_refiner=use_refiner,
            refiner_split=0.5,
        )
        stamps = StepStamps(refiner_steps=engine.refiner_steps(task))
        started = time.monotonic()
        image = await loop.run_in_executor(
            worker.gpu, engine.generate, task, lambda step, total, _: stamps.stamp(step, total, time.monotonic())
        )
        steps_done = stamps.last or time.monotonic()
        decode_s = (time.monotonic() - steps_done) + await loop.run_in_executor(worker.gpu, time_encode, image)
        if measured:
            timings = stamps.timings(task.total_steps, started, steps_done)
            worker.meter.record(mpx=side * side / 1e6, decode_s=decode_s, total_s=time.monotonic() - started, **timings)


def time_encode(image: Image.Image) -> float:
    """Seconds to encode `image` as a JPEG, as a job's image is."""
    started = time.monotonic()
    image.save(io.BytesIO(), format="JPEG", quality=85)
    return time.monotonic() - started
