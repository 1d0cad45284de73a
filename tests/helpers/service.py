"""The service in the test's own loop (a gateway and a worker on a given nats-server), a gateway with API
keys, and the reads the tests wait with (mflux-server's status, a job's events over NATS)."""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from nats.js.api import DeliverPolicy

from gateway.http.auth import new_key_entry
from gateway.settings import GatewaySettings
from gpu_worker.settings import WorkerSettings
from imagegen import runtime
from schemas import names
from schemas.codec import decode
from schemas.events import JobEvent
from schemas.jetstream import Topology


@dataclass
class Service:
    url: str
    nats_url: str
    gateway: runtime.RunningGateway
    worker: object
    worker_task: asyncio.Task


async def start_service(
    nats_url: str, data_dir: Path, *, model: str = "tiny-sdxl", refiner: str | None = "tiny-sdxl-refiner", gateway_kw: dict | None = None, **worker_kw
) -> Service:
    topology = Topology(ack_wait_s=10, worker_ttl_s=10)
    worker, task = await runtime.start_worker(
        WorkerSettings(
            nats_url=nats_url,
            model=model,
            refiner=refiner,
            device="cpu",
            data_dir=str(data_dir),
            heartbeat_s=1.0,
            topology=topology,
            **worker_kw,
        )
    )
    gateway = await runtime.start_gateway(GatewaySettings(nats_url=nats_url, port=0, topology=topology, **(gateway_kw or {})))
    return Service(url=f"http://127.0.0.1:{gateway.port}", nats_url=nats_url, gateway=gateway, worker=worker, worker_task=task)


async def stop_service(service: Service) -> None:
    service.worker.stop()
    await asyncio.wait_for(service.worker_task, 30)
    await service.worker.close()
    await service.gateway.stop()


@asynccontextmanager
async def gateway_with_keys(nats_url: str, **tiers: list[str]):
    """A gateway of its own with API keys on, one key per name given with those tiers:
    yields (its URL, {name: secret})."""
    entries = {name: new_key_entry(name, tiers=t, rate_per_minute=100, max_concurrent=10) for name, t in tiers.items()}
    keys = json.dumps([entry for _, entry in entries.values()])
    gateway = await runtime.start_gateway(GatewaySettings(nats_url=nats_url, port=0, api_keys=keys))
    try:
        yield f"http://127.0.0.1:{gateway.port}", {name: secret for name, (secret, _) in entries.items()}
    finally:
        await gateway.stop()


async def wait_status(http: aiohttp.ClientSession, url: str, task_id: str, *, timeout: float = 120) -> dict:
    """Polls /api/status as mflux-server's clients do, until it is no longer waiting."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        async with http.get(f"{url}/api/status", params={"task_id": task_id}) as r:
            assert r.status == 200, await r.text()
            body = await r.json()
        if body["status"] != "waiting":
            return body
        await asyncio.sleep(0.05)
    raise AssertionError(f"task {task_id} still waiting after {timeout}s")


async def collect_events(js, job_id: str, *, timeout: float = 60) -> list[JobEvent]:
    """A job's events over NATS (its own ordered consumer), from the first to the final one."""
    sub = await js.subscribe(names.events_subject(job_id), ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
    events: list[JobEvent] = []
    try:
        async with asyncio.timeout(timeout):
            while not events or not events[-1].final:
                events.append(decode((await sub.next_msg(timeout=timeout)).data, JobEvent))
    finally:
        await sub.unsubscribe()
    return events
