"""Many teams on one pool, over real NATS: API keys, tiers, shared rate limits, idempotent submit,
deadlines, cancel before and during a run, audit and the prompt blocklist."""

from __future__ import annotations

import asyncio
import json
import secrets
import time

import nats
import pytest
from nats.js.api import DeliverPolicy

from gateway.http.auth import new_key_entry
from gateway.settings import GatewaySettings
from imagegen import runtime
from schemas import names
from schemas.codec import decode
from schemas.events import JobEvent
from tests.helpers.real_processes import wait_state
from tests.helpers.service import start_service, stop_service, wait_status

SMALL = {"prompt": "a cup", "width": 64, "height": 64, "steps": 2}


def make_keys():
    a_secret, a = new_key_entry("design", tiers=["normal", "low"], rate_per_minute=3, max_concurrent=50)
    b_secret, b = new_key_entry("marketing", tiers=["high", "normal"], rate_per_minute=100, max_concurrent=50)
    return a_secret, b_secret, json.dumps([a, b])


@pytest.fixture(scope="module")
async def keyed(service):
    a, b, keys = make_keys()
    gateways = [
        await runtime.start_gateway(
            GatewaySettings(nats_url=service.nats_url, port=0, api_keys=keys, blocklist=("forbidden thing",))
        )
        for _ in range(2)
    ]
    yield a, b, [f"http://127.0.0.1:{g.port}" for g in gateways]
    for g in gateways:
        await g.stop()


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


async def test_keys_are_required_and_see_only_their_own_jobs(keyed, http):
    a, b, (url, _) = keyed
    async with http.post(f"{url}/api/generate", json=SMALL) as r:
        assert r.status == 401 and "API key" in (await r.json())["error"]
    async with http.post(f"{url}/api/generate", json=SMALL, headers=bearer("wrong")) as r:
        assert r.status == 401
    async with http.get(f"{url}/healthz") as r:
        assert r.status == 200
    async with http.post(f"{url}/api/generate", json=SMALL, headers={"X-API-Key": b}) as r:
        assert r.status == 200
        task_id = (await r.json())["task_id"]
    async with http.get(f"{url}/api/status", params={"task_id": task_id}, headers=bearer(a)) as r:
        assert r.status == 404  # another key's job does not exist for this key
    async with http.get(f"{url}/v1/jobs/{task_id}/image", headers=bearer(a)) as r:
        assert r.status == 404
    async with http.get(f"{url}/api/tasks", headers=bearer(a)) as r:
        assert task_id not in [t["task_id"] for t in await r.json()]
    async with http.get(f"{url}/api/status", params={"task_id": task_id}, headers=bearer(b)) as r:
        assert r.status == 200


async def test_priority_only_where_the_key_allows(keyed, http):
    a, b, (url, _) = keyed
    async with http.post(f"{url}/api/generate", json={**SMALL, "priority": True}, headers=bearer(a)) as r:
        assert r.status == 403
        body = await r.json()
    assert body["field"] == "priority" and "high" in body["error"]
    async with http.post(f"{url}/v1/jobs", json={**SMALL, "priority": True}, headers=bearer(b)) as r:
        assert r.status == 202 and (await r.json())["tier"] == "high"


async def test_rate_limit_is_shared_by_two_gateways(keyed, http):
    a, _, (url_1, url_2) = keyed
    if time.time() % 60 > 50:  # keep the four requests inside one minute window
        await asyncio.sleep(61 - time.time() % 60)
    statuses = []
    for url in (url_1, url_2, url_1, url_2):  # the design key may send 3 a minute; one was spent above or not
        async with http.post(f"{url}/api/generate", json=SMALL, headers=bearer(a)) as r:
            statuses.append((r.status, r.headers.get("Retry-After")))
    assert statuses[-1][0] == 429 and int(statuses[-1][1]) >= 1
    assert [s for s, _ in statuses].count(200) <= 3


async def test_idempotency_key_makes_one_job(service, http):
    headers = {"Idempotency-Key": "order-42"}
    ids = []
    for _ in range(2):
        async with http.post(f"{service.url}/api/generate", json=SMALL, headers=headers) as r:
            ids.append((await r.json())["task_id"])
    assert ids[0] == ids[1]


