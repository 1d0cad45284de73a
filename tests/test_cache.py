"""The result cache over real NATS: a repeat answered by a gateway with no worker at all, which
requests are cached (a seed, or `cache: true`) and which are not, the owner rules, a lost entry, the
TTL, and the counters."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import time

import aiohttp
import nats
import pytest
from nats.js.api import ObjectInfo
from nats.js.errors import NotFoundError, ObjectNotFoundError
from PIL import Image

from gateway.http.auth import new_key_entry
from gateway.core.service import JobService
from gateway.core.caller import SERVICE
from gateway.settings import GatewaySettings
from gpu_worker.settings import WorkerSettings
from imagegen import runtime
from imagegen.cli import build_parser, gateway_settings
from schemas import names
from schemas.jetstream import Topology
from schemas.status import JobState
from tests.helpers.real_processes import job_state, submit, wait_state
from tests.helpers.service import wait_status


def body(prompt: str, **fields) -> dict:
    return {"prompt": prompt, "width": 64, "height": 64, "steps": 2, "format": "PNG", **fields}


async def image(http: aiohttp.ClientSession, url: str, job_id: str, headers: dict | None = None) -> bytes:
    async with http.get(f"{url}/v1/jobs/{job_id}/image", headers=headers) as r:
        assert r.status == 200, await r.text()
        return await r.read()


async def post(http: aiohttp.ClientSession, url: str, request: dict, headers: dict | None = None) -> dict:
    async with http.post(f"{url}/v1/jobs", json=request, headers=headers) as r:
        assert r.status == 202, await r.text()
        return await r.json()


async def run(http: aiohttp.ClientSession, url: str, request: dict) -> dict:
    """Submits and waits for the job to end; its final record."""
    return await wait_state(http, url, await submit(http, url, request), {"done", "failed"}, timeout=120)


def counters(gateway: runtime.RunningGateway) -> tuple[int, int]:
    """The gateway's result-cache counters: (hits, misses)."""
    cache = gateway.runner.app[SERVICE].cache
    return cache.hits, cache.misses


async def metric(http: aiohttp.ClientSession, url: str, name: str) -> float:
    async with http.get(f"{url}/metrics") as r:
        text = await r.text()
    found = re.search(rf"^{name}(?:_total)? (\S+)$", text, re.MULTILINE)
    assert found, text
    return float(found[1])


async def state_as(http: aiohttp.ClientSession, url: str, job_id: str, headers: dict) -> dict:
    async with http.get(f"{url}/v1/jobs/{job_id}", headers=headers) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def cache_entries(nats_url: str) -> list:
    nc = await nats.connect(nats_url)
    try:
        store = await nc.jetstream().object_store(names.CACHE_BUCKET)
        try:
            return [info for info in await store.list() if not info.deleted]
        except NotFoundError:
            return []
    finally:
        await nc.close()


async def test_a_repeat_is_answered_by_a_gateway_alone_with_the_same_image(broker, data_dir, http):
    first = body("cache: a lighthouse at dawn", seed=11, model="tiny-sdxl")
    topology = Topology(ack_wait_s=10, worker_ttl_s=10)
    worker, task = await runtime.start_worker(
        WorkerSettings(
            nats_url=broker.url, model="tiny-sdxl", refiner=None, device="cpu", data_dir=str(data_dir), topology=topology
        ),
        warm_up=False,
    )
    gateway = await runtime.start_gateway(GatewaySettings(nats_url=broker.url, port=0, topology=topology))
    url = f"http://127.0.0.1:{gateway.port}"
    try:
        async with http.post(f"{url}/api/generate", json=first) as r:
            answer = await r.json()
        assert "cached" not in answer  # mflux-server's answer, unchanged
        assert (await wait_status(http, url, answer["task_id"]))["status"] == "done"
        async with http.get(f"{url}/api/image", params={"task_id": answer["task_id"]}) as r:  # delete=true
            assert r.status == 200
            original = await r.read()
    finally:
        await gateway.stop()
        worker.stop()
        await asyncio.wait_for(task, 30)
        await worker.close()

    gateway = await runtime.start_gateway(GatewaySettings(nats_url=broker.url, port=0))
    url = f"http://127.0.0.1:{gateway.port}"
    try:
        async with http.post(f"{url}/api/generate", json=first) as r:
            answer = await r.json()
        assert answer["cached"] is True and answer["task_length"] == 0
        async with http.get(f"{url}/api/status", params={"task_id": answer["task_id"]}) as r:
            assert await r.json() == {"status": "done", "cached": True}
        job = await job_state(http, url, answer["task_id"])
        assert job["state"] == "done" and job["cached"] is True and job["worker"] is None and job["seed"] == 11
        async with http.get(f"{url}/api/image", params={"task_id": answer["task_id"]}) as r:
            assert await r.read() == original

        for other in ({**first, "seed": 12}, {**first, "prompt": "cache: a lighthouse at dusk"}):
            job = await post(http, url, other)
            assert job["state"] == "queued" and job["cached"] is False  # no worker: it waits
        assert await metric(http, url, "imagegen_cache_hits") == 1
        assert await metric(http, url, "imagegen_cache_misses") == 2
    finally:
        await gateway.stop()


