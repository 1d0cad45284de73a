"""The worker's Prometheus metrics and the small HTTP server that serves them at /metrics.

Each worker keeps its own registry (not prometheus_client's global one), so several workers in one
process do not collide. Counters move when a try ends; busy, GPU memory and GPU temperature are read
when scraped. GPU memory is absent off CUDA, and temperature is absent without a sensor: the one the
worker's temperature guard reads (`gpu_worker.thermal`), else NVML through torch on a CUDA device.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from gpu_worker.errors import JobCancelled, JobExpired, JobFailed, JobLost, Rerouted, RetryLater
from schemas.connect import BROKER_ERRORS
from schemas.metrics import GENERATION_BUCKETS, QUEUE_WAIT_BUCKETS, exposition

log = logging.getLogger("imagegen.worker.metrics")

OUTCOMES = ("done", "failed", "cancelled", "expired", "deferred", "retried", "rerouted", "lost")


def outcome_label(outcome: BaseException | None, *, attempt: int, max_deliver: int) -> str:
    """How a try ended, as `settle` treats it: retried tries go back to the queue."""
    if outcome is None:
        return "done"
    if isinstance(outcome, JobLost):
        return "lost"
    if isinstance(outcome, JobCancelled):
        return "cancelled"
    if isinstance(outcome, JobExpired):
        return "expired"
    if isinstance(outcome, RetryLater):
        return "deferred"
    if isinstance(outcome, Rerouted):
        return "rerouted"
    if isinstance(outcome, JobFailed):
        return "failed"
    if isinstance(outcome, BROKER_ERRORS):
        return "retried"
    return "failed" if attempt >= max_deliver else "retried"


def steps_per_second(job: Any) -> float | None:
    """Denoising speed of a finished run, from the spacing of its step callbacks."""
    steps, first, last = job.total, job.stamps.first, job.stamps.last
    if not steps or last is None:
        return None
    if steps > 1 and first is not None and last > first:
        return (steps - 1) / (last - first)
    return steps / (last - job.started) if last > job.started else None


class WorkerMetrics:
    def __init__(self, worker: Any):
        self.worker = worker
        self.registry = CollectorRegistry()
        self.jobs = Counter("imagegen_worker_jobs", "Tries this worker ended, by outcome.", ["outcome"], registry=self.registry)
        self.generation = Histogram(
            "imagegen_worker_generation_seconds", "Seconds a done job took on this worker, from start to stored image.",
            buckets=GENERATION_BUCKETS, registry=self.registry,
        )
        self.queue_wait = Histogram(
            "imagegen_worker_queue_wait_seconds", "Seconds from submit to this worker starting a job's first try.",
            buckets=QUEUE_WAIT_BUCKETS, registry=self.registry,
        )
        self.steps_per_second = Gauge(
            "imagegen_worker_steps_per_second", "Denoising steps per second of the last done job.", registry=self.registry
        )
        self.steps = Counter("imagegen_worker_steps", "Denoising steps of done jobs.", registry=self.registry)
        self.redeliveries = Counter(
            "imagegen_worker_redeliveries", "Jobs taken again after an earlier try did not finish.", registry=self.registry
        )
        self.batch_size = Histogram(
            "imagegen_worker_batch_size", "Images made by one engine call (above 1: jobs taken together, --max-batch).",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16), registry=self.registry,
        )
        for outcome in OUTCOMES:
            self.jobs.labels(outcome=outcome)
        self.registry.register(_DeviceCollector(worker))
        self._runner: web.AppRunner | None = None

    def try_started(self, attempt: int) -> None:
        if attempt > 1:
            self.redeliveries.inc()

    def batch_ran(self, size: int) -> None:
        self.batch_size.observe(size)

    def try_ended(self, job: Any, outcome: BaseException | None, *, attempt: int, duration_s: float) -> None:
        """`job` is the run in hand (None when the try ended before a run began)."""
        label = outcome_label(outcome, attempt=attempt, max_deliver=self.worker.settings.topology.max_deliver)
        self.jobs.labels(outcome=label).inc()
        if job is None:
            return
        if attempt == 1:
            started_at = time.time() - (time.monotonic() - job.started)
            self.queue_wait.observe(max(0.0, started_at - job.envelope.submitted_at))
        if label == "done":
            self.generation.observe(duration_s)
            speed = steps_per_second(job)
            if speed is not None:
                self.steps_per_second.set(speed)
            self.steps.inc(job.total)

    # -- serving --------------------------------------------------------------------------------

    async def handler(self, request: web.Request) -> web.Response:
        body, content_type = exposition(self.registry, request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def serve(self, *, host: str, port: int) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self.handler)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        log.info("worker metrics on http://%s:%d/metrics", host, port)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


class _DeviceCollector:
    """Read when scraped: busy or idle, and the GPU's memory and temperature where there is one."""

    def __init__(self, worker: Any):
        self.worker = worker

    def collect(self):
        yield GaugeMetricFamily("imagegen_worker_busy", "1 while the worker has a job in hand, else 0.", value=int(self.worker.current is not None))
        yield GaugeMetricFamily(
            "imagegen_worker_paused_hot", "1 while a hot GPU keeps the worker from taking new jobs.",
            value=int(bool(getattr(self.worker, "paused_hot", False))),
        )
        device = str(self.worker.engine.device)
        memory = gpu_memory_bytes(device)
        if memory is not None:
            allocated = GaugeMetricFamily("imagegen_gpu_memory_allocated_bytes", "GPU memory held by tensors.", labels=["device"])
            reserved = GaugeMetricFamily("imagegen_gpu_memory_reserved_bytes", "GPU memory held by torch's caching allocator.", labels=["device"])
            allocated.add_metric([device], memory[0])
            reserved.add_metric([device], memory[1])
            yield allocated
            yield reserved
        temperature = gpu_temperature_c(device, sensor=temperature_sensor(self.worker))
        if temperature is not None:
            gauge = GaugeMetricFamily("imagegen_gpu_temperature_celsius", "GPU die temperature.", labels=["device"])
            gauge.add_metric([device], temperature)
            yield gauge


def _cuda_torch(device: str):
    """torch, when this worker already loaded it and `device` is a CUDA device it can see."""
    torch = sys.modules.get("torch")
    if torch is None or not device.startswith("cuda"):
        return None
    try:
        return torch if torch.cuda.is_available() else None
    except Exception:
        return None


def gpu_memory_bytes(device: str) -> tuple[int, int] | None:
    """(allocated, reserved) bytes on a CUDA device; None off CUDA."""
    torch = _cuda_torch(device)
    if torch is None:
        return None
    try:
        return torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
    except Exception:
        return None


def temperature_sensor(worker: Any) -> Any:
    """The sensor the worker's temperature guard reads, or the one it was given; None without."""
    guard = getattr(worker, "thermal", None)
    return getattr(guard, "sensor", None) or getattr(worker, "sensor", None)


def gpu_temperature_c(device: str, *, sensor: Any = None) -> float | None:
    """The GPU's temperature from `sensor` (anything with `read()`), else from NVML on a CUDA
    device; None where neither answers."""
    if sensor is not None:
        try:
            return float(sensor.read())
        except Exception:
            return None
    torch = _cuda_torch(device)
    if torch is None:
        return None
    try:
        return float(torch.cuda.temperature(torch.device(device)))  # NVML; needs nvidia-ml-py
    except Exception:
        return None