async def test_an_idempotency_key_sent_again_with_another_body_is_a_422_and_queues_nothing(service, http):
    """The IETF Idempotency-Key draft: the key names one request; a retry sends the same body (the same
    fields, in any order, defaults written out or not), a different one is refused."""
    key = {"Idempotency-Key": f"order-{secrets.token_hex(6)}"}
    async with http.post(f"{service.url}/v1/jobs", json={**SMALL, "n": 2}, headers=key) as r:
        assert r.status == 202, await r.text()
        first = await r.json()
    same = {"n": 2, "steps": 2, "height": 64, "width": 64, "prompt": "a cup", "format": "JPEG"}
    async with http.post(f"{service.url}/v1/jobs", json=same, headers=key) as r:
        assert r.status == 202 and (await r.json())["group_id"] == first["group_id"]
    for other in ({**SMALL, "n": 2, "prompt": "a saucer"}, {**SMALL, "n": 2, "steps": 3}, {**SMALL, "n": 1}):
        async with http.post(f"{service.url}/v1/jobs", json=other, headers=key) as r:
            assert r.status == 422, await r.text()
            answer = await r.json()
        assert answer["field"] == "Idempotency-Key" and "another request" in answer["error"]
    async with http.post(f"{service.url}/api/generate", json={**SMALL, "prompt": "a mug"}, headers=key) as r:
        assert r.status == 422  # mflux-server's API: the same key, the same rule
    async with http.post(f"{service.url}/v1/images/generations", json={"prompt": "a jug", "size": "64x64"}, headers=key) as r:
        assert r.status == 422 and (await r.json())["error"]["code"] == "idempotency_key_reused"
    async with http.get(f"{service.url}/v1/jobs") as r:
        mine = [j for j in await r.json() if j.get("group_id") == first["group_id"] or j["request"].get("prompt") in ("a saucer", "a mug", "a jug")]
    assert sorted(j["job_id"] for j in mine) == sorted(first["job_ids"])


async def test_an_idempotency_key_answered_from_the_result_cache_is_held_to_its_request(service, http):
    seeded = {**SMALL, "seed": secrets.randbelow(2**31)}
    async with http.post(f"{service.url}/v1/jobs?wait=60", json=seeded) as r:  # made once: in the cache from now on
        assert r.status == 201, await r.text()
        made = await r.json()
    await wait_state(http, service.url, made["job_id"], {"done"})
    key = {"Idempotency-Key": f"cached-{secrets.token_hex(6)}"}
    async with http.post(f"{service.url}/v1/jobs", json=seeded, headers=key) as r:
        answer = await r.json()
    assert answer["cached"] is True and answer["state"] == "done", answer
    async with http.post(f"{service.url}/v1/jobs", json=seeded, headers=key) as r:
        assert (await r.json())["job_id"] == answer["job_id"]
    async with http.post(f"{service.url}/v1/jobs", json={**seeded, "seed": seeded["seed"] + 1}, headers=key) as r:
        assert r.status == 422, await r.text()


async def test_blocklisted_prompt_is_refused(keyed, http):
    _, b, (url, _) = keyed
    async with http.post(f"{url}/api/generate", json={**SMALL, "prompt": "a Forbidden Thing"}, headers=bearer(b)) as r:
        assert r.status == 400
        body = await r.json()
    assert body["field"] == "prompt" and "blocked" in body["error"]


