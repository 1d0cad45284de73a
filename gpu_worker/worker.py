"""The worker loop: pull one job, run it off the event loop, store the image, then ack.

A job may run twice (a worker can die after storing the image and before the ack): the image is
stored under the job id, so a second run overwrites it, and a job whose record already says `done`
is acked without running again. With `--max-batch` above 1, compatible jobs taken together are
handled side by side and meet at the engine for one call (`batching.py`). Every outcome is settled in
`settle`, the one place that acks, naks or terms a message.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.errors import KeyDeletedError, KeyNotFoundError, NoKeysError
from PIL import Image

from gpu_worker.batching import Entry, Gathering, settle as settle_entry
from gpu_worker.engines.base import Engine, GenerationTask
from gpu_worker.errors import JobCancelled, JobExpired, JobFailed, JobLost, Rerouted, RetryLater
from gpu_worker.event_publisher import EventPublisher
from gpu_worker.image_store import ImageStore
from gpu_worker.job_context import ContextThreadPool, JobContext, current_job
from gpu_worker.metrics import WorkerMetrics
from gpu_worker import outcomes, registry
from gpu_worker.naks import Naks
from gpu_worker.outcomes import BROKER_TROUBLE
from gpu_worker.preview import latent_preview
from gpu_worker.puller import PriorityPuller
from gpu_worker.safety import SafetyStage, load_safety
from gpu_worker.settings import WorkerSettings
from gpu_worker.speed import SpeedMeter, StepStamps
from gpu_worker.thermal import TemperatureGuard, TemperatureSensor, temperature_guard
from schemas.version import __version__
from schemas import jobstore, names, uploads
from schemas.codec import DecodeError, decode
from schemas.connect import connect
from schemas.events import JobEvent
from schemas.jetstream import MAX_BYTES_FLAG, ensure_model_lanes, ensure_topology
from schemas.job import JobEnvelope
from schemas.plan import expand, is_plan, sizes, stage_parts, total_steps
from schemas.request import RequestInvalid, limit_problems, steps_run
from schemas.status import ImageRef, JobState, JobStatus
from schemas.storage import StoreFull, is_full
from schemas.workers import WorkerInfo

log = logging.getLogger("imagegen.worker")

KV_KEY_UNSAFE = re.compile(r"[^-_=.a-zA-Z0-9]")


@dataclass
class RunningJob:
    envelope: JobEnvelope
    msg: Msg
    attempt: int
    cancel: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.monotonic)
    stamps: StepStamps = field(default_factory=StepStamps)
    base_step_s: float | None = None  # a base step's seconds, as measured on this job
    last_status_write: float = 0.0
    step: int = 0
    total: int = 0
    record: tuple[JobStatus, int] | None = None  # the status record as last read or written, and its revision
    marking: asyncio.Future | None = None  # the write that marks the job running, while it is under way
    parts: list[tuple[int, float, bool]] = field(default_factory=list)  # a plan's sample stages: (steps, mpx, refiner)
    final_mpx: float = 0.0  # a plan's output size
    batch: int = 1  # images in the engine call that made this job's (above 1: taken together with others)
    checked_at: float = field(default_factory=time.monotonic)  # when the record last said this try holds the job
    lost: str | None = None  # why this try no longer holds the job (another try took it over)

    def remember(self, status: JobStatus | None, revision: int) -> None:
        if status is not None and revision > (self.record[1] if self.record else 0):
            self.record = (status, revision)


class Worker:
    def __init__(
        self,
        settings: WorkerSettings,
        engine: Engine,
        *,
        safety: SafetyStage | None = None,
        sensor: TemperatureSensor | None = None,
    ):
        self.settings = settings
        self.engine = engine
        self.safety = safety  # loaded from settings.safety_checker at start when not given
        self.sensor = sensor  # the temperature sensor; NVML when not given
        self.thermal: TemperatureGuard | None = None
        self.worker_id = KV_KEY_UNSAFE.sub("_", settings.worker_id)
        self.stopping = asyncio.Event()
        self.broker_trouble = False
        self.meter = SpeedMeter()
        self.running: dict[str, RunningJob] = {}  # by job id: one job, or the jobs taken together
        self._gathering: Gathering | None = None  # the jobs taken together, until they meet at the engine
        self.jobs_done = 0
        self.gpu = getattr(engine, "executor", None) or ContextThreadPool(max_workers=1, thread_name_prefix="imagegen-gpu")
        self.metrics = WorkerMetrics(self)
        self.nc: NATS | None = None
        self._tasks: list[asyncio.Task] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting = False  # in the puller, free for the next job
        self._prefetch: tuple[str, asyncio.Task] | None = None  # a job's record, read on its bell

    @property
    def current(self) -> RunningJob | None:
        """The job in hand (the first, when several were taken together)."""
        return next(iter(self.running.values()), None)

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.safety is None and self.settings.safety_checker:
            device = self.engine.device
            self.safety = await self._loop.run_in_executor(None, lambda: load_safety(self.settings, device=device))
        if self.safety is not None and self.settings.preview_every:
            log.info("safety check on: live previews off (they would show images before the check)")
        self.thermal = temperature_guard(self.settings, device=self.engine.device, sensor=self.sensor)
        self.nc = await connect(self.settings.nats_url, name=f"imagegen-worker {self.worker_id}")
        self.js = self.nc.jetstream()
        await ensure_topology(self.js, self.settings.topology)
        self.events = EventPublisher(self.nc, worker_id=self.worker_id)
        self.status_kv = await self.js.key_value(names.STATUS_BUCKET)
        self.workers_kv = await self.js.key_value(names.WORKERS_BUCKET)
        self.images = await self.js.object_store(names.IMAGES_BUCKET)
        self.image_store = ImageStore(self.js, self.images, names.IMAGES_BUCKET)
        self.uploads = await self.js.object_store(names.UPLOADS_BUCKET)
        await ensure_model_lanes(self.js, self.settings.topology, self.engine.name)
        self.puller = PriorityPuller(self.nc, fairness=self.settings.fairness, on_bell=self._on_bell, model=self.engine.name)
        await self.puller.start()
        await self.nc.subscribe(names.CANCEL_SUBJECT, cb=self._on_cancel)
        self.naks = Naks(self.nc, ack_wait_s=self.settings.topology.ack_wait_s)
        await self.naks.start()
        await self._register()
        self._tasks.append(asyncio.create_task(registry.beat(self)))
        if self.settings.metrics_port:
            await self.metrics.serve(host=self.settings.metrics_host, port=self.settings.metrics_port)
        log.info("worker %s ready: model=%s device=%s", self.worker_id, self.engine.name, self.engine.device)

    async def run(self) -> None:
        """Serves jobs until `stop()`; the job in hand is finished first."""
        while not self.stopping.is_set():
            if self.broker_trouble:
                await self._wait_for_broker()
            self._waiting = True
            try:
                msg = await self.puller.next(self.stopping, hold=self._cool_enough if self.thermal else None)
            finally:
                self._waiting = False
            if msg is None:
                break
            taken = await self._take_together(msg)
            if len(taken) == 1:
                await self.handle(msg)
            else:
                await self._handle_together(taken)

    async def _cool_enough(self) -> None:
        """Returns when the GPU is cool enough for a new job; the registry says when it pauses and resumes."""

        async def announce() -> None:
            try:
                await self._register()
            except Exception as exc:  # broker away: the next heartbeat says it
                log.warning("worker %s registry update failed: %s", self.worker_id, exc)

        await self.thermal.wait_until_cool(self.stopping, on_change=announce)

    async def _wait_for_broker(self, *, longest_wait_s: float = 0.5, ask_timeout_s: float = 0.5) -> None:
        """After a job failed on JetStream, pulls nothing until the streams a job needs answer again:
        else every queued job would be taken and fail in turn, using up its tries during an outage.
        Asked with short timeouts and waits, so that the worker takes jobs again within about a second
        of a cluster electing their leaders (a STREAM.INFO each half second costs the broker little)."""
        wait_s = 0.25
        js = self.nc.jetstream(timeout=ask_timeout_s)
        while not self.stopping.is_set():
            try:
                for stream in (f"KV_{names.STATUS_BUCKET}", f"OBJ_{names.IMAGES_BUCKET}"):
                    info = await js.stream_info(stream)
                    if info.cluster is not None and not info.cluster.leader:
                        raise ConnectionError(f"stream {stream} has no leader")
            except Exception as exc:
                log.warning("worker %s waits for the broker (%s: %s)", self.worker_id, type(exc).__name__, exc)
                try:
                    await asyncio.wait_for(self.stopping.wait(), wait_s)
                except asyncio.TimeoutError:
                    pass
                wait_s = min(longest_wait_s, wait_s * 2)
                continue
            self.broker_trouble = False
            log.info("worker %s: the broker answers again; taking jobs", self.worker_id)
            return

    def stop(self) -> None:
        self.stopping.set()
        if self.current is not None:
            log.info("worker %s draining: finishing job %s", self.worker_id, self.current.envelope.job_id)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.nc is not None and self.nc.is_connected:
            try:
                await self.workers_kv.delete(self.worker_id)
            except Exception:  # the registry entry expires by itself anyway
                pass
            await self.puller.stop()
            await self.naks.close()
            await self.events.close()
            await self.nc.drain()
        self.gpu.shutdown(wait=False, cancel_futures=True)
        await self.metrics.close()

    async def warm_up(self) -> None:
        """Runs small jobs at a few sizes before serving: loads kernels and gives the first ETAs a
        measurement of the fixed, per-step and per-pixel costs (and, with a refiner, of its hand-over
        and steps)."""
        loop = asyncio.get_running_loop()
        runs = [(64, False, False), (256, True, False), (512, True, False)]  # the first run pays one-off costs
        if self.engine.has_refiner:
            runs += [(64, False, True), (256, True, True)]
        for side, measured, use_refiner in runs:
            task = GenerationTask(
                job_id="warm-up",
                prompt="warm-up",
                negative_prompt="",
                width=side,
                height=side,
                steps=6 if use_refiner else 3,
                guidance=self.engine.default_guidance,
                seed=0,
                use_refiner=use_refiner,
                refiner_split=0.5,
            )
            stamps = StepStamps(refiner_steps=self.engine.refiner_steps(task))
            started = time.monotonic()
            image = await loop.run_in_executor(
                self.gpu, self.engine.generate, task, lambda step, total, _: stamps.stamp(step, total, time.monotonic())
            )
            steps_done = stamps.last or time.monotonic()
            decode_s = (time.monotonic() - steps_done) + await loop.run_in_executor(self.gpu, self._time_encode, image)
            if measured:
                timings = stamps.timings(task.total_steps, started, steps_done)
                self.meter.record(mpx=side * side / 1e6, decode_s=decode_s, total_s=time.monotonic() - started, **timings)

    @staticmethod
    def _time_encode(image: Image.Image) -> float:
        started = time.monotonic()
        image.save(io.BytesIO(), format="JPEG", quality=85)
        return time.monotonic() - started

    # -- registry -------------------------------------------------------------------------------

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            worker_id=self.worker_id,
            model=self.engine.name,
            default_steps=self.engine.default_steps,
            default_guidance=self.engine.default_guidance,
            has_refiner=self.engine.has_refiner,
            device=self.engine.device,
            state=self.state,
            job_id=self.current.envelope.job_id if self.current else None,
            jobs_done=self.jobs_done,
            paused_hot=self.paused_hot,
            gpu_temp_c=self.thermal.last_c if self.thermal else None,
            speed=self.meter.model,
            fairness=self.settings.fairness,
            version=__version__,
            loras=list(self.engine.lora_names),
            controlnets=list(getattr(self.engine, "controlnet_names", ())),
            model_sha256=getattr(self.engine, "model_sha256", None),
        )

    @property
    def paused_hot(self) -> bool:
        return self.thermal is not None and self.thermal.paused and self.current is None

    @property
    def state(self) -> str:
        if self.current:
            return "busy"
        if self.stopping.is_set():
            return "draining"
        return "paused-hot" if self.paused_hot else "idle"

    async def _register(self) -> None:
        await registry.register(self)

    # A worker that stalls past the ack wait (paused, swapped out, its host frozen) may find on waking that
    # its job went to another worker. It notices at its next step: a try that has not seen its record
    # for half the ack wait reads it before going on, and stops (JobLost) when the record names another try.

    def _hold_check_s(self) -> float:
        return self.settings.topology.ack_wait_s / 2

    def _note_holder(self, job: RunningJob, status: JobStatus | None) -> None:
        """Takes the record's word on who runs the job, once this try's running mark has landed."""
        if job.marking is None or not job.marking.done() or status is None:
            job.checked_at = time.monotonic()
            return
        if status.state is JobState.RUNNING and (status.attempt, status.worker) != (job.attempt, self.worker_id):
            job.lost = f"try {status.attempt} on worker {status.worker} holds it now"
        else:
            job.checked_at = time.monotonic()

    async def _check_hold(self, job: RunningJob) -> None:
        try:
            self._note_holder(job, await jobstore.read_status(self.status_kv, job.envelope.job_id))
        except Exception as exc:  # broker away: go on, and ask again later
            job.checked_at = time.monotonic()
            log.debug("job %s: its record could not be read (%s); going on", job.envelope.job_id, exc)

    def _check_hold_from_gpu(self, job: RunningJob) -> None:
        """In the GPU thread, at a step: reads the record (on the loop) when it was not seen for long."""
        if job.lost is None and time.monotonic() - job.checked_at > self._hold_check_s():
            try:
                asyncio.run_coroutine_threadsafe(self._check_hold(job), self._loop).result(timeout=self.settings.topology.ack_wait_s)
            except Exception as exc:
                log.debug("job %s: hold check skipped: %s", job.envelope.job_id, exc)
        if job.lost is not None:
            raise JobLost(job.lost)

    def _on_bell(self, msg: Msg) -> None:
        """A job was published. A free worker reads its record now, alongside the pull that takes it,
        instead of after; when another worker takes the job, the read is dropped."""
        job_id = (msg.headers or {}).get(names.MSG_ID_HEADER)
        if not self._waiting or not job_id or self.thermal is not None and self.thermal.paused:
            return
        if self._prefetch is not None:
            self._prefetch[1].cancel()
        read = asyncio.ensure_future(jobstore.read_status_at(self.status_kv, job_id))
        read.add_done_callback(lambda task: task.cancelled() or task.exception())  # failures: read again
        self._prefetch = (job_id, read)

    async def _read_status(self, job_id: str) -> tuple[JobStatus | None, int]:
        """The job's record and its revision: the one read on its bell, or read now."""
        prefetch, self._prefetch = self._prefetch, None
        if prefetch is not None:
            if prefetch[0] == job_id:
                try:
                    return await prefetch[1]
                except Exception as exc:  # read it again, below
                    log.debug("job %s record read on its bell failed: %s", job_id, exc)
            else:
                prefetch[1].cancel()
        return await jobstore.read_status_at(self.status_kv, job_id)

    async def _on_cancel(self, msg: Msg) -> None:
        job = self.running.get(msg.data.decode(errors="replace"))
        if job is not None:
            job.cancel.set()

    # -- one job --------------------------------------------------------------------------------

    async def handle(self, msg: Msg) -> None:
        attempt = msg.metadata.num_delivered
        job_id = (msg.headers or {}).get(names.MSG_ID_HEADER, "")
        context = JobContext(job_id=job_id, attempt=attempt)
        context_token = current_job.set(context)
        self.metrics.try_started(attempt)
        started = time.monotonic()
        try:
            envelope = self._decode(msg)
            job_id = context.job_id = envelope.job_id
            await self._run(envelope, msg, attempt)
            outcome = None
        except (JobCancelled, JobExpired, JobFailed, RetryLater, Rerouted, *BROKER_TROUBLE) as exc:
            outcome = exc
        except Exception as exc:
            log.exception("job %s try %d crashed", job_id or "?", attempt)
            outcome = exc
        finally:
            job = self.running.pop(context.job_id, None)
            if self._gathering is not None:
                self._gathering.leave(context.job_id)
        duration = context.duration_s = time.monotonic() - started
        try:
            self.metrics.try_ended(job, outcome, attempt=attempt, duration_s=duration)
            await self.settle(msg, job_id, attempt, outcome, duration)
            await self._audit(job_id, attempt, outcome, duration)
        finally:
            current_job.reset(context_token)

    async def _audit(self, job_id: str, attempt: int, outcome: BaseException | None, duration: float) -> None:
        """The outcome of one try, for the audit stream IMAGEGEN_AUDIT."""
        result = "done" if outcome is None else type(outcome).__name__
        record = {
            "event": "outcome",
            "job_id": job_id,
            "attempt": attempt,
            "result": result,
            "reason": getattr(outcome, "reason", None) or (str(outcome) if outcome else None),
            "duration_s": round(duration, 4),
            "worker": self.worker_id,
            "ts": time.time(),
        }
        try:
            await self.nc.publish(names.AUDIT_SUBJECT, json.dumps(record).encode())
        except Exception as exc:
            log.warning("job %s audit record not published: %s", job_id, exc)

    def _decode(self, msg: Msg) -> JobEnvelope:
        try:
            envelope = decode(msg.data, JobEnvelope)
        except DecodeError as exc:
            raise JobFailed(f"undecodable job message: {exc}") from None
        problems = limit_problems(envelope.request, self.settings.limits)
        most = self.settings.limits.max_images
        if envelope.group_size > most:
            problems.append({"field": "group_size", "message": f"{envelope.group_size} is over the limit of {most} images per request"})
        if problems:
            raise JobFailed("; ".join(f"{p['field']}: {p['message']}" for p in problems))
        return envelope

    async def _reroute(self, envelope: JobEnvelope, msg: Msg) -> None:
        """A job naming a model this worker does not serve, taken from the lane of jobs naming none (a
        service published it there): published to its model's lane when a live worker serves that
        model (Rerouted), else failed, naming the model."""
        model = envelope.request.model
        lane = envelope.subject
        if msg.subject != lane and await self._served_elsewhere(model):
            dedup = f"{envelope.job_id}.{names.model_lane(model)}"  # a redelivered message is routed once
            await self.js.publish(lane, msg.data, headers={names.MSG_ID_HEADER: dedup})
            raise Rerouted(lane)
        raise JobFailed(f"model: {model!r} is not served here, nor by any live worker; this worker serves {self.engine.name!r}")

    async def _served_elsewhere(self, model: str) -> bool:
        """Whether a live worker (by the registry) serves `model`. A broker that does not answer raises,
        and the job is tried again (BROKER_TROUBLE), not failed."""
        now = time.time()
        try:
            keys = await self.workers_kv.keys()
        except NoKeysError:
            return False
        for key in keys:
            try:
                info = decode((await self.workers_kv.get(key)).value, WorkerInfo)
            except (KeyNotFoundError, KeyDeletedError, DecodeError, TypeError):  # gone meanwhile, or unreadable
                continue
            if info.model == model and now - info.seen_at < self.settings.topology.worker_ttl_s:
                return True
        return False

    async def _run(self, envelope: JobEnvelope, msg: Msg, attempt: int) -> None:
        """One try of one job: admit it, start the engine while the running mark goes out, finish it."""
        admitted = await self._admit(envelope, msg, attempt)
        if admitted is None:  # done already
            return
        started = await self._start(*admitted)
        if started is not None:
            await self._finish(admitted[0], *started)

    async def _admit(self, envelope: JobEnvelope, msg: Msg, attempt: int) -> tuple | None:
        """Checks the job may run here and now, reads (or writes) its record and fetches its inputs:
        (the running job, its record, the record's revision, init, mask and control image), None when it is
        done already; raises the outcome (expired, cancelled, failed, rerouted) otherwise."""
        job_id = envelope.job_id
        request = envelope.request
        if envelope.deadline is not None and time.time() > envelope.deadline:
            raise JobExpired()
        if request.model and request.model != self.engine.name:
            await self._reroute(envelope, msg)
        schedule = request.steps or self.engine.default_steps
        stages = tuple(expand(request, default_steps=schedule, refiner_split=self.settings.refiner_split)) if is_plan(request) else ()
        if (any(getattr(s, "model", "") == "refiner" for s in stages) or request.use_refiner) and not self.engine.has_refiner:
            raise JobFailed(f"{'stages' if stages else 'use_refiner'}: no refiner is loaded on this worker")
        if stages:
            steps = total_steps(list(stages), schedule, from_image=envelope.init_image is not None, strength=request.strength)
        else:
            steps = steps_run(schedule, request.strength) if envelope.init_image else schedule  # the steps that run
        status, revision = await self._read_status(job_id)
        if status is None:  # published straight onto NATS: this worker writes the first record
            status = envelope.queued_status()
            revision = await jobstore.create_status(self.status_kv, status) or 0
        elif status.state is JobState.DONE:
            log.info("job %s try %d already done; acking", job_id, attempt)
            await self._tell_done_again(status)
            return None
        elif status.state.final:
            raise {JobState.CANCELLED: JobCancelled, JobState.EXPIRED: JobExpired}.get(status.state, JobCancelled)()
        if attempt > self.settings.topology.max_deliver:  # the delivery the consumer keeps for this verdict
            raise JobFailed(
                f"none of its {attempt - 1} tries finished (its worker was lost each time, or the broker was away)"
            )
        try:
            init_image, mask_image = await uploads.fetch_inputs(self.uploads, envelope, self.settings.limits)
            control_image = await uploads.fetch_control(self.uploads, envelope, self.settings.limits) if stages else None
        except RequestInvalid as exc:
            raise JobFailed(str(exc)) from None
        job = RunningJob(envelope=envelope, msg=msg, attempt=attempt, total=steps)
        if stages:
            job.parts = stage_parts(list(stages), request.width, request.height, schedule,
                                    from_image=envelope.init_image is not None, strength=request.strength)
            width, height = sizes(list(stages), request.width, request.height)[-1]
            job.final_mpx = width * height / 1e6
        self.running[job_id] = job
        return job, status, revision, init_image, mask_image, control_image

    async def _start(
        self, job: RunningJob, status: JobStatus, revision: int, init_image: Image.Image | None,
        mask_image: Image.Image | None, control_image: Image.Image | None,
    ) -> tuple[tuple, float] | None:
        """Marks the job running and runs the engine meanwhile: (what the engine made, when it started),
        None when another run finished the job meanwhile; raises when it was cancelled or expired."""
        envelope, attempt, steps = job.envelope, job.attempt, job.total
        job_id, request = envelope.job_id, envelope.request

        def to_running(s: JobStatus) -> JobStatus | None:
            if s.state.final:  # another run of this job (a redelivery that raced this one) ended it meanwhile
                return None
            if s.cancel_requested:
                job.cancel.set()
            s.state, s.worker, s.attempt = JobState.RUNNING, self.worker_id, attempt
            s.started_at, s.step, s.total_steps, s.seed = time.time(), 0, steps, envelope.seed
            return s

        # The running mark goes out over the record just read (one write, no second read, unless it
        # changed meanwhile), with the `started` event in the same send, and the engine starts while
        # the broker confirms it: the mark's round trip overlaps the GPU work instead of preceding it.
        # A mark refused because the job ended meanwhile (a cancel in that instant, a redelivery that
        # raced this one) stops the engine at its next step; its `started` then follows the end.
        marking = job.marking = asyncio.ensure_future(jobstore.change_status_at(
            self.status_kv, job_id, to_running, known=(status, revision) if revision else None
        ))
        await self._event(JobEvent(type="started", job_id=job_id, worker=self.worker_id, attempt=attempt, total=steps))
        log.info("job %s try %d running", job_id, attempt)  # every run, logged here even when its events are lost
        task = self._task(envelope, init_image=init_image, mask_image=mask_image, control_image=control_image)
        job.stamps.refiner_steps = self.engine.refiner_steps(task)
        gen_started = time.monotonic()
        generating = self._generating(job, task, request.format, request.quality)
        try:
            marked, revision, applied = await marking
            job.remember(marked, revision)
        except BaseException:
            job.cancel.set()  # the broker is away: the engine stops at its next step, the try ends
            await asyncio.gather(generating, return_exceptions=True)
            raise
        ended = marked.state if not applied and marked is not None else None  # the end another run wrote
        if ended is not None or job.cancel.is_set():
            job.cancel.set()
            await asyncio.gather(generating, return_exceptions=True)
            if ended is JobState.DONE:
                log.info("job %s try %d already done; acking", job_id, attempt)
                await self._tell_done_again(marked)
                return None
            raise {JobState.CANCELLED: JobCancelled, JobState.EXPIRED: JobExpired}.get(ended, JobCancelled)()
        return await generating, gen_started

    async def _finish(self, job: RunningJob, made: tuple, gen_started: float) -> None:
        """Stores the image under the job id, writes `done` (unless another run did first), tells the
        followers and teaches the speed model."""
        image, nsfw, data, steps_done, encoded = made
        job_id, request, attempt = job.envelope.job_id, job.envelope.request, job.attempt
        if time.monotonic() - job.checked_at > self._hold_check_s():
            await self._check_hold(job)
        if job.lost is not None:  # no image nor status over the try that holds the job now
            raise JobLost(job.lost)
        if nsfw:
            log.warning("job %s image flagged by the safety check: blanked", job_id)

        # A broker that crashed can forget a delivery and hand the job to a second worker as a first try
        # while the first still runs it: a run that finds the job done already stores nothing and keeps the
        # first one's record and event. Two runs storing at the same moment both write the same request and
        # seed under the job id; the record keeps the first `done`. The record is read only when an image is
        # stored under the job id already.
        async def finished_elsewhere() -> bool:
            status, revision = await jobstore.read_status_at(self.status_kv, job_id)
            job.remember(status, revision)
            return status is not None and status.state is JobState.DONE

        try:
            stored = await asyncio.wait_for(self.image_store.put(job_id, data, finished_elsewhere=finished_elsewhere), timeout=30)
        except Exception as exc:
            if is_full(exc):  # not the broker away: trying again cannot help until images expire
                limit = self.settings.topology.images_max_bytes
                raise JobFailed(f"{StoreFull(names.IMAGES_BUCKET, limit, MAX_BYTES_FLAG[names.IMAGES_BUCKET])} (this image: {len(data)} bytes)") from None
            raise
        if stored is None:
            log.info("job %s try %d: another run finished it first; its image stands", job_id, attempt)
            return
        ref = ImageRef(
            name=job_id, content_type=request.content_type, size=len(data), width=image.width, height=image.height,
            digest=stored.digest, chunks_id=stored.nuid,
        )

        def to_done(s: JobStatus) -> JobStatus | None:
            if s.state is JobState.DONE:
                return None
            s.state, s.finished_at, s.image, s.step, s.error = JobState.DONE, time.time(), ref, job.total, None
            s.nsfw = nsfw
            return s

        status, _, applied = await jobstore.change_status_at(self.status_kv, job_id, to_done, known=job.record)
        if not applied and status is not None:
            log.info("job %s try %d: another run finished it first", job_id, attempt)
            return
        total_s = time.monotonic() - gen_started
        timings = {"steps_s": steps_done - gen_started, "encode_s": encoded - steps_done, "total_s": total_s}
        await self._event(JobEvent(type="done", job_id=job_id, image=ref, timings=timings, worker=self.worker_id))
        if job.batch == 1 and not job.parts:  # the speed model (queued jobs' ETAs) learns from one-pass jobs run alone
            self.meter.record(mpx=request.pixels / 1e6, decode_s=timings["encode_s"], total_s=total_s, **job.stamps.timings(job.total, gen_started, steps_done))
        self.jobs_done += 1

    def _task(
        self, envelope: JobEnvelope, *, init_image: Image.Image | None = None, mask_image: Image.Image | None = None,
        control_image: Image.Image | None = None,
    ) -> GenerationTask:
        request = envelope.request
        schedule = request.steps or self.engine.default_steps
        stages = tuple(expand(request, default_steps=schedule, refiner_split=self.settings.refiner_split)) if is_plan(request) else ()
        return GenerationTask(
            job_id=envelope.job_id,
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            width=request.width,
            height=request.height,
            steps=request.steps or self.engine.default_steps,
            guidance=request.guidance if request.guidance is not None else self.engine.default_guidance,
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

    def _make_image(
        self, job: RunningJob, task: GenerationTask, fmt: str, quality: int
    ) -> tuple[Image.Image, bool, bytes, float, float]:
        """In the GPU thread, one hand-over for the whole run: the engine, the safety check (it raises
        JobFailed when flagged images are rejected), the encoding. Returns the image, whether it was
        flagged, its bytes, and when the steps and the encoding ended."""
        self.metrics.batch_ran(1)
        image = self.engine.generate(task, self._step_callback(job))
        return self._finish_image(job, image, fmt, quality)

    def _finish_image(self, job: RunningJob, image: Image.Image, fmt: str, quality: int) -> tuple[Image.Image, bool, bytes, float, float]:
        steps_done = job.stamps.last or time.monotonic()
        nsfw = False
        if self.safety is not None:
            image, nsfw = self.safety.screen(image)
        data = self._encode(image, fmt, quality)
        return image, nsfw, data, steps_done, time.monotonic()

    # -- jobs taken together (--max-batch) ------------------------------------------------------

    def _batch_key(self, msg: Msg) -> tuple | None:
        """The engine's batch key of the job in `msg`; None when it runs alone (or cannot be read)."""
        if not (msg.headers or {}).get(names.MSG_ID_HEADER) or not hasattr(self.engine, "batch_key"):
            return None
        try:
            envelope = decode(msg.data, JobEnvelope)
        except DecodeError:
            return None
        request = envelope.request
        if envelope.init_image or envelope.mask_image or (request.model and request.model != self.engine.name):
            return None
        if request.use_refiner and not self.engine.has_refiner:
            return None
        return self.engine.batch_key(self._task(envelope))

    async def _take_together(self, first: Msg) -> list[Msg]:
        """`first`, and up to `max_batch - 1` more jobs waiting on its lane while each shares its batch
        key; the first that does not is kept too (it is taken already) and runs alone beside them."""
        most = self.settings.max_batch
        if most <= 1 or not hasattr(self.engine, "generate_batch"):
            return [first]
        key = self._batch_key(first)
        if key is None:
            return [first]
        try:  # a request's n images are published one after another: the rest may be a moment behind
            envelope = decode(first.data, JobEnvelope)
            siblings = envelope.group_size - envelope.group_index - 1 if envelope.group_id else 0
        except DecodeError:
            siblings = 0
        taken = [first]
        while len(taken) < most and not self.stopping.is_set():
            try:
                msg = await self.puller.take_more(first.subject, wait_s=0.1 if siblings > len(taken) - 1 else 0.0)
            except BROKER_TROUBLE:
                break
            if msg is None:
                break
            taken.append(msg)
            if self._batch_key(msg) != key:
                break
        return taken

    async def _handle_together(self, taken: list[Msg]) -> None:
        ids = [(msg.headers or {}).get(names.MSG_ID_HEADER, "") for msg in taken]
        self._gathering = Gathering(ids, self._launch)
        log.info("jobs %s taken together", ",".join(ids))
        try:
            await asyncio.gather(*(self.handle(msg) for msg in taken))
        finally:
            self._gathering = None

    def _generating(self, job: RunningJob, task: GenerationTask, fmt: str, quality: int) -> asyncio.Future:
        """The job's image (and its bytes): run now, or, for a job taken together with others, once all
        have reached this point (or ended), in one engine call with those of its batch key."""
        gathering = self._gathering
        if gathering is not None and gathering.expects(task.job_id):
            key = self.engine.batch_key(task)
            return gathering.join(Entry(job=job, task=task, fmt=fmt, quality=quality, key=key))
        return asyncio.get_running_loop().run_in_executor(self.gpu, self._make_image, job, task, fmt, quality)

    def _launch(self, runs: list[list[Entry]]) -> None:
        """On the loop: hands each run of entries to the engine thread, one call per run."""
        loop = asyncio.get_running_loop()

        def deliver(future: asyncio.Future, entries: list[Entry]) -> None:
            for i, entry in enumerate(entries):
                if future.cancelled():
                    entry.future.cancel()
                elif future.exception() is not None:
                    settle_entry(entry.future, future.exception())
                else:
                    settle_entry(entry.future, future.result()[i])

        for entries in runs:
            running = loop.run_in_executor(self.gpu, self._make_images, entries)
            running.add_done_callback(lambda future, entries=entries: deliver(future, entries))

    def _make_images(self, entries: list[Entry]) -> list[Any]:
        """In the GPU thread: one engine call for the entries, then each image's check and encoding.
        A job cancelled mid-batch gets its answer at that step, not at the batch's end."""
        loop = self._loop

        def hearing(entry: Entry):
            inner = self._step_callback(entry.job)

            def on_step(step: int, total: int, latents: Any) -> None:
                try:
                    inner(step, total, latents)
                except JobCancelled:
                    loop.call_soon_threadsafe(settle_entry, entry.future, JobCancelled())
                    raise

            return on_step

        self.metrics.batch_ran(len(entries))
        for entry in entries:
            entry.job.batch = len(entries)
        if len(entries) > 1:
            log.info("jobs %s run as one batch of %d", ",".join(e.task.job_id for e in entries), len(entries))
        outcomes = self.engine.generate_batch([e.task for e in entries], [hearing(e) for e in entries])
        results: list[Any] = []
        for entry, outcome in zip(entries, outcomes):
            if isinstance(outcome, BaseException):
                results.append(outcome)
                continue
            try:
                results.append(self._finish_image(entry.job, outcome, entry.fmt, entry.quality))
            except Exception as exc:
                results.append(exc)
        return results

    def _step_callback(self, job: RunningJob):
        loop = self._loop
        every = 0 if self.safety is not None else self.settings.preview_every  # no unchecked pixels leave

        def on_step(step: int, total: int, latents: Any) -> None:
            self._check_hold_from_gpu(job)
            if job.cancel.is_set():
                raise JobCancelled()
            now = time.monotonic()
            job.stamps.stamp(step, total, now)
            loop.call_soon_threadsafe(self._progress, job, step, total, now, time.time())
            if every and latents is not None and step % every == 0 and step < total:
                preview = latent_preview(latents)
                if preview is not None:
                    event = JobEvent(type="preview", job_id=job.envelope.job_id, step=step, total=total, preview=preview)
                    loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._event(event)))

        return on_step

    def _progress(self, job: RunningJob, step: int, total: int, now: float, ts: float) -> None:
        """On the loop, for a step that ended at monotonic `now` and wall-clock `ts` (stamped in the GPU
        thread, so the event's time is the step's, before any preview built after it)."""
        job.step, job.total = step, total
        elapsed = now - job.started
        request = job.envelope.request
        speed, refiner, first = self.meter.model, job.stamps.refiner_steps, job.stamps.first
        if job.parts:  # a plan: each stage costed at its own size, scaled by the first stage's measured steps
            first_steps, first_mpx, _ = job.parts[0]
            if 1 < step <= first_steps and first:
                job.base_step_s = (now - first) / (step - 1)
            modelled = speed.step_s + speed.step_s_per_mpx * first_mpx
            scale = job.base_step_s / modelled if job.base_step_s and modelled > 0 else 1.0
            eta = speed.plan_left_s(job.parts, step=step, final_mpx=job.final_mpx, scale=scale)
            if not job.base_step_s:
                eta = max(0.0, speed.plan_left_s(job.parts, step=0, final_mpx=job.final_mpx) - elapsed)
            asyncio.ensure_future(self._event(JobEvent(
                type="progress", job_id=job.envelope.job_id, ts=ts, step=step, total=total, elapsed_s=elapsed, eta_s=eta
            )))
            if now - job.last_status_write >= self.settings.progress_write_s and step < total:
                job.last_status_write = now
                asyncio.ensure_future(self._write_step(job, step, job.base_step_s))
            return
        if 1 < step <= total - refiner and first:  # the base's steps so far tell its step time
            job.base_step_s = (now - first) / (step - 1)
        step_s = job.base_step_s
        if step_s is not None:
            eta = speed.left_s(step=step, total=total, refiner_steps=refiner, step_s=step_s, mpx=request.pixels / 1e6)
        else:
            cost = speed.estimate(width=request.width, height=request.height, steps=total - refiner, refiner_steps=refiner)
            eta = max(0.0, cost - elapsed)
        event = JobEvent(
            type="progress", job_id=job.envelope.job_id, ts=ts, step=step, total=total, elapsed_s=elapsed, eta_s=eta
        )
        asyncio.ensure_future(self._event(event))
        if now - job.last_status_write >= self.settings.progress_write_s and step < total:
            job.last_status_write = now
            asyncio.ensure_future(self._write_step(job, step, step_s))

    async def _write_step(self, job: RunningJob, step: int, step_s: float | None) -> None:
        job_id = job.envelope.job_id
        step_at = time.time()
        if job.marking is not None:  # the step goes over the running mark, not beside it
            await asyncio.gather(job.marking, return_exceptions=True)

        def set_step(s: JobStatus) -> JobStatus | None:
            if s.state is not JobState.RUNNING or s.step >= step or (s.attempt, s.worker) != (job.attempt, self.worker_id):
                return None
            s.step, s.step_s, s.step_at = step, step_s, step_at
            return s

        try:
            status, revision, _ = await jobstore.change_status_at(self.status_kv, job_id, set_step, known=job.record)
            job.remember(status, revision)
        except Exception as exc:
            log.debug("job %s step write skipped: %s", job_id, exc)

    @staticmethod
    def _encode(image: Image.Image, fmt: str, quality: int) -> bytes:
        buf = io.BytesIO()
        if fmt == "JPEG" and image.mode != "RGB":
            image = image.convert("RGB")
        image.save(buf, format=fmt, quality=quality)
        return buf.getvalue()

    async def _tell_done_again(self, status: JobStatus | None) -> None:
        """A run that finds its job done publishes `done` again from the record: the run that finished
        it may have died before telling. The stream keeps one `done` per job (event_publisher)."""
        if status is not None and status.image is not None:
            await self._event(JobEvent(type="done", job_id=status.job_id, image=status.image, worker=status.worker))

    async def _event(self, event: JobEvent) -> None:
        await self.events.publish(event)  # gpu_worker/event_publisher.py: start and end survive an outage

    # -- outcomes (gpu_worker/outcomes.py) -------------------------------------------------------

    async def settle(self, msg: Msg, job_id: str, attempt: int, outcome: BaseException | None, duration: float) -> None:
        """Acks, naks or terms the message for this outcome (`outcomes.settle`)."""
        await outcomes.settle(self, msg, job_id, attempt, outcome, duration)
