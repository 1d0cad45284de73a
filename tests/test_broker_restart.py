"""Nothing is lost when the broker goes away in the middle of a run: a gateway and a worker run as real
processes and jobs go in over HTTP, then nats-server is killed and started again on the same port and
store (while it is down the gateway answers 503 with Retry-After at once instead of hanging), or one node
of a three-node JetStream cluster on loopback is killed (the one leading the job stream). Each test takes
10-25 s on two cores, most of it the broker's own recovery."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import aiohttp
import nats
import pytest

from imagegen.embedded_nats import EmbeddedNats, free_port
from schemas import names
from tests.helpers.real_processes import job_state, submit, wait_state

TOPOLOGY_FLAGS = ("--ack-wait", "3", "--max-deliver", "3")  # few tries: an outage must not use them up
JOBS = 20
OUTAGE_S = 6.0  # longer than the ack wait and the gateway's NATS timeout: work in flight outlives its requests


async def done_ones(http: aiohttp.ClientSession, url: str, job_ids: list[str]) -> list[str]:
    return [job_id for job_id in job_ids if (await job_state(http, url, job_id))["state"] == "done"]


async def run_of_jobs(http: aiohttp.ClientSession, url: str) -> tuple[list[str], list[str]]:
    """Submits JOBS small jobs and returns once a few are done: (all ids, ids done so far)."""
    job_ids = [
        await submit(http, url, {"prompt": f"job {n}", "width": 64, "height": 64, "steps": 4, "seed": n})
        for n in range(JOBS)
    ]
    deadline = time.monotonic() + 30
    while len(done := await done_ones(http, url, job_ids)) < 3:
        assert time.monotonic() < deadline, f"only {len(done)} jobs done after 30s"
        await asyncio.sleep(0.05)
    return job_ids, done


async def all_finished(http: aiohttp.ClientSession, url: str, job_ids: list[str]) -> list[str]:
    return [(await wait_state(http, url, job_id, {"done", "failed"}, timeout=60))["state"] for job_id in job_ids]


async def test_broker_restart_mid_run_loses_no_job(broker, parts, http):
    worker = await parts.worker(broker.url, *TOPOLOGY_FLAGS, "--sim-step-s", "0.05", name="worker")
    port = free_port()
    gateway = await parts.gateway(broker.url, port, *TOPOLOGY_FLAGS)
    url = f"http://127.0.0.1:{port}"
    job_ids, done = await run_of_jobs(http, url)
    done_before = done[0]

    first_url = broker.url
    broker.process.kill()
    broker.process.wait(timeout=10)
    bounded = aiohttp.ClientTimeout(total=10)
    async with http.post(f"{url}/api/generate", json={"prompt": "while the broker is down"}, timeout=bounded) as r:
        refused = r.status, r.headers.get("Retry-After"), await r.json()
    async with http.get(f"{url}/api/image", params={"task_id": done_before, "delete": "false"}, timeout=bounded) as r:
        image_while_down = r.status, r.headers.get("Retry-After")
    async with http.get(f"{url}/api/status", params={"task_id": done_before}, timeout=bounded) as r:
        status_while_down = r.status, await r.json()
    await asyncio.sleep(OUTAGE_S)
    broker.start()
    assert broker.url == first_url  # the same address: the clients reconnect to it

    assert refused[0] == 503 and refused[1] and "unavailable" in refused[2]["error"]
    assert image_while_down[0] == 503 and image_while_down[1]
    assert status_while_down == (200, {"status": "done"})  # polling clients keep going
    assert await all_finished(http, url, job_ids) == ["done"] * JOBS
    for job_id in job_ids:
        async with http.get(f"{url}/v1/jobs/{job_id}/image", timeout=aiohttp.ClientTimeout(total=10)) as r:
            assert r.status == 200, await r.text()
    assert worker.alive and gateway.alive


def distinct_free_ports(count: int) -> list[int]:
    """`count` free loopback ports, all different: each is held while the next is picked."""
    with contextlib.ExitStack() as held:
        sockets = [held.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def cluster_of_three(tmp_path) -> list[EmbeddedNats]:
    """Three JetStream nodes routed to each other on loopback, each with its own store and name."""
    client_ports, route_ports = (ports := distinct_free_ports(6))[:3], ports[3:]
    routes = ",".join(f"nats://127.0.0.1:{port}" for port in route_ports)
    return [
        EmbeddedNats(
            store_dir=tmp_path / f"node{n}",
            port=client_ports[n],
            extra_args=["--server_name", f"node{n}", "--cluster_name", "imagegen",
                        "--cluster", f"nats://127.0.0.1:{route_ports[n]}", "--routes", routes],
        )
        for n in range(3)
    ]


async def wait_jetstream_ready(url: str, *, timeout: float = 30) -> None:
    """Until the nodes have elected a JetStream meta leader and answer API requests."""
    deadline = time.monotonic() + timeout
    nc = await nats.connect(servers=url.split(","))
    try:
        while True:
            try:
                await nc.jetstream(timeout=1).account_info()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
    finally:
        await nc.close()


@pytest.fixture
def cluster(tmp_path):
    nodes = cluster_of_three(tmp_path)
    for node in nodes:
        node.start()
    yield nodes
    for node in nodes:
        node.stop()


async def test_cluster_node_killed_mid_run_loses_no_job(cluster, parts, http):
    urls = ",".join(node.url for node in cluster)
    await wait_jetstream_ready(urls)
    flags = (*TOPOLOGY_FLAGS, "--replicas", "3")
    worker = await parts.worker(urls, *flags, "--sim-step-s", "0.05", name="worker")
    port = free_port()
    gateway = await parts.gateway(urls, port, *flags)
    url = f"http://127.0.0.1:{port}"
    job_ids, _ = await run_of_jobs(http, url)

    nc = await nats.connect(servers=urls.split(","))
    try:
        leader = (await nc.jetstream().stream_info(names.JOBS_STREAM)).cluster.leader
    finally:
        await nc.close()
    victim = next(node for node in cluster if node.extra_args[1] == leader)
    victim.process.kill()
    victim.process.wait(timeout=10)

    assert await all_finished(http, url, job_ids) == ["done"] * JOBS
    assert worker.alive and gateway.alive


async def test_a_job_whose_publish_fails_is_not_left_queued(service, http, monkeypatch):
    """The broker takes the job's record, then fails the publish (a fake publish raising what nats-py
    raises on a timeout): the caller gets 503, and the record is taken back instead of waiting forever as
    `queued` and holding a place in its key's quota. With an Idempotency-Key it stays queued for the
    retry, which publishes it, and the job is done."""
    import nats.errors

    from gateway.core.caller import SERVICE

    jobs = service.gateway.runner.app[SERVICE]
    real_publish = jobs.submit_js.publish  # the context of a submit's own writes

    async def publish_fails(subject, *args, **kw):  # KV writes and events are publishes too: only jobs fail
        if subject.startswith("imagegen.jobs."):
            raise nats.errors.TimeoutError
        return await real_publish(subject, *args, **kw)

    monkeypatch.setattr(jobs.submit_js, "publish", publish_fails)
    body = {"prompt": "publish fails", "width": 64, "height": 64, "steps": 2, "cache": False}
    async with http.post(f"{service.url}/v1/jobs", json=body) as r:
        assert r.status == 503, await r.text()
    async with http.get(f"{service.url}/api/tasks") as r:
        left = [t for t in await r.json() if t.get("prompt") == "publish fails"]
    assert all(t["status"] != "waiting" for t in left), left

    headers = {"Idempotency-Key": "publish-fails-then-retried"}
    async with http.post(f"{service.url}/v1/jobs", json=body, headers=headers) as r:
        assert r.status == 503
    monkeypatch.setattr(jobs.submit_js, "publish", real_publish)
    for _ in range(20):  # as a client does: again after a 503 (the gateway asks the job streams first)
        async with http.post(f"{service.url}/v1/jobs", json=body, headers=headers) as r:
            if r.status != 503:
                assert r.status == 202, await r.text()
                retried = (await r.json())["job_id"]
                break
        await asyncio.sleep(0.2)
    assert (await wait_state(http, service.url, retried, {"done", "failed"}, timeout=120))["state"] == "done"