async def test_only_requests_with_a_seed_or_asking_are_cached(service, http):
    url = service.url
    hits, misses = counters(service.gateway)
    seeded = body("cache: a red kite", seed=21)
    first = await run(http, url, seeded)
    assert first["state"] == "done" and first["cached"] is False and first["worker"]
    again = await post(http, url, seeded)
    assert again["state"] == "done" and again["cached"] is True and again["job_id"] != first["job_id"]
    assert await image(http, url, again["job_id"]) == await image(http, url, first["job_id"])

    opted_out = await run(http, url, {**seeded, "cache": False})
    other_seed = await run(http, url, {**seeded, "seed": 22})
    unseeded = [await run(http, url, body("cache: a blue kite")) for _ in range(2)]
    for job in (opted_out, other_seed, *unseeded):
        assert job["state"] == "done" and job["cached"] is False and job["worker"], job

    asked = await run(http, url, body("cache: a green kite", cache=True))
    repeat = await post(http, url, body("cache: a green kite", cache=True))
    assert asked["cached"] is False and repeat["cached"] is True and repeat["seed"] == asked["seed"]
    assert await image(http, url, repeat["job_id"]) == await image(http, url, asked["job_id"])
    assert counters(service.gateway) == (hits + 2, misses + 3)  # opted out and unseeded count neither way


async def wait_done_as(http: aiohttp.ClientSession, url: str, job_id: str, headers: dict) -> dict:
    async with asyncio.timeout(120):
        while (job := await state_as(http, url, job_id, headers))["state"] not in ("done", "failed"):
            await asyncio.sleep(0.05)
    return job


@pytest.mark.parametrize("scope", [None, "global"], ids=["default-scope", "global-scope"])
async def test_one_key_gets_another_keys_cached_answer_only_with_the_global_scope(service, http, scope):
    """By default (`--cache-scope key`) a key never learns from the cache what another key asked for:
    its identical request runs, and its own repeat is answered from its own entry. With `global` the
    keys share the cache, and a cached answer is still the caller's own job."""
    a_secret, a = new_key_entry("studio", tiers=["normal"], rate_per_minute=100, max_concurrent=20)
    b_secret, b = new_key_entry("agency", tiers=["normal"], rate_per_minute=100, max_concurrent=20)
    chosen = {"cache_scope": scope} if scope else {}
    gateway = await runtime.start_gateway(
        GatewaySettings(nats_url=service.nats_url, port=0, api_keys=json.dumps([a, b]), **chosen)
    )
    url = f"http://127.0.0.1:{gateway.port}"
    as_a, as_b = {"Authorization": f"Bearer {a_secret}"}, {"Authorization": f"Bearer {b_secret}"}
    try:
        request = body(f"cache: two keys, one harbour, {scope or 'default'} scope", seed=31)
        made = await post(http, url, request, as_a)
        assert (await wait_done_as(http, url, made["job_id"], as_a))["state"] == "done"
        assert (await post(http, url, request, as_a))["cached"] is True  # the key's own repeat
        answered = await post(http, url, request, as_b)
        if scope != "global":
            assert answered["cached"] is False
            ran = await wait_done_as(http, url, answered["job_id"], as_b)
            assert ran["state"] == "done" and ran["worker"] and ran["cached"] is False
            assert (await post(http, url, request, as_b))["cached"] is True  # its own entry now
            return
        assert answered["cached"] is True and answered["job_id"] != made["job_id"]
        assert await image(http, url, answered["job_id"], as_b) == await image(http, url, made["job_id"], as_a)
        for job_id, headers in ((answered["job_id"], as_a), (made["job_id"], as_b)):
            async with http.get(f"{url}/v1/jobs/{job_id}", headers=headers) as r:
                assert r.status == 404  # each key sees only its own job
        async with http.get(f"{url}/api/image", params={"task_id": answered["job_id"]}, headers=as_b) as r:
            assert r.status == 200  # and deletes it
        assert await image(http, url, made["job_id"], as_a)  # the other key's job keeps its image
    finally:
        await gateway.stop()


