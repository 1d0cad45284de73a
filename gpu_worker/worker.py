"""The worker's core loop: pull one job, run it off the event loop, store the image, then ack.

Each try goes through three steps: `admit` (admit.py: the message read and checked, the record read,
the uploads fetched), `start` (start.py: the running mark and the engine started together) and `finish`
(finish.py: the image stored, `done` written and told). Its outcome is settled in `outcomes.settle`, the
one place that acks, naks or terms a message.

A job may run twice (a worker can die after storing the image and before the ack): the image is
stored under the job id, so a second run overwrites it, and a job whose record already says `done`
is acked without running again. With `--max-batch` above 1, compatible jobs taken together
(take_together.py) are handled side by side and meet at the engine for one call (batching.py).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from gpu_worker import outcomes, registry
from gpu_worker.admit import admit, read_envelope
from gpu_worker.batching import Gathering
from gpu_worker.broker_wait import wait_for_broker
from gpu_worker.engines.base import Engine
from gpu_worker.errors import JobCancelled, JobExpired, JobFailed, Rerouted, RetryLater
from gpu_worker.event_publisher import EventPublisher
from gpu_worker.finish import finish
from gpu_worker.generation import launch
from gpu_worker.image_store import ImageStore
from gpu_worker.job_context import ContextThreadPool, JobContext, current_job
from gpu_worker.metrics import WorkerMetrics
from gpu_worker.naks import Naks
from gpu_worker.outcomes import BROKER_TROUBLE
from gpu_worker.prefetch import RecordPrefetch
from gpu_worker.puller import PriorityPuller
from gpu_worker.running_job import RunningJob
from gpu_worker.safety import SafetyStage, load_safety
from gpu_worker.settings import WorkerSettings
from gpu_worker.speed import SpeedMeter
from gpu_worker.start import start
from gpu_worker.take_together import take_together
from gpu_worker.thermal import TemperatureGuard, TemperatureSensor, temperature_guard
from gpu_worker.warm_up import run_warm_up
from schemas import names
from schemas.connect import connect
from schemas.jetstream import ensure_model_lanes, ensure_topology
from schemas.job import JobEnvelope

log = logging.getLogger("imagegen.worker")

KV_KEY_UNSAFE = re.compile(r"[^-_=.a-zA-Z0-9]")


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
        self.gathering: Gathering | None = None  # the jobs taken together, until they meet at the engine
        self.jobs_done = 0
        self.gpu = getattr(engine, "executor", None) or ContextThreadPool(max_workers=1, thread_name_prefix="imagegen-gpu")
        self.metrics = WorkerMetrics(self)
        self.nc: NATS | None = None
        self._tasks: list[asyncio.Task] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.prefetch: RecordPrefetch | None = None  # a job's record, read on its bell

    @property
    def current(self) -> RunningJob | None:
        """The job in hand (the first, when several were taken together)."""
        return next(iter(self.running.values()), None)

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        if self.safety is None and self.settings.safety_checker:
            device = self.engine.device
            self.safety = await self.loop.run_in_executor(None, lambda: load_safety(self.settings, device=device))
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
        self.prefetch = RecordPrefetch(self.status_kv, paused=lambda: self.thermal is not None and self.thermal.paused)
        await ensure_model_lanes(self.js, self.settings.topology, self.engine.name)
        self.puller = PriorityPuller(self.nc, fairness=self.settings.fairness, on_bell=self.prefetch.on_bell, model=self.engine.name)
        await self.puller.start()
        await self.nc.subscribe(names.CANCEL_SUBJECT, cb=self._on_cancel)
        self.naks = Naks(self.nc, ack_wait_s=self.settings.topology.ack_wait_s)
        await self.naks.start()
        await registry.register(self)
        self._tasks.append(asyncio.create_task(registry.beat(self)))
        if self.settings.metrics_port:
            await self.metrics.serve(host=self.settings.metrics_host, port=self.settings.metrics_port)
        log.info("worker %s ready: model=%s device=%s", self.worker_id, self.engine.name, self.engine.device)

    async def run(self) -> None:
        """Serves jobs until `stop()`; the job in hand is finished first."""
        while not self.stopping.is_set():
            if self.broker_trouble:
                await wait_for_broker(self)
            self.prefetch.waiting = True
            try:
                msg = await self.puller.next(self.stopping, hold=self._cool_enough if self.thermal else None)
            finally:
                self.prefetch.waiting = False
            if msg is None:
                break
            taken = await take_together(self, msg)
            if len(taken) == 1:
                await self.handle(msg)
            else:
                await self._handle_together(taken)

    async def _cool_enough(self) -> None:
        """Returns when the GPU is cool enough for a new job; the registry says when it pauses and resumes."""

        async def announce() -> None:
            try:
                await registry.register(self)
            except Exception as exc:  # broker away: the next heartbeat says it
                log.warning("worker %s registry update failed: %s", self.worker_id, exc)

        await self.thermal.wait_until_cool(self.stopping, on_change=announce)

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
        """Runs small jobs before serving (warm_up.py): kernels loaded, the first ETAs measured."""
        await run_warm_up(self)

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
            envelope = read_envelope(self, msg)
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
            if self.gathering is not None:
                self.gathering.leave(context.job_id)
        duration = context.duration_s = time.monotonic() - started
        try:
            self.metrics.try_ended(job, outcome, attempt=attempt, duration_s=duration)
            await outcomes.settle(self, msg, job_id, attempt, outcome, duration)
            await outcomes.audit(self, job_id, attempt, outcome, duration)
        finally:
            current_job.reset(context_token)

    async def _run(self, envelope: JobEnvelope, msg: Msg, attempt: int) -> None:
        """One try of one job: admit it, start the engine while the running mark goes out, finish it."""
        admitted = await admit(self, envelope, msg, attempt)
        if admitted is None:  # done already
            return
        started = await start(self, admitted)
        if started is not None:
            await finish(self, admitted.job, *started)

    async def _handle_together(self, taken: list[Msg]) -> None:
        ids = [(msg.headers or {}).get(names.MSG_ID_HEADER, "") for msg in taken]
        self.gathering = Gathering(ids, functools.partial(launch, self))
        log.info("jobs %s taken together", ",".join(ids))
        try:
            await asyncio.gather(*(self.handle(msg) for msg in taken))
        finally:
            self.gathering = None
