"""The gateway's Prometheus metrics, served at /metrics.

Each gateway keeps its own registry (not prometheus_client's global one), so several gateways in one
process do not collide. Queue depth, running jobs, live workers and cache counts are read from the
queue view and the job service when scraped.

The counts add up: `imagegen_jobs_submitted` counts the jobs this gateway created, queued or answered
from the result cache (a submit that returned an existing job, an idempotent repeat, is not counted);
`imagegen_jobs_finished` counts every job of the cluster once, when the queue view sees it reach a
final state, whichever gateway took it, a cache hit as `done`. So, with one gateway and no jobs
published straight onto NATS, submitted = finished + queued + running; with several gateways, sum
submits over gateways but take one gateway's (or the max of their) outcome counts. The queue-wait and
generation-time histograms come from the same status changes; HTTP requests count what this gateway
answered.
"""

from __future__ import annotations

import contextvars
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from schemas.metrics import GENERATION_BUCKETS, QUEUE_WAIT_BUCKETS, exposition
from schemas.status import JobState, JobStatus

current_api: contextvars.ContextVar[str] = contextvars.ContextVar("imagegen_api", default="other")
"""The API the request being handled came in by, set by the middleware for the submit counter: the job
service, which creates the jobs, knows nothing of HTTP."""


def api_of(path: str) -> str:
    if path.startswith("/api/"):
        return "mflux"
    if path.startswith("/v1/images/"):
        return "openai"
    if path.startswith("/v1/"):
        return "native"
    return "other"


def route_of(request: web.Request) -> str:
    """The route's pattern (`/v1/jobs/{job_id}`), never the raw path: one series per route."""
    resource = request.match_info.route.resource if request.match_info.route else None
    return resource.canonical if resource is not None else "unmatched"


class GatewayMetrics:
    def __init__(self, jobs: Any):
        self.jobs = jobs
        self.registry = CollectorRegistry()
        self.submitted = Counter(
            "imagegen_jobs_submitted", "Jobs this gateway created (queued, or answered from the result cache), by tier and API.",
            ["tier", "api"], registry=self.registry,
        )
        self.finished = Counter(
            "imagegen_jobs_finished", "Jobs that reached a final state, by outcome; a result-cache hit is done.",
            ["outcome"], registry=self.registry,
        )
        self.queue_wait = Histogram(
            "imagegen_queue_wait_seconds", "Seconds from submit to a worker starting the job.", ["tier"],
            buckets=QUEUE_WAIT_BUCKETS, registry=self.registry,
        )
        self.generation = Histogram(
            "imagegen_generation_seconds", "Seconds from a worker starting a job to its image being done.",
            buckets=GENERATION_BUCKETS, registry=self.registry,
        )
        self.http = Counter(
            "imagegen_http_requests", "HTTP requests answered, by route, method and status.",
            ["route", "method", "status"], registry=self.registry,
        )
        self.webhook_calls = Counter(
            "imagegen_webhook_calls", "Webhook calls this gateway made, by moment and outcome: delivered, retried (failed, "
            "to be tried again) or given_up.", ["moment", "outcome"], registry=self.registry,
        )
        for state in (JobState.DONE, JobState.FAILED, JobState.CANCELLED, JobState.EXPIRED):
            self.finished.labels(outcome=state.value)
        self.registry.register(_ScrapeTimeCollector(jobs))
        jobs.view.listeners.append(self.observe_change)
        jobs.submit_listeners.append(self.count_submit)

    def count_webhook_call(self, moment: str, outcome: str) -> None:
        self.webhook_calls.labels(moment=moment, outcome=outcome).inc()

    # -- what the queue view sees -----------------------------------------------------------------

    def observe_change(self, before: JobStatus | None, after: JobStatus) -> None:
        """Counts a job's change of state once. A record first seen already final is counted only when
        it is a result-cache hit arriving while the view is live: the records the view is rebuilt from
        at start, and records seen again, are not counted."""
        if before is None:
            if after.cached and after.state is JobState.DONE and self.jobs.view.ready.is_set():
                self.finished.labels(outcome=JobState.DONE.value).inc()
            return
        if before.state.final:
            return
        if before.state is JobState.QUEUED and after.state is not JobState.QUEUED and after.started_at:
            self.queue_wait.labels(tier=after.tier.value).observe(max(0.0, after.started_at - after.submitted_at))
        if after.state.final:
            self.finished.labels(outcome=after.state.value).inc()
            if after.state is JobState.DONE and after.compute_time is not None:
                self.generation.observe(max(0.0, after.compute_time))

    # -- what this gateway answers ----------------------------------------------------------------

    def count_submit(self, status: JobStatus) -> None:
        """Called by the job service for each job a submit created."""
        self.submitted.labels(tier=status.tier.value, api=current_api.get()).inc()

    @web.middleware
    async def middleware(self, request: web.Request, handler):
        current_api.set(api_of(request.path))
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            self.http.labels(route=route_of(request), method=request.method, status=str(status)).inc()

    async def handler(self, request: web.Request) -> web.Response:
        body, content_type = exposition(self.registry, request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type})


class _ScrapeTimeCollector:
    """Gauges and counters read when scraped: queue depth per tier, running jobs, live workers, and
    the result cache's hits and misses (zero while the job service has no cache)."""

    def __init__(self, jobs: Any):
        self.jobs = jobs

    def collect(self):
        view = self.jobs.view
        depth = GaugeMetricFamily("imagegen_queue_depth", "Jobs queued, by tier.", labels=["tier"])
        for tier, n in view.queue_depth().items():
            depth.add_metric([tier], n)
        yield depth
        yield GaugeMetricFamily("imagegen_jobs_running", "Jobs a worker is running.", value=len(view.running))
        yield GaugeMetricFamily("imagegen_workers", "Live workers.", value=len(view.live_workers()))
        cache = getattr(self.jobs, "cache", None)
        yield CounterMetricFamily("imagegen_cache_hits", "Requests answered from the result cache.", value=_count(cache, "hits"))
        yield CounterMetricFamily("imagegen_cache_misses", "Requests the result cache could not answer.", value=_count(cache, "misses"))


def _count(obj: Any, name: str) -> float:
    value = getattr(obj, name, 0) if obj is not None else 0
    try:
        return float(value() if callable(value) else value)
    except (TypeError, ValueError):
        return 0.0
