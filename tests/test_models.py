"""Several models served at once: each job goes to a worker that serves the model it names, positions
and ETAs count the jobs of the same model, and a worker's lanes within a tier take turns. Over real
NATS, with a tiny-sdxl worker and a simulated one (another model) on one broker, or a registry that
lists two models whose workers take nothing."""

from __future__ import annotations

import asyncio

import nats
import pytest

from gateway.settings import GatewaySettings
from gpu_worker.puller import PriorityPuller
from gpu_worker.settings import WorkerSettings
from imagegen import runtime
from schemas import names
from schemas.codec import encode
from schemas.jetstream import Topology, ensure_model_lanes, ensure_topology
from schemas.job import JobEnvelope
from schemas.request import parse_request
from schemas.workers import SpeedModel, WorkerInfo
from tests.helpers.service import collect_events

JOB = {"prompt": "a harbour at dawn", "width": 64, "height": 64, "steps": 2}
TOPOLOGY = Topology(ack_wait_s=10, worker_ttl_s=10)


@pytest.fixture
async def two_models(broker, data_dir):
    """A gateway, a tiny-sdxl worker and a worker of the simulated model."""
    started = []
    for model in ("tiny-sdxl", "simulated"):
        settings = WorkerSettings(
            nats_url=broker.url, model=model, refiner=None, device="cpu", data_dir=str(data_dir), heartbeat_s=1.0,
            topology=TOPOLOGY, sim_step_s=0.01, worker_id=f"worker-of-{model}",
        )
        started.append(await runtime.start_worker(settings))
    gateway = await runtime.start_gateway(GatewaySettings(nats_url=broker.url, port=0, topology=TOPOLOGY))
    yield f"http://127.0.0.1:{gateway.port}", broker.url
    for worker, task in started:
        worker.stop()
        await asyncio.wait_for(task, 30)
        await worker.close()
    await gateway.stop()


async def finished(http, url: str, job_id: str) -> dict:
    async with http.get(f"{url}/v1/jobs/{job_id}", params={"wait": "60"}) as r:
        return await r.json()


async def test_each_job_runs_on_a_worker_of_the_model_it_names(two_models, http):
    url, _ = two_models
    async with http.get(f"{url}/api/ls") as r:
        assert set(await r.json()) == {"tiny-sdxl", "simulated"}
    job_ids = {}
    for i in range(12):
        model = ("tiny-sdxl", "simulated")[i % 2]
        async with http.post(f"{url}/v1/jobs", json={**JOB, "seed": i, "model": model}) as r:
            assert r.status == 202, await r.text()
            job_ids[(await r.json())["job_id"]] = model
    workers = {}
    for job_id, model in job_ids.items():
        job = await finished(http, url, job_id)
        assert job["state"] == "done", job
        assert job["attempt"] == 1
        workers.setdefault(model, set()).add(job["worker"])
    assert workers == {"tiny-sdxl": {"worker-of-tiny-sdxl"}, "simulated": {"worker-of-simulated"}}


async def test_a_job_published_over_nats_naming_a_model_reaches_a_worker_of_it(two_models):
    _, nats_url = two_models
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    for i in range(4):  # on the tier's own subject, whichever worker takes it
        envelope = JobEnvelope.for_request(parse_request({**JOB, "seed": 100 + i, "model": "simulated"}))
        await js.publish(names.Tier.NORMAL.subject, encode(envelope), headers={names.MSG_ID_HEADER: envelope.job_id})
        events = await collect_events(js, envelope.job_id)
        assert events[-1].type == "done", events[-1]
        assert {e.worker for e in events if e.type == "started"} == {"worker-of-simulated"}
    await nc.close()


@pytest.fixture
async def two_idle_models(broker):
    """A gateway whose registry lists a worker of model alpha (1 s a job) and one of beta (2 s a job)
    that take nothing: their jobs stay queued."""
    gateway = await runtime.start_gateway(GatewaySettings(nats_url=broker.url, port=0, topology=TOPOLOGY))
    nc = await nats.connect(broker.url)
    registry = await nc.jetstream().key_value(names.WORKERS_BUCKET)
    for model, cost in (("alpha", 1.0), ("beta", 2.0)):
        speed = SpeedModel(fixed_s=cost, step_s=0.0, step_s_per_mpx=0.0, decode_s_per_mpx=0.0)
        info = WorkerInfo(worker_id=f"{model}-1", model=model, default_steps=2, default_guidance=5.0, speed=speed)
        await registry.put(info.worker_id, encode(info))
    url = f"http://127.0.0.1:{gateway.port}"
    yield url
    await nc.close()
    await gateway.stop()


async def test_positions_and_etas_count_only_the_jobs_of_the_same_model(two_idle_models, http):
    url = two_idle_models
    async with asyncio.timeout(10):  # the gateway has read the registry
        while True:
            async with http.get(f"{url}/api/ls") as r:
                if set(await r.json()) == {"alpha", "beta"}:
                    break
            await asyncio.sleep(0.05)
    submitted = []
    for i, model in enumerate(["alpha", "beta", "alpha", "beta", "alpha"]):
        async with http.post(f"{url}/api/generate", json={**JOB, "seed": i, "model": model}) as r:
            assert r.status == 200, await r.text()
            answer = await r.json()
        submitted.append((model, answer["task_id"], answer["task_length"]))
    assert [length for *_, length in submitted] == [1, 1, 2, 2, 3]  # this model's jobs ahead, plus itself
    for model, job_id, length in submitted:
        async with http.get(f"{url}/v1/jobs/{job_id}") as r:
            job = await r.json()
        cost = {"alpha": 1.0, "beta": 2.0}[model]
        assert job["position"] == length - 1
        assert job["eta_s"] == pytest.approx(length * cost, abs=0.05)  # the jobs ahead and itself, on its model's worker
    first_alpha = submitted[0][1]
    async with http.post(f"{url}/v1/jobs/{first_alpha}/cancel") as r:
        assert r.status == 200
    places = {}
    for model, job_id, _ in submitted[1:]:
        async with http.get(f"{url}/v1/jobs/{job_id}") as r:
            places[job_id] = (await r.json())["position"]
    assert list(places.values()) == [0, 0, 1, 1]  # beta, alpha (one ahead gone), beta, alpha


async def test_within_a_tier_a_worker_takes_from_its_models_lane_and_the_tiers_subject_in_turn(broker):
    """A job on the tier's own subject is not held back by a stream of jobs on the model's lane."""
    nc = await nats.connect(broker.url)
    js = nc.jetstream()
    await ensure_topology(js, TOPOLOGY)
    await ensure_model_lanes(js, TOPOLOGY, "sdxl")
    for i in range(6):
        await js.publish(names.jobs_subject(names.Tier.NORMAL, "sdxl"), f"lane {i}".encode(), headers={names.MSG_ID_HEADER: f"lane-{i}"})
    await js.publish(names.Tier.NORMAL.subject, b"tier 0", headers={names.MSG_ID_HEADER: "tier-0"})
    puller = PriorityPuller(nc, model="sdxl")
    await puller.start()
    taken = []
    try:
        stopping = asyncio.Event()
        async with asyncio.timeout(30):
            for _ in range(7):
                msg = await puller.next(stopping)
                taken.append(msg.data.decode())
                await msg.ack()
    finally:
        await puller.stop()
        await nc.close()
    assert sorted(taken) == sorted([f"lane {i}" for i in range(6)] + ["tier 0"])
    assert taken.index("tier 0") <= 1  # the lane's other jobs came first only once
    assert [t for t in taken if t.startswith("lane")] == [f"lane {i}" for i in range(6)]  # in order
