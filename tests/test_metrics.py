"""Prometheus metrics, scraped over HTTP as Prometheus does: the gateway's /metrics moves when a job
runs, and a worker with a metrics port serves its own counters, timings and speed."""

from __future__ import annotations

import asyncio
import secrets

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.settings import GatewaySettings
from gpu_worker.settings import WorkerSettings
from imagegen import runtime
from imagegen.embedded_nats import free_port
from schemas.jetstream import Topology
from schemas.request import Limits
from tests.helpers.real_processes import wait_state
from tests.helpers.service import Service, stop_service, wait_status

TIERS = {"high", "normal", "low"}


async def scrape(http, url: str) -> dict[tuple[str, tuple], float]:
    """Every sample as (name, sorted labels) -> value."""
    async with http.get(f"{url}/metrics") as r:
        assert r.status == 200, await r.text()
        assert r.content_type == "text/plain"
        text = await r.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def names(samples: dict) -> set[str]:
    return {name for name, _ in samples}


async def submit(http, url: str, **fields) -> str:
    body = {"prompt": "a lighthouse at dusk", "seed": 3, "width": 64, "height": 64, "steps": 3, **fields}
    async with http.post(f"{url}/api/generate", json=body) as r:
        assert r.status == 200, await r.text()
        return (await r.json())["task_id"]


async def scrape_until(http, url: str, ready, *, timeout_s: float = 30.0) -> dict:
    """Scrapes until `ready(samples)`: a worker counts a try just after it writes the final status."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        samples = await scrape(http, url)
        if ready(samples) or asyncio.get_running_loop().time() > deadline:
            return samples
        await asyncio.sleep(0.05)


async def test_gateway_metrics_move_when_a_job_is_done(service, http):
    before = await scrape(http, service.url)
    assert {dict(labels)["tier"] for name, labels in before if name == "imagegen_queue_depth"} == TIERS
    assert value(before, "imagegen_workers") >= 1

    prompt = f"a lighthouse at dusk {secrets.token_hex(4)}"  # a request no earlier test made
    task_id = await submit(http, service.url, prompt=prompt)
    assert (await wait_status(http, service.url, task_id))["status"] == "done"
    after = await scrape(http, service.url)

    assert value(after, "imagegen_jobs_finished_total", outcome="done") >= value(before, "imagegen_jobs_finished_total", outcome="done") + 1
    submitted = ("imagegen_jobs_submitted_total", {"tier": "normal", "api": "mflux"})
    assert value(after, submitted[0], **submitted[1]) == value(before, submitted[0], **submitted[1]) + 1
    wait_count = ("imagegen_queue_wait_seconds_count", {"tier": "normal"})
    assert value(after, wait_count[0], **wait_count[1]) >= value(before, wait_count[0], **wait_count[1]) + 1
    assert value(after, "imagegen_generation_seconds_count") >= value(before, "imagegen_generation_seconds_count") + 1
    assert value(after, "imagegen_generation_seconds_sum") > value(before, "imagegen_generation_seconds_sum")
    generated = ("imagegen_http_requests_total", {"route": "/api/generate", "method": "POST", "status": "200"})
    assert value(after, generated[0], **generated[1]) >= value(before, generated[0], **generated[1]) + 1
    assert value(after, "imagegen_cache_misses_total") == value(before, "imagegen_cache_misses_total") + 1

    again = await submit(http, service.url, prompt=prompt)  # the same seeded request: answered from the result cache
    assert (await wait_status(http, service.url, again))["status"] == "done"
    cached = await scrape(http, service.url)
    assert value(cached, "imagegen_cache_hits_total") == value(after, "imagegen_cache_hits_total") + 1
    # a hit is a job submitted and finished done like any other, so the counts still add up
    assert value(cached, submitted[0], **submitted[1]) == value(after, submitted[0], **submitted[1]) + 1
    done = ("imagegen_jobs_finished_total", {"outcome": "done"})
    assert value(cached, done[0], **done[1]) == value(after, done[0], **done[1]) + 1
    assert value(cached, "imagegen_generation_seconds_count") == value(after, "imagegen_generation_seconds_count")


async def test_a_submit_repeated_with_its_idempotency_key_is_counted_once(service, http):
    body = {"prompt": f"counted once {secrets.token_hex(4)}", "width": 64, "height": 64, "steps": 2}
    headers = {"Idempotency-Key": secrets.token_hex(8)}
    before = await scrape(http, service.url)
    job_ids = []
    for _ in range(3):
        async with http.post(f"{service.url}/v1/jobs", json=body, headers=headers) as r:
            assert r.status == 202, await r.text()
            job_ids.append((await r.json())["job_id"])
    assert len(set(job_ids)) == 1
    await wait_state(http, service.url, job_ids[0], {"done", "failed"}, timeout=120)
    after = await scrape(http, service.url)
    submitted = ("imagegen_jobs_submitted_total", {"tier": "normal", "api": "native"})
    assert value(after, submitted[0], **submitted[1]) == value(before, submitted[0], **submitted[1]) + 1


async def test_http_requests_are_counted_by_route_not_by_path(service, http):
    before = await scrape(http, service.url)
    async with http.get(f"{service.url}/v1/jobs/no-such-job-id-0000") as r:
        assert r.status == 404
    after = await scrape(http, service.url)
    unknown = ("imagegen_http_requests_total", {"route": "/v1/jobs/{job_id}", "method": "GET", "status": "404"})
    assert value(after, unknown[0], **unknown[1]) == value(before, unknown[0], **unknown[1]) + 1
    assert not any("no-such-job" in str(labels) for _, labels in after)


async def test_openmetrics_is_served_when_asked_for(service, http):
    async with http.get(f"{service.url}/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}) as r:
        assert r.status == 200
        assert r.content_type == "application/openmetrics-text"
        assert (await r.text()).rstrip().endswith("# EOF")


class FixedSensor:
    """Stands in for a GPU's temperature sensor, which a CPU machine has not."""

    def read(self) -> float:
        return 61.5


