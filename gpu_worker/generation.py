"""The engine's side of a try, in the GPU thread: one job's image made, or, for jobs taken together
(`--max-batch`), one engine call for a batch's entries; then each image's safety check and encoding."""

from __future__ import annotations

import asyncio
import io
import logging
import time
from typing import TYPE_CHECKING, Any

from PIL import Image

from gpu_worker.batching import Entry, settle
from gpu_worker.engines.base import GenerationTask
from gpu_worker.errors import JobCancelled
from gpu_worker.progress import step_callback
from gpu_worker.running_job import RunningJob

if TYPE_CHECKING:
    from gpu_worker.worker import Worker

log = logging.getLogger("imagegen.worker")

Made = tuple[Image.Image, bool, bytes, float, float]  # the image, whether flagged, its bytes, when the steps and the encoding ended


def generating(worker: Worker, job: RunningJob, task: GenerationTask, fmt: str, quality: int) -> asyncio.Future:
    """The job's image (and its bytes): run now, or, for a job taken together with others, once all
    have reached this point (or ended), in one engine call with those of its batch key."""
    gathering = worker.gathering
    if gathering is not None and gathering.expects(task.job_id):
        key = worker.engine.batch_key(task)
        return gathering.join(Entry(job=job, task=task, fmt=fmt, quality=quality, key=key))
    return asyncio.get_running_loop().run_in_executor(worker.gpu, make_image, worker, job, task, fmt, quality)


def make_image(worker: Worker, job: RunningJob, task: GenerationTask, fmt: str, quality: int) -> Made:
    """In the GPU thread, one hand-over for the whole run: the engine, the safety check (it raises
    JobFailed when flagged images are rejected), the encoding."""
    worker.metrics.batch_ran(1)
    image = worker.engine.generate(task, step_callback(worker, job))
    return screen_and_encode(worker, job, image, fmt, quality)


def screen_and_encode(worker: Worker, job: RunningJob, image: Image.Image, fmt: str, quality: int) -> Made:
    steps_done = job.stamps.last or time.monotonic()
    nsfw = False
    if worker.safety is not None:
        image, nsfw = worker.safety.screen(image)
    data = encode(image, fmt, quality)
    return image, nsfw, data, steps_done, time.monotonic()


def encode(image: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG" and image.mode != "RGB":
        image = image.convert("RGB")
    image.save(buf, format=fmt, quality=quality)
    return buf.getvalue()


def launch(worker: Worker, runs: list[list[Entry]]) -> None:
    """On the loop: hands each run of entries to the engine thread, one call per run."""
    loop = asyncio.get_running_loop()

    def deliver(future: asyncio.Future, entries: list[Entry]) -> None:
        for i, entry in enumerate(entries):
            if future.cancelled():
                entry.future.cancel()
            elif future.exception() is not None:
                settle(entry.future, future.exception())
            else:
                settle(entry.future, future.result()[i])

    for entries in runs:
        running = loop.run_in_executor(worker.gpu, make_images, worker, entries)
        running.add_done_callback(lambda future, entries=entries: deliver(future, entries))


def make_images(worker: Worker, entries: list[Entry]) -> list[Any]:
    """In the GPU thread: one engine call for the entries, then each image's check and encoding.
    A job cancelled mid-batch gets its answer at that step, not at the batch's end."""
    loop = worker.loop

    def hearing(entry: Entry):
        inner = step_callback(worker, entry.job)

        def on_step(step: int, total: int, latents: Any) -> None:
            try:
                inner(step, total, latents)
            except JobCancelled:
                loop.call_soon_threadsafe(settle, entry.future, JobCancelled())
                raise

        return on_step

    worker.metrics.batch_ran(len(entries))
    for entry in entries:
        entry.job.batch = len(entries)
    if len(entries) > 1:
        log.info("jobs %s run as one batch of %d", ",".join(e.task.job_id for e in entries), len(entries))
    outcomes = worker.engine.generate_batch([e.task for e in entries], [hearing(e) for e in entries])
    results: list[Any] = []
    for entry, outcome in zip(entries, outcomes):
        if isinstance(outcome, BaseException):
            results.append(outcome)
            continue
        try:
            results.append(screen_and_encode(worker, entry.job, outcome, entry.fmt, entry.quality))
        except Exception as exc:
            results.append(exc)
    return results
