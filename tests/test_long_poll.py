"""Waiting for a job's end over plain HTTP: `Prefer: wait=N` (or `?wait=N`) on a submit, `?wait=N` on
a status read. Over real NATS, with the tiny-sdxl worker, and with a gateway whose jobs no worker takes."""

from __future__ import annotations

import asyncio
import io

import pytest
from PIL import Image

from gateway.settings import GatewaySettings
from imagegen import runtime
from schemas.request import Limits
from tests.helpers.service import start_service, stop_service

JOB = {"prompt": "a long poll", "width": 64, "height": 64, "steps": 2}


async def test_a_submit_that_prefers_to_wait_answers_with_the_finished_job(service, http):
    async with http.post(f"{service.url}/v1/jobs", json=JOB, headers={"Prefer": "wait=60"}) as r:
        assert r.status == 201, await r.text()
        job = await r.json()
    assert job["state"] == "done" and job["image_url"] == f"/v1/jobs/{job['job_id']}/image"
    async with http.get(f"{service.url}{job['image_url']}") as r:
        assert r.status == 200 and r.content_type == "image/jpeg" and len(await r.read()) > 100


async def test_a_group_with_a_wait_answers_once_every_image_is_done(service, http):
    async with http.post(f"{service.url}/v1/jobs?wait=60", json={**JOB, "n": 2, "seed": 5}) as r:
        assert r.status == 201, await r.text()
        job = await r.json()
    async with http.get(f"{service.url}{job['group_url']}") as r:
        group = await r.json()
    assert group["finished"] and group["states"] == {"done": 2}


async def test_a_status_read_with_a_wait_returns_when_the_job_ends(service, http):
    async with http.post(f"{service.url}/v1/jobs", json={**JOB, "steps": 4}) as r:
        assert r.status == 202
        job_id = (await r.json())["job_id"]
    async with http.get(f"{service.url}/v1/jobs/{job_id}", params={"wait": "60"}) as r:
        assert r.status == 200
        assert (await r.json())["state"] == "done"


async def test_a_submit_that_accepts_an_image_is_answered_with_the_image_itself(service, http):
    headers = {"Prefer": "wait=60", "Accept": "image/png"}
    async with http.post(f"{service.url}/v1/jobs", json={**JOB, "format": "PNG", "width": 72}, headers=headers) as r:
        assert r.status == 201, await r.text()
        assert r.content_type == "image/png"
        image = await r.read()
        location, job_id, seed = r.headers["Location"], r.headers["X-Job-Id"], r.headers["X-Seed"]
    assert Image.open(io.BytesIO(image)).size == (72, 64)
    async with http.get(f"{service.url}{location}") as r:
        job = await r.json()
    assert job["job_id"] == job_id and job["state"] == "done" and str(job["seed"]) == seed
    async with http.get(f"{service.url}{job['image_url']}") as r:
        assert await r.read() == image


@pytest.mark.parametrize("accept", ["image/*", "image/jpeg", "image/*, application/json;q=0.9", "application/json;q=0.1, */*;q=0.5"])
async def test_an_accept_that_ranks_the_jobs_image_first_gets_the_image(service, http, accept):
    async with http.post(f"{service.url}/v1/jobs?wait=60", json=JOB, headers={"Accept": accept}) as r:
        assert r.status == 201, await r.text()
        assert r.content_type == "image/jpeg"
        assert Image.open(io.BytesIO(await r.read())).format == "JPEG"


@pytest.mark.parametrize(
    "accept", ["application/json", "*/*", "image/*;q=0.5, application/json", "image/png, application/json", "image/*;q=nan, application/json"]
)
async def test_an_accept_that_ranks_json_first_gets_the_job(service, http, accept):
    async with http.post(f"{service.url}/v1/jobs?wait=60", json=JOB, headers={"Accept": accept}) as r:
        assert r.status == 201, await r.text()
        assert r.content_type == "application/json" and (await r.json())["state"] == "done"


async def test_an_image_that_could_not_be_made_is_answered_with_the_job_and_its_reason(broker, data_dir, http):
    """A worker with stricter limits than its gateway's fails a job that the gateway let through, on the
    field its limit is about."""
    strict = await start_service(broker.url, data_dir, refiner=None, limits=Limits(max_steps=3))
    try:
        headers = {"Prefer": "wait=60", "Accept": "image/jpeg"}
        async with http.post(f"{strict.url}/v1/jobs", json={**JOB, "steps": 5}, headers=headers) as r:
            assert r.status == 400, await r.text()  # the job failed on what was asked
            job = await r.json()
            assert r.headers["Location"] == f"/v1/jobs/{job['job_id']}"
        assert job["state"] == "failed" and job["error"].startswith("steps:") and "between 1 and 3, got 5" in job["error"]
    finally:
        await stop_service(strict)


async def test_a_job_cancelled_while_its_image_was_awaited_is_answered_with_the_job(no_worker, http):
    async def submit_waiting():
        async with http.post(f"{no_worker}/v1/jobs?wait=60", json=JOB, headers={"Accept": "image/*"}) as r:
            return r.status, await r.json()

    waiting = asyncio.create_task(submit_waiting())
    async with asyncio.timeout(30):
        while not (jobs := await (await http.get(f"{no_worker}/v1/jobs")).json()):
            await asyncio.sleep(0.05)
        async with http.post(f"{no_worker}/v1/jobs/{jobs[0]['job_id']}/cancel") as r:
            assert r.status == 200
        status, job = await waiting
    assert status == 502 and job["state"] == "cancelled" and job["job_id"] == jobs[0]["job_id"]