def test_the_cache_scope_comes_from_the_flag_or_the_environment(monkeypatch):
    assert gateway_settings(build_parser().parse_args(["gateway"]), "nats://127.0.0.1:4222").cache_scope == "key"
    monkeypatch.setenv("IMAGEGEN_CACHE_SCOPE", "global")
    assert gateway_settings(build_parser().parse_args(["gateway"]), "nats://127.0.0.1:4222").cache_scope == "global"
    flagged = build_parser().parse_args(["gateway", "--cache-scope", "key"])
    assert gateway_settings(flagged, "nats://127.0.0.1:4222").cache_scope == "key"
    with pytest.raises(ValueError, match="--cache-scope must be one of key, global"):
        JobService(GatewaySettings(cache_scope="everyone"))


async def test_a_lost_cache_entry_is_a_miss_and_the_job_runs(service, http):
    url = service.url
    request = body("cache: a lost lantern", seed=41)
    first = await run(http, url, request)
    assert (await post(http, url, request))["cached"] is True
    entries = [e for e in await cache_entries(service.nats_url) if json.loads(e.description)["job_id"] == first["job_id"]]
    assert len(entries) == 1
    nc = await nats.connect(service.nats_url)
    await (await nc.jetstream().object_store(names.CACHE_BUCKET)).delete(entries[0].name)
    await nc.close()
    again = await run(http, url, request)
    assert again["cached"] is False and again["worker"] and again["state"] == "done"
    assert await image(http, url, again["job_id"]) == await image(http, url, first["job_id"])


async def entry_of(nats_url: str, job_id: str) -> ObjectInfo:
    """The cache entry job `job_id` made, once it is stored."""
    async with asyncio.timeout(30):
        while True:
            found = [e for e in await cache_entries(nats_url) if json.loads(e.description)["job_id"] == job_id]
            if found:
                return found[0]
            await asyncio.sleep(0.05)


async def test_a_delete_while_the_view_still_says_running_keeps_the_entry(service, http):
    """mflux's `delete=true` comes the moment a job is done, when the gateway's view may not know it
    yet: the delete reads the record from the store, and the image still goes into the cache."""
    url, jobs = service.url, service.gateway.runner.app[SERVICE]
    request = body("cache: fetched and deleted at once", seed=81)
    first = await run(http, url, request)
    nc = await nats.connect(service.nats_url)  # the entry not stored yet, as it may not be at that moment
    await (await nc.jetstream().object_store(names.CACHE_BUCKET)).delete((await entry_of(service.nats_url, first["job_id"])).name)
    await nc.close()
    done = jobs.view.jobs[first["job_id"]]
    jobs.view.jobs[first["job_id"]] = done.model_copy(update={"state": JobState.RUNNING, "image": None, "finished_at": None})

    async with http.get(f"{url}/api/image", params={"task_id": first["job_id"]}) as r:  # delete=true
        assert r.status == 200
        original = await r.read()
    again = await post(http, url, request)
    assert again["cached"] is True
    assert await image(http, url, again["job_id"]) == original


async def test_a_gateway_that_stops_stores_the_images_it_owes_first(service, http):
    """A gateway stopped with done jobs whose images it has not stored yet (its recorder held back
    here, as when it is busy with earlier ones) stores them before it goes."""
    gateway = await runtime.start_gateway(GatewaySettings(nats_url=service.nats_url, port=0))
    url = f"http://127.0.0.1:{gateway.port}"
    stopped = False
    try:
        cache = gateway.runner.app[SERVICE].cache
        cache._recorder.cancel()
        job = await run(http, url, body("cache: owed at the stop", seed=91))
        assert job["state"] == "done"
        await gateway.stop()
        stopped = True
        entries = [e for e in await cache_entries(service.nats_url) if json.loads(e.description)["job_id"] == job["job_id"]]
        assert len(entries) == 1
    finally:
        if not stopped:
            await gateway.stop()
    again = await post(http, service.url, body("cache: owed at the stop", seed=91))
    assert again["cached"] is True


async def test_an_entry_lives_by_the_buckets_ttl_not_by_its_gateways_own(broker, data_dir, http):
    """The gateway started last sets the bucket's TTL: a gateway with a shorter --cache-ttl of its own
    still answers from an entry older than that, which the bucket keeps."""
    topology = Topology(ack_wait_s=10, worker_ttl_s=10)
    worker, task = await runtime.start_worker(
        WorkerSettings(
            nats_url=broker.url, model="simulated", sim_step_s=0.01, data_dir=str(data_dir), heartbeat_s=1.0, topology=topology
        ),
        warm_up=False,
    )
    short = await runtime.start_gateway(GatewaySettings(nats_url=broker.url, port=0, topology=topology, cache_ttl_s=2))
    later = await runtime.start_gateway(GatewaySettings(nats_url=broker.url, port=0, topology=topology))  # 24 h
    url = f"http://127.0.0.1:{short.port}"
    try:
        request = body("cache: older than two seconds", seed=53)
        first = await run(http, url, request)
        stored_at = json.loads((await entry_of(broker.url, first["job_id"])).description)["stored_at"]
        async with asyncio.timeout(30):
            while time.time() < stored_at + 2.5:  # past this gateway's own TTL
                await asyncio.sleep(0.1)
        again = await post(http, url, request)
        assert again["cached"] is True and again["state"] == "done"
    finally:
        await short.stop()
        await later.stop()
        worker.stop()
        await asyncio.wait_for(task, 30)
        await worker.close()


