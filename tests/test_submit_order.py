"""A submit sends the job's record and the job together, without waiting for the record's ack: each
job's record is still the gateway's, and a record that a worker wrote first (as on a cluster) is
answered as the job's, without a second run."""

from __future__ import annotations

import asyncio

import nats
from nats.js.errors import NotFoundError

from gateway.core.service import JobService
from gateway.core.caller import SERVICE
from schemas import JobState, JobStatus, decode, jobstore, names
from schemas.events import JobEvent
from tests.helpers.service import collect_events


async def stored_events(js, job_id: str) -> list[JobEvent]:
    """Every event stored for the job, also any after its final one."""
    events, seq = [], 0
    while True:
        try:
            msg = await js.get_msg(names.EVENTS_STREAM, seq=seq, next=True, subject=names.events_subject(job_id))
        except NotFoundError:
            return events
        events.append(decode(msg.data, JobEvent))
        seq = msg.seq + 1


async def test_the_worker_finds_the_record_the_gateway_wrote(service, http):
    """Each record is the gateway's, which carries the result-cache key (a record a worker wrote from the
    job would lack it, and the job's image would never be answered from the cache)."""
    job_ids = []
    for i in range(12):
        body = {"prompt": f"order check {i}", "seed": 900 + i, "width": 64, "height": 64, "steps": 1, "format": "PNG"}
        async with http.post(f"{service.url}/v1/jobs", json=body, headers={"Prefer": "wait=60"}) as r:
            assert r.status == 201, await r.text()
            job = await r.json()
        assert job["state"] == "done" and not job["cached"]
        job_ids.append(job["job_id"])
    nc = await nats.connect(service.nats_url)
    kv = await nc.jetstream().key_value(names.STATUS_BUCKET)
    for job_id in job_ids:
        status = decode((await kv.get(job_id)).value, JobStatus)
        assert status.state is JobState.DONE and status.cache_key, job_id
    await nc.close()


async def test_a_record_a_worker_wrote_first_is_answered_without_a_second_run(service, http, monkeypatch):
    """As on a cluster when the job's stream stores the job before the record's stream stores the record:
    the worker finds no record and writes it from the job; the gateway's write is then refused as a
    repeat and the job is answered as the worker recorded it, run once."""
    jobs: JobService = service.gateway.runner.app[SERVICE]
    create_status = jobstore.create_status

    async def record_late(kv, status: JobStatus):
        if kv is jobs.status_kv:  # the gateway's write waits until the worker has written the record
            for _ in range(300):
                if await jobstore.read_status(kv, status.job_id) is not None:
                    break
                await asyncio.sleep(0.02)
        return await create_status(kv, status)

    monkeypatch.setattr(jobstore, "create_status", record_late)
    body = {"prompt": "record race", "width": 64, "height": 64, "steps": 1, "format": "PNG", "cache": False}
    async with http.post(f"{service.url}/v1/jobs", json=body, headers={"Prefer": "wait=60"}) as r:
        assert r.status == 201, await r.text()
        job = await r.json()
    assert job["state"] == "done"
    monkeypatch.undo()

    nc = await nats.connect(service.nats_url)
    js = nc.jetstream()
    kinds = [e.type for e in await collect_events(js, job["job_id"])]
    assert kinds[0] == "queued" and kinds[-1] == "done" and kinds.count("started") == 1
    await asyncio.sleep(1.0)  # a second publish of the job would have been taken and started by now
    kinds = [e.type for e in await stored_events(js, job["job_id"])]
    assert kinds.count("started") == 1 and kinds.count("queued") == 1
    async with http.get(f"{service.url}/v1/jobs/{job['job_id']}/image") as r:
        assert r.status == 200
    await nc.close()


async def test_a_job_is_listed_once_its_record_is_stored(service, http, monkeypatch):
    """The gateway's queue view holds a job while it is being sent, before the store has its record:
    the list shows it only once the record is stored, so every job listed can be cancelled (a cancel
    reads the store: it answered 404 for a job listed a moment before)."""
    jobs: JobService = service.gateway.runner.app[SERVICE]
    prompt = "listed once stored"
    release = asyncio.Event()
    create_status = jobstore.create_status

    async def record_when_released(kv, status: JobStatus):
        if status.request.get("prompt") == prompt:  # the gateway's write, and the worker's from the job
            await asyncio.wait_for(release.wait(), 30)
        return await create_status(kv, status)

    monkeypatch.setattr(jobstore, "create_status", record_when_released)
    body = {"prompt": prompt, "width": 64, "height": 64, "steps": 1, "cache": False}
    submitting = asyncio.ensure_future(http.post(f"{service.url}/v1/jobs", json=body))
    try:
        async with asyncio.timeout(10):
            while not any(s.request.get("prompt") == prompt for s in jobs.view.jobs.values()):
                await asyncio.sleep(0.01)
        async with http.get(f"{service.url}/v1/jobs") as r:
            assert not [j for j in await r.json() if j["request"].get("prompt") == prompt]
        async with http.get(f"{service.url}/api/tasks") as r:
            assert not [t for t in await r.json() if t["prompt"] == prompt]
    finally:
        release.set()
        response = await submitting
    async with response as r:
        assert r.status == 202, await r.text()
        job_id = (await r.json())["job_id"]
    async with http.get(f"{service.url}/v1/jobs") as r:
        assert job_id in [j["job_id"] for j in await r.json()]
    async with http.post(f"{service.url}/v1/jobs/{job_id}/cancel") as r:
        assert r.status == 200, await r.text()
    async with http.get(f"{service.url}/v1/jobs/{job_id}?wait=60") as r:
        assert (await r.json())["state"] in ("cancelled", "done")


async def test_a_submit_answered_after_a_worker_took_its_job_counts_the_job_once(service, http, monkeypatch):
    """An idle worker can take a job before its submit is answered (the answer waits for the broker's
    acks). The answer then counts the job once, as running: one job in the queue, and its ETA what is
    left of it, not its cost again behind itself."""
    jobs: JobService = service.gateway.runner.app[SERVICE]
    create_status = jobstore.create_status

    async def answer_once_running(kv, status: JobStatus):
        revision = await create_status(kv, status)
        if kv is jobs.submit_kv:  # the answer waits until the gateway sees the worker take the job
            for _ in range(1000):
                held = jobs.view.jobs.get(status.job_id)
                if held is not None and held.state is not JobState.QUEUED:
                    break
                await asyncio.sleep(0.01)
        return revision

    monkeypatch.setattr(jobstore, "create_status", answer_once_running)
    body = {"prompt": "answered once running", "width": 256, "height": 256, "steps": 100, "cache": False}
    async with http.post(f"{service.url}/api/generate", json=body) as r:
        assert r.status == 200, await r.text()
        answer = await r.json()
    monkeypatch.undo()
    assert jobs.view.jobs[answer["task_id"]].state is JobState.RUNNING  # still running as it was answered

    nc = await nats.connect(service.nats_url)
    events = await collect_events(nc.jetstream(), answer["task_id"])
    await nc.close()
    queued = events[0]
    assert queued.type == "queued" and queued.eta_s > 0  # its cost on an idle pool, reckoned before it was sent
    assert answer["task_length"] == 1
    assert 0 < answer["expected_time_seconds"] <= queued.eta_s * 1.2
