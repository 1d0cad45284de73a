"""The first of a try's three steps (admit, start, finish): a job's message read and checked against
this worker's limits and model, its record read (or written, for a job published straight onto NATS),
its uploads fetched, and the engine's task built from it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nats.aio.msg import Msg
from nats.js.errors import KeyDeletedError, KeyNotFoundError, NoKeysError
from PIL import Image

from gpu_worker.engines.base import GenerationTask
from gpu_worker.errors import JobCancelled, JobExpired, JobFailed, Rerouted
from gpu_worker.finish import tell_done_again
from gpu_worker.running_job import RunningJob
from schemas import jobstore, names, uploads
from schemas.codec import DecodeError, decode
from schemas.job import JobEnvelope
from schemas.plan import expand, is_plan, sizes, stage_parts, total_steps
from schemas.request import RequestInvalid, limit_problems, steps_run
from schemas.status import JobState, JobStatus
from schemas.workers import WorkerInfo

if TYPE_CHECKING:
    from gpu_worker.worker import Worker

log = logging.getLogger("imagegen.worker")


@dataclass
class Admitted:
    """A job cleared to run: the running job, its record with the record's revision, and its input images."""

    job: RunningJob
    status: JobStatus
    revision: int
    init_image: Image.Image | None
    mask_image: Image.Image | None
    control_image: Image.Image | None


def read_envelope(worker: Worker, msg: Msg) -> JobEnvelope:
    """The job in `msg`, within this worker's limits; raises JobFailed otherwise."""
    try:
        envelope = decode(msg.data, JobEnvelope)
    except DecodeError as exc:
        raise JobFailed(f"undecodable job message: {exc}") from None
    problems = limit_problems(envelope.request, worker.settings.limits)
    most = worker.settings.limits.max_images
    if envelope.group_size > most:
        problems.append({"field": "group_size", "message": f"{envelope.group_size} is over the limit of {most} images per request"})
    if problems:
        raise JobFailed("; ".join(f"{p['field']}: {p['message']}" for p in problems))
    return envelope


async def admit(worker: Worker, envelope: JobEnvelope, msg: Msg, attempt: int) -> Admitted | None:
    """Checks the job may run here and now, reads (or writes) its record and fetches its inputs; None
    when it is done already; raises the outcome (expired, cancelled, failed, rerouted) otherwise."""
    job_id = envelope.job_id
    request = envelope.request
    engine, settings = worker.engine, worker.settings
    if envelope.deadline is not None and time.time() > envelope.deadline:
        raise JobExpired()
    if request.model and request.model != engine.name:
        await reroute(worker, envelope, msg)
    schedule = request.steps or engine.default_steps
    stages = tuple(expand(request, default_steps=schedule, refiner_split=settings.refiner_split)) if is_plan(request) else ()
    if (any(getattr(s, "model", "") == "refiner" for s in stages) or request.use_refiner) and not engine.has_refiner:
        raise JobFailed(f"{'stages' if stages else 'use_refiner'}: no refiner is loaded on this worker")
    if stages:
        steps = total_steps(list(stages), schedule, from_image=envelope.init_image is not None, strength=request.strength)
    else:
        steps = steps_run(schedule, request.strength) if envelope.init_image else schedule  # the steps that run
    status, revision = await worker.prefetch.read_status(job_id)
    if status is None:  # published straight onto NATS: this worker writes the first record
        status = envelope.queued_status()
        revision = await jobstore.create_status(worker.status_kv, status) or 0
    elif status.state is JobState.DONE:
        log.info("job %s try %d already done; acking", job_id, attempt)
        await tell_done_again(worker, status)
        return None
    elif status.state.final:
        raise {JobState.CANCELLED: JobCancelled, JobState.EXPIRED: JobExpired}.get(status.state, JobCancelled)()
    if attempt > settings.topology.max_deliver:  # the delivery the consumer keeps for this verdict
        raise JobFailed(
            f"none of its {attempt - 1} tries finished (its worker was lost each time, or the broker was away)"
        )
    try:
        init_image, mask_image = await uploads.fetch_inputs(worker.uploads, envelope, settings.limits)
        control_image = await uploads.fetch_control(worker.uploads, envelope, settings.limits) if stages else None
    except RequestInvalid as exc:
        raise JobFailed(str(exc)) from None
    job = RunningJob(envelope=envelope, msg=msg, attempt=attempt, total=steps)
    if stages:
        job.parts = stage_parts(list(stages), request.width, request.height, schedule,
                                from_image=envelope.init_image is not None, strength=request.strength)
        width, height = sizes(list(stages), request.width, request.height)[-1]
        job.final_mpx = width * height / 1e6
    worker.running[job_id] = job
    return Admitted(job, status, revision, init_image, mask_image, control_image)


async def reroute(worker: Worker, envelope: JobEnvelope, msg: Msg) -> None:
    """A job naming a model this worker does not serve, taken from the lane of jobs naming none (a
    service published it there): published to its model's lane when a live worker serves that
    model (Rerouted), else failed, naming the model."""
    model = envelope.request.model
    lane = envelope.subject
    if msg.subject != lane and await served_elsewhere(worker, model):
        dedup = f"{envelope.job_id}.{names.model_lane(model)}"  # a redelivered message is routed once
        await worker.js.publish(lane, msg.data, headers={names.MSG_ID_HEADER: dedup})
        raise Rerouted(lane)
    raise JobFailed(f"model: {model!r} is not served here, nor by any live worker; this worker serves {worker.engine.name!r}")


async def served_elsewhere(worker: Worker, model: str) -> bool:
    """Whether a live worker (by the registry) serves `model`. A broker that does not answer raises,
    and the job is tried again (BROKER_TROUBLE), not failed."""
    now = time.time()
    try:
        keys = await worker.workers_kv.keys()
    except NoKeysError:
        return False
    for key in keys:
        try:
            info = decode((await worker.workers_kv.get(key)).value, WorkerInfo)
        except (KeyNotFoundError, KeyDeletedError, DecodeError, TypeError):  # gone meanwhile, or unreadable
            continue
        if info.model == model and now - info.seen_at < worker.settings.topology.worker_ttl_s:
            return True
    return False


def generation_task(
    worker: Worker, envelope: JobEnvelope, *, init_image: Image.Image | None = None, mask_image: Image.Image | None = None,
    control_image: Image.Image | None = None,
) -> GenerationTask:
    """What the engine is asked to make for this job, with this worker's defaults filled in."""
    request, engine = envelope.request, worker.engine
    schedule = request.steps or engine.default_steps
    stages = tuple(expand(request, default_steps=schedule, refiner_split=worker.settings.refiner_split)) if is_plan(request) else ()
    return GenerationTask(
        job_id=envelope.job_id,
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        width=request.width,
        height=request.height,
        steps=schedule,
        guidance=request.guidance if request.guidance is not None else engine.default_guidance,
        seed=envelope.seed,
        use_refiner=request.use_refiner,
        refiner_split=request.refiner_split,
        scheduler=request.scheduler,
        loras=tuple((request.loras or {}).items()),
        init_image=init_image,
        mask_image=mask_image,
        strength=request.strength,
        eta=request.eta,
        stages=stages,
        control_image=control_image,
    )