async def start_metered_service(nats_url: str, data_dir, *, metrics_port: int) -> Service:
    """A gateway and a tiny-sdxl worker with a metrics port, that accepts at most 4 steps."""
    topology = Topology(ack_wait_s=10, worker_ttl_s=10)
    settings = WorkerSettings(
        nats_url=nats_url, model="tiny-sdxl", device="cpu", data_dir=str(data_dir), heartbeat_s=1.0,
        topology=topology, metrics_port=metrics_port, limits=Limits(max_steps=4),
    )
    worker, task = await runtime.start_worker(settings, sensor=FixedSensor())
    gateway = await runtime.start_gateway(GatewaySettings(nats_url=nats_url, port=0, topology=topology))
    return Service(url=f"http://127.0.0.1:{gateway.port}", nats_url=nats_url, gateway=gateway, worker=worker, worker_task=task)


async def test_worker_metrics_port_serves_done_and_failed_tries(broker, data_dir, http):
    """The worker's limit of 4 steps fails a 6-step job the gateway let through."""
    port = free_port()
    svc = await start_metered_service(broker.url, data_dir, metrics_port=port)
    worker_url = f"http://127.0.0.1:{port}"
    try:
        idle = await scrape(http, worker_url)
        assert value(idle, "imagegen_worker_busy") == 0
        assert value(idle, "imagegen_worker_paused_hot") == 0
        assert value(idle, "imagegen_gpu_temperature_celsius", device="cpu") == 61.5
        assert "imagegen_gpu_memory_allocated_bytes" not in names(idle)  # no CUDA memory on a CPU worker

        task_id = await submit(http, svc.url)
        assert (await wait_status(http, svc.url, task_id))["status"] == "done"
        done = await scrape_until(http, worker_url, lambda s: value(s, "imagegen_worker_jobs_total", outcome="done") >= 1)
        assert value(done, "imagegen_worker_jobs_total", outcome="done") == 1
        assert value(done, "imagegen_worker_steps_per_second") > 0
        assert value(done, "imagegen_worker_steps_total") == 3
        assert value(done, "imagegen_worker_generation_seconds_count") == 1
        assert value(done, "imagegen_worker_queue_wait_seconds_count") == 1
        assert value(done, "imagegen_worker_redeliveries_total") == 0

        gateway_before = await scrape(http, svc.url)
        task_id = await submit(http, svc.url, steps=6)
        answer = await wait_status(http, svc.url, task_id)
        assert answer["status"] == "error" and "steps" in answer["error"]
        failed = await scrape_until(http, worker_url, lambda s: value(s, "imagegen_worker_jobs_total", outcome="failed") >= 1)
        assert value(failed, "imagegen_worker_jobs_total", outcome="failed") == 1
        assert value(failed, "imagegen_worker_jobs_total", outcome="done") == 1
        assert value(failed, "imagegen_worker_generation_seconds_count") == 1  # a failed try is not a generation
        gateway_after = await scrape(http, svc.url)
        assert value(gateway_after, "imagegen_jobs_finished_total", outcome="failed") == value(
            gateway_before, "imagegen_jobs_finished_total", outcome="failed"
        ) + 1
    finally:
        await stop_service(svc)
    with pytest.raises(aiohttp.ClientConnectionError):  # the worker's close stops its metrics server
        async with http.get(f"{worker_url}/metrics"):
            pass


def test_k8s_scrape_annotations_name_the_ports_metrics_are_served_on():
    from tests.helpers.deploy_files import containers, k8s_deployment_of

    for kind in ("gateway", "worker"):
        for c in containers("k8s", kind):
            args = c.parse()
            annotations = k8s_deployment_of(c)["spec"]["template"]["metadata"]["annotations"]
            assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
            port = int(annotations["prometheus.io/port"])
            if kind == "gateway":
                assert port == args.port, c.where
            else:
                assert port == args.metrics_port and args.metrics_host == "0.0.0.0", c.where
                assert port in [p["containerPort"] for p in c.spec["ports"]], c.where