@pytest.mark.parametrize(
    ("body", "query", "accept", "named"),
    [
        (JOB, "?wait=5", "image/png", "image/jpeg"),  # the job makes JPEG
        ({**JOB, "format": "WEBP"}, "?wait=5", "image/jpeg, image/png", "format"),
        ({**JOB, "n": 2}, "?wait=5", "image/*", "makes 2"),
        (JOB, "", "image/jpeg", "Prefer: wait"),
        (JOB, "?wait=5", "text/html", "application/json"),
    ],
)
async def test_an_answer_the_accept_header_cannot_take_is_refused_before_queueing(no_worker, http, body, query, accept, named):
    async with http.post(f"{no_worker}/v1/jobs{query}", json=body, headers={"Accept": accept}) as r:
        assert r.status == 406
        error = await r.json()
    assert error["field"] == "Accept" and named in error["error"]
    async with http.get(f"{no_worker}/v1/jobs") as r:
        assert await r.json() == []


async def test_a_wait_for_an_image_that_runs_out_answers_with_the_job(no_worker, http):
    async with http.post(f"{no_worker}/v1/jobs?wait=0.3", json=JOB, headers={"Accept": "image/*"}) as r:
        assert r.status == 202 and r.content_type == "application/json"
        assert (await r.json())["state"] == "queued"


@pytest.fixture
async def no_worker(broker):
    """A gateway on a broker of its own with no worker: its jobs stay queued."""
    gateway = await runtime.start_gateway(GatewaySettings(nats_url=broker.url, port=0))
    yield f"http://127.0.0.1:{gateway.port}"
    await gateway.stop()


async def test_a_wait_that_runs_out_answers_with_the_job_as_it_is(no_worker, http):
    async with http.post(f"{no_worker}/v1/jobs", json=JOB, headers={"Prefer": "wait=0.3"}) as r:
        assert r.status == 202
        job = await r.json()
    assert job["state"] == "queued" and job["position"] == 0
    async with http.get(f"{no_worker}/v1/jobs/{job['job_id']}?wait=0.2") as r:
        assert r.status == 200 and (await r.json())["state"] == "queued"


async def test_a_cancel_ends_a_wait(no_worker, http):
    async with http.post(f"{no_worker}/v1/jobs", json=JOB) as r:
        job_id = (await r.json())["job_id"]

    async def read_waiting():
        async with http.get(f"{no_worker}/v1/jobs/{job_id}?wait=60") as r:
            return await r.json()

    waiting = asyncio.create_task(read_waiting())
    await asyncio.sleep(0.2)
    async with http.post(f"{no_worker}/v1/jobs/{job_id}/cancel") as r:
        assert r.status == 200
    async with asyncio.timeout(30):
        assert (await waiting)["state"] == "cancelled"


@pytest.mark.parametrize(
    ("query", "headers", "named"),
    [
        ("?wait=soon", {}, "wait"),
        ("?wait=-1", {}, "wait"),
        ("?wait=61", {}, "wait"),
        ("?wait=nan", {}, "wait"),
        ("", {"Prefer": "wait=forever"}, "Prefer"),
        ("", {"Prefer": "respond-async, wait=600"}, "Prefer"),
    ],
)
async def test_a_bad_wait_is_refused_and_queues_nothing(no_worker, http, query, headers, named):
    async with http.get(f"{no_worker}/v1/jobs") as r:
        before = len(await r.json())
    async with http.post(f"{no_worker}/v1/jobs{query}", json=JOB, headers=headers) as r:
        assert r.status == 400
        body = await r.json()
    assert named in str(body) and "0 to 60" in str(body)
    async with http.get(f"{no_worker}/v1/jobs") as r:
        assert len(await r.json()) == before


async def test_a_bad_wait_on_a_status_read_is_refused(no_worker, http):
    async with http.post(f"{no_worker}/v1/jobs", json=JOB) as r:
        job_id = (await r.json())["job_id"]
    async with http.get(f"{no_worker}/v1/jobs/{job_id}?wait=x") as r:
        assert r.status == 400 and "wait" in await r.text()
    async with http.get(f"{no_worker}/v1/jobs/unknown-job?wait=1") as r:
        assert r.status == 404


async def test_a_stopping_gateway_answers_its_waits_at_once(broker, http):
    gateway = await runtime.start_gateway(GatewaySettings(nats_url=broker.url, port=0))
    url = f"http://127.0.0.1:{gateway.port}"
    async with http.post(f"{url}/v1/jobs", json=JOB) as r:
        job_id = (await r.json())["job_id"]

    async def read_waiting():
        async with http.get(f"{url}/v1/jobs/{job_id}?wait=60") as r:
            return r.status, await r.json()

    waiting = asyncio.create_task(read_waiting())
    await asyncio.sleep(0.2)
    async with asyncio.timeout(20):  # well under the 60 s wait and the 30 s drain
        await gateway.stop()
        status, job = await waiting
    assert status == 200 and job["state"] == "queued"