async def test_queued_job_expires_and_is_never_generated_cancelled_one_never_starts(broker, data_dir, http):
    gateway = await runtime.start_gateway(GatewaySettings(nats_url=broker.url, port=0))
    url = f"http://127.0.0.1:{gateway.port}"
    try:
        async with http.post(f"{url}/api/generate", json={**SMALL, "timeout_s": 1}) as r:
            expiring = (await r.json())["task_id"]
        async with http.post(f"{url}/api/generate", json=SMALL) as r:
            cancelled = (await r.json())["task_id"]
        async with http.get(f"{url}/api/cancel", params={"task_id": cancelled}) as r:
            assert (await r.json())["status"] == "cancelled"
        final = await wait_status(http, url, expiring, timeout=30)
        assert final["status"] == "error" and "expired" in final["error"]

        svc = await start_service(broker.url, data_dir)  # a worker arrives late
        try:
            async with http.post(f"{url}/api/generate", json=SMALL) as r:
                later = (await r.json())["task_id"]
            assert (await wait_status(http, url, later))["status"] == "done"
        finally:
            await stop_service(svc)
        nc = await nats.connect(broker.url)
        js = nc.jetstream()
        for job_id, final_type in ((expiring, "expired"), (cancelled, "cancelled")):
            sub = await js.subscribe(names.events_subject(job_id), ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
            kinds = []
            while True:
                try:
                    kinds.append(decode((await sub.next_msg(timeout=1)).data, JobEvent).type)
                except nats.errors.TimeoutError:
                    break
            await sub.unsubscribe()
            assert kinds[-1] == final_type and "started" not in kinds, (job_id, kinds)
        info = await js.stream_info(names.JOBS_STREAM)
        assert info.state.messages == 0  # both messages were taken and acked without a generation
        await nc.close()
    finally:
        await gateway.stop()


async def test_cancel_a_running_job_over_websocket(service, http):
    async with http.post(f"{service.url}/v1/jobs", json={**SMALL, "steps": 100, "width": 256, "height": 256}) as r:
        job_id = (await r.json())["job_id"]
    async with http.ws_connect(f"{service.url}/v1/jobs/{job_id}/ws") as ws:
        kinds = []
        async with asyncio.timeout(60):
            async for message in ws:
                event = message.json()
                kinds.append(event["type"])
                if event["type"] == "progress" and event["step"] == 3:
                    await ws.send_json({"cancel": job_id})
                if event["type"] in ("done", "cancelled", "failed"):
                    break
    assert kinds[-1] == "cancelled" and "started" in kinds
    async with http.get(f"{service.url}/v1/jobs/{job_id}") as r:
        job = await r.json()
    assert job["state"] == "cancelled" and job["step"] < 100


async def test_audit_stream_records_request_and_outcome(service, http):
    async with http.post(f"{service.url}/api/generate", json={**SMALL, "prompt": "audited"}) as r:
        task_id = (await r.json())["task_id"]
    await wait_status(http, service.url, task_id)
    nc = await nats.connect(service.nats_url)
    js = nc.jetstream()
    sub = await js.subscribe(names.AUDIT_SUBJECT, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
    records = []
    async with asyncio.timeout(30):
        while not any(r.get("event") == "outcome" and r["job_id"] == task_id for r in records):
            records.append(json.loads((await sub.next_msg(timeout=10)).data))
    await nc.close()
    submitted = [r for r in records if r["job_id"] == task_id and r["event"] == "submitted"]
    outcome = [r for r in records if r["job_id"] == task_id and r["event"] == "outcome"]
    assert submitted[0]["request"]["prompt"] == "audited"
    assert outcome[0]["result"] == "done" and outcome[0]["duration_s"] > 0


async def test_n_over_a_keys_max_concurrent_is_403_naming_n(service, http):
    secret, entry = new_key_entry("two-at-once", tiers=["normal"], rate_per_minute=100, max_concurrent=2)
    gateway = await runtime.start_gateway(GatewaySettings(nats_url=service.nats_url, port=0, api_keys=json.dumps([entry])))
    url = f"http://127.0.0.1:{gateway.port}"
    try:
        async with http.post(f"{url}/v1/jobs", json={**SMALL, "n": 3}, headers=bearer(secret)) as r:
            assert r.status == 403, await r.text()
            body = await r.json()
        assert body["field"] == "n" and "n=3" in body["error"] and "max_concurrent=2" in body["error"]
        async with http.get(f"{url}/v1/jobs", headers=bearer(secret)) as r:
            assert await r.json() == []  # nothing was queued and taken back
    finally:
        await gateway.stop()


async def test_prompt_and_tier_are_refused_before_the_images_are_read(keyed, http):
    a, b, (url, _) = keyed
    broken = {"init_image": "this is not base64!", "mask_image": "%%%"}
    async with http.post(f"{url}/v1/jobs", json={**SMALL, **broken, "prompt": "a forbidden thing"}, headers=bearer(b)) as r:
        assert r.status == 400
        assert (await r.json())["field"] == "prompt"
    async with http.post(f"{url}/v1/jobs", json={**SMALL, **broken, "priority": True}, headers=bearer(a)) as r:
        assert r.status == 403
        assert (await r.json())["field"] == "priority"
