"""What an operator sees of the pool: `GET /v1/workers` (each live worker as it last published itself,
with its release), `/healthz` with the gateway's release, and `imagegen --version`."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import pytest

from gateway.http.auth import new_key_entry
from gateway.settings import GatewaySettings
from imagegen import __version__, runtime
from schemas.workers import DEFAULT_FAIRNESS
from tests.helpers.service import start_service, stop_service


async def workers_of(http, url: str, headers: dict | None = None) -> list[dict]:
    async with http.get(f"{url}/v1/workers", headers=headers) as r:
        assert r.status == 200, await r.text()
        body = await r.json()
    assert body["gateway_version"] == __version__
    return body["workers"]


async def test_the_workers_endpoint_lists_each_live_worker_with_its_release(service, http):
    workers = await workers_of(http, service.url)
    assert [w["worker_id"] for w in workers] == sorted(w["worker_id"] for w in workers)
    [mine] = [w for w in workers if w["worker_id"] == service.worker.worker_id]
    assert mine["model"] == "tiny-sdxl" and mine["device"] == "cpu" and mine["has_refiner"] is True
    assert mine["version"] == __version__
    assert mine["loras"] == []  # the session's worker loaded no adapter
    assert mine["fairness"] == DEFAULT_FAIRNESS
    assert mine["speed"]["step_s_per_mpx"] >= 0 and mine["seen_at"] <= time.time() + 1
    async with http.get(f"{service.url}/healthz") as r:
        assert (await r.json())["version"] == __version__


@pytest.mark.processes  # runs the imagegen command
def test_the_command_says_its_release():
    done = subprocess.run([sys.executable, "-m", "imagegen", "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == f"imagegen {__version__}"


async def test_a_busy_workers_job_is_named_only_to_whoever_may_see_the_job(broker, data_dir, http):
    """With API keys, another key sees that the worker is busy but not which job it runs."""
    service = await start_service(broker.url, data_dir, model="simulated", refiner=None, sim_step_s=0.2)
    design_secret, design = new_key_entry("design", tiers=["normal"], rate_per_minute=100, max_concurrent=5)
    other_secret, other = new_key_entry("marketing", tiers=["normal"], rate_per_minute=100, max_concurrent=5)

    keyed = await runtime.start_gateway(GatewaySettings(nats_url=broker.url, port=0, api_keys=json.dumps([design, other])))
    url = f"http://127.0.0.1:{keyed.port}"
    try:
        async with http.get(f"{url}/v1/workers") as r:
            assert r.status == 401
        headers = {"Authorization": f"Bearer {design_secret}"}
        body = {"prompt": "a long one", "width": 64, "height": 64, "steps": 50}
        async with http.post(f"{url}/v1/jobs", json=body, headers=headers) as r:
            assert r.status == 202, await r.text()
            job_id = (await r.json())["job_id"]
        deadline = time.monotonic() + 30
        while True:  # the worker publishes itself on its heartbeat (1 s here)
            [worker] = await workers_of(http, url, headers)
            if worker["job_id"] == job_id:
                break
            assert time.monotonic() < deadline, worker
            await asyncio.sleep(0.2)
        assert worker["state"] == "busy"
        [seen_by_other] = await workers_of(http, url, {"Authorization": f"Bearer {other_secret}"})
        assert seen_by_other["worker_id"] == worker["worker_id"] and seen_by_other["state"] == "busy"
        assert seen_by_other["job_id"] is None
        [seen_without_keys] = await workers_of(http, service.url)
        assert seen_without_keys["job_id"] == job_id
        async with http.delete(f"{url}/v1/jobs/{job_id}", headers=headers) as r:
            assert r.status == 200
    finally:
        await keyed.stop()
        await stop_service(service)