async def test_entries_expire_with_the_cache_ttl_and_a_zero_ttl_turns_the_cache_off(broker, data_dir, http):
    topology = Topology(ack_wait_s=10, worker_ttl_s=10)
    worker, task = await runtime.start_worker(
        WorkerSettings(
            nats_url=broker.url, model="simulated", sim_step_s=0.01, data_dir=str(data_dir), heartbeat_s=1.0, topology=topology
        ),
        warm_up=False,
    )
    await (await runtime.start_gateway(GatewaySettings(nats_url=broker.url, port=0, topology=topology))).stop()  # makes it with 24 h
    short = await runtime.start_gateway(GatewaySettings(nats_url=broker.url, port=0, topology=topology, cache_ttl_s=2))
    url = f"http://127.0.0.1:{short.port}"
    try:
        request = body("cache: a snowman in the sun", seed=51)
        await run(http, url, request)
        assert (await post(http, url, request))["cached"] is True
        (entry,) = await cache_entries(broker.url)
        nc = await nats.connect(broker.url)
        store = await nc.jetstream().object_store(names.CACHE_BUCKET)
        async with asyncio.timeout(30):
            while True:  # the server drops the entry once the TTL has passed
                try:
                    await store.get_info(entry.name)
                except (ObjectNotFoundError, NotFoundError):
                    break
                await asyncio.sleep(0.2)
        await nc.close()
        later = await run(http, url, request)
        assert later["cached"] is False and later["worker"]
    finally:
        await short.stop()

    off = await runtime.start_gateway(GatewaySettings(nats_url=broker.url, port=0, topology=topology, cache_ttl_s=0))
    url = f"http://127.0.0.1:{off.port}"
    try:
        request = body("cache: off", seed=52)
        jobs = [await run(http, url, request) for _ in range(2)]
        assert [job["cached"] for job in jobs] == [False, False] and all(job["worker"] for job in jobs)
        assert counters(off) == (0, 0)
    finally:
        await off.stop()
        worker.stop()
        await asyncio.wait_for(task, 30)
        await worker.close()


async def test_each_image_of_a_request_for_several_is_cached_by_its_own_seed(service, http):
    url = service.url
    request = body("cache: three boats", seed=61, n=2)
    first = await post(http, url, request)
    first_group = await group_when_finished(http, url, first["job_id"])
    assert [job["cached"] for job in first_group["jobs"]] == [False, False]
    second = await post(http, url, request)
    group = await group_when_finished(http, url, second["job_id"])
    assert [job["cached"] for job in group["jobs"]] == [True, True] and group["size"] == 2
    assert [job["seed"] for job in group["jobs"]] == [61, 62]
    for old, new in zip(first_group["jobs"], group["jobs"]):
        assert await image(http, url, new["job_id"]) == await image(http, url, old["job_id"])


async def group_when_finished(http: aiohttp.ClientSession, url: str, job_id: str) -> dict:
    """The group view of the group job `job_id` (`<group_id>-0`) belongs to, once all its jobs ended."""
    group_id = job_id.rsplit("-", 1)[0]
    async with asyncio.timeout(120):
        while True:
            async with http.get(f"{url}/v1/groups/{group_id}") as r:
                assert r.status == 200, await r.text()
                group = await r.json()
            if group["finished"]:
                return group
            await asyncio.sleep(0.05)


def png_base64(colour: tuple[int, int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


async def test_an_image_input_is_part_of_the_key_by_its_content(service, http):
    url = service.url
    red, blue = png_base64((200, 30, 30)), png_base64((30, 30, 200))
    request = body("cache: repaint this", seed=71, init_image=red, strength=0.5)
    first = await run(http, url, request)
    assert first["state"] == "done" and first["cached"] is False
    assert (await post(http, url, {**request, "init_image": f"data:image/png;base64,{red}"}))["cached"] is True
    other = await run(http, url, {**request, "init_image": blue})
    assert other["state"] == "done" and other["cached"] is False and other["worker"]
