"""Live progress over real NATS: every event in order for late clients, SSE for plain HTTP clients,
previews, and queue positions across tiers."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time

import aiohttp
import pytest
from PIL import Image

from tests.helpers.native_reads import ws_events
from tests.helpers.service import start_service, stop_service, wait_status


async def submit(http, url, **fields) -> str:
    body = {"prompt": "progress", "width": 64, "height": 64, "steps": 6, **fields}
    async with http.post(f"{url}/v1/jobs", json=body) as r:
        assert r.status == 202, await r.text()
        return (await r.json())["job_id"]


def check_order(events: list[dict], steps: int) -> None:
    kinds = [e["type"] for e in events]
    assert kinds[0] == "queued" and kinds[1] == "started" and kinds[-1] == "done"
    assert [e["step"] for e in events if e["type"] == "progress"] == list(range(1, steps + 1))
    stamps = [e["ts"] for e in events]
    assert stamps == sorted(stamps)


async def test_live_and_late_websocket_clients_get_every_event_in_order(service, http):
    job_id = await submit(http, service.url, steps=6)
    live = await ws_events(http, service.url, job_id)
    check_order(live, 6)
    late = await ws_events(http, service.url, job_id)  # after the job is done: replayed from the stream
    assert late == live
    done = live[-1]
    assert done["image"]["width"] == 64 and done["timings"]["total_s"] > 0


async def test_event_times_keep_step_order_while_the_workers_loop_is_busy(service, http):
    """The GPU thread goes on while the worker's event loop is held up: each progress event still
    carries its step's time, earlier than the preview built after that step."""
    job_id = await submit(http, service.url, steps=20)
    follow = asyncio.ensure_future(ws_events(http, service.url, job_id))
    for _ in range(500):  # bounded: 500 holds of 20 ms at most
        if follow.done():
            break
        time.sleep(0.02)  # holds the loop the worker shares with this test
        await asyncio.sleep(0)
    events = await follow
    check_order(events, 20)
    assert [e["step"] for e in events if e["type"] == "preview"] == [5, 10, 15]


async def test_previews_are_small_jpegs(service, http):
    job_id = await submit(http, service.url, steps=10, width=128, height=96)
    events = await ws_events(http, service.url, job_id)
    previews = [e for e in events if e["type"] == "preview"]
    assert [p["step"] for p in previews] == [5]
    image = Image.open(io.BytesIO(base64.b64decode(previews[0]["preview"])))
    assert image.format == "JPEG" and image.size == (128, 96)


async def test_many_jobs_over_one_socket(service, http):
    ids = [await submit(http, service.url, steps=2, seed=i) for i in range(3)]
    finals: dict[str, str] = {}
    async with http.ws_connect(f"{service.url}/v1/ws") as ws:
        await ws.send_json({"follow": ids})
        async with asyncio.timeout(60):
            async for message in ws:
                event = message.json()
                if event["type"] == "done":
                    finals[event["job_id"]] = "done"
                if len(finals) == 3:
                    break
    assert set(finals) == set(ids)


async def test_server_sent_events_with_a_plain_http_client(service):
    async with aiohttp.ClientSession() as http:
        job_id = await submit(http, service.url, steps=4)
        async with http.get(f"{service.url}/v1/jobs/{job_id}/events") as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            raw = (await asyncio.wait_for(r.read(), 60)).decode()
    blocks = [b for b in raw.split("\n\n") if b.strip()]
    parsed = []
    for block in blocks:
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        data = json.loads(lines["data"])
        assert data["type"] == lines["event"]
        parsed.append(data)
    check_order(parsed, 4)


async def test_sse_for_unknown_job_is_404(service, http):
    async with http.get(f"{service.url}/v1/jobs/unknown-job-1/events") as r:
        assert r.status == 404


async def test_polling_sees_running_step_and_eta(service, http):
    job_id = await submit(http, service.url, steps=60, width=256, height=256)
    seen = None
    async with asyncio.timeout(60):
        while True:
            async with http.get(f"{service.url}/v1/jobs/{job_id}") as r:
                job = await r.json()
            if job["state"] == "running" and job["step"] > 0:
                seen = job
                break
            assert job["state"] in ("queued", "running")
            await asyncio.sleep(0.02)
    assert seen["total_steps"] == 60 and seen["eta_s"] > 0 and seen["position"] is None
    async with http.post(f"{service.url}/v1/jobs/{job_id}/cancel") as r:
        assert r.status == 200
    final = await wait_status(http, service.url, job_id)
    assert final == {"status": "error", "error": "cancelled"}


async def order_taken(http, url, broker, data_dir, job_ids: list[str]) -> list[str]:
    """Starts a worker on the queued jobs and returns them in the order it started them."""
    svc = await start_service(broker.url, data_dir, preview_every=0)
    try:
        for job_id in job_ids:
            await wait_status(http, url, job_id)
        async with http.get(f"{url}/api/tasks") as r:
            tasks = {t["task_id"]: t for t in await r.json()}
        return sorted(job_ids, key=lambda j: tasks[j]["start_time"])
    finally:
        await stop_service(svc)


async def test_positions_across_tiers_and_the_order_workers_take_them(broker, data_dir, http):
    from gateway.settings import GatewaySettings
    from imagegen import runtime

    gateway = await runtime.start_gateway(GatewaySettings(nats_url=broker.url, port=0))
    url = f"http://127.0.0.1:{gateway.port}"
    try:
        low = await submit(http, url, tier="low", steps=2)
        normal_1 = await submit(http, url, steps=2)
        high = await submit(http, url, priority=True, steps=2)
        normal_2 = await submit(http, url, tier="normal", steps=2)
        expected = {high: 0, normal_1: 1, normal_2: 2, low: 3}
        for job_id, position in expected.items():
            async with http.get(f"{url}/api/status", params={"task_id": job_id}) as r:
                status = await r.json()
            assert status["status"] == "waiting" and status["pos"] == position, (job_id, status)
        async with http.post(f"{url}/api/generate", json={"prompt": "last", "width": 64, "height": 64, "steps": 2}) as r:
            assert (await r.json())["task_length"] == 4  # behind high, normal_1, normal_2; ahead of low
        async with http.get(f"{url}/api/status", params={"task_id": low}) as r:
            assert (await r.json())["pos"] == 4

        assert await order_taken(http, url, broker, data_dir, list(expected)) == [high, normal_1, normal_2, low]
    finally:
        await gateway.stop()


async def test_etas_follow_the_lower_tiers_turn_and_workers_take_that_order(broker, data_dir, http):
    """A worker takes a low-tier job after `--fairness` (default 5) normal ones taken in a row while it
    waited, not after every normal job: the ETAs at submission rank the jobs in that order, and the real
    worker takes them so."""
    from gateway.settings import GatewaySettings
    from imagegen import runtime
    from schemas.workers import DEFAULT_FAIRNESS

    gateway = await runtime.start_gateway(GatewaySettings(nats_url=broker.url, port=0))
    url = f"http://127.0.0.1:{gateway.port}"
    try:
        low = await submit(http, url, tier="low", steps=2)
        normals = [await submit(http, url, steps=2, seed=i) for i in range(DEFAULT_FAIRNESS + 2)]
        expected = [*normals[:DEFAULT_FAIRNESS], low, *normals[DEFAULT_FAIRNESS:]]
        etas = {job_id: await eta_of(http, url, job_id) for job_id in expected}
        assert sorted(expected, key=etas.get) == expected, etas
        async with http.get(f"{url}/v1/jobs/{low}") as r:
            assert (await r.json())["position"] == DEFAULT_FAIRNESS + 2  # positions stay in priority order

        assert await order_taken(http, url, broker, data_dir, expected) == expected
    finally:
        await gateway.stop()


async def eta_of(http, url, job_id) -> float:
    async with http.get(f"{url}/v1/jobs/{job_id}") as r:
        job = await r.json()
    assert job["state"] == "queued", job
    return job["eta_s"]


async def test_a_low_tier_eta_counts_the_higher_tier_work_still_to_come(broker, http):
    """No worker: every job stays queued, costed alike by the default speed model. A low-tier job's ETA
    is the work queued ahead of it plus its own, its wait stretched by the normal-tier work that arrived
    over the last minute (more of it will come and go first); stretched less than that wait's mean,
    since most waits see fewer arrivals than the mean counts."""
    from gateway.state.forecast import ARRIVAL_WINDOW_S
    from gateway.settings import GatewaySettings
    from imagegen import runtime

    gateway = await runtime.start_gateway(GatewaySettings(nats_url=broker.url, port=0))
    url = f"http://127.0.0.1:{gateway.port}"
    fields = dict(width=1024, height=1024, steps=30)
    try:
        one = await eta_of(http, url, await submit(http, url, tier="low", **fields))
        assert one > 0
        assert await eta_of(http, url, await submit(http, url, tier="low", **fields)) == pytest.approx(2 * one)
        for _ in range(4):
            await submit(http, url, tier="normal", **fields)
        # no high-tier arrivals: a normal job's ETA is the four normal jobs ahead plus its own
        assert await eta_of(http, url, await submit(http, url, tier="normal", **fields)) == pytest.approx(5 * one)
        low = await eta_of(http, url, await submit(http, url, tier="low", **fields))
        ahead = 7 * one  # five normal and two low jobs
        load = 5 * one / ARRIVAL_WINDOW_S  # the normal work that arrived, per second, on one worker
        assert ahead + one < low < ahead / (1 - load) + one
    finally:
        await gateway.stop()


async def test_a_follower_of_a_queued_job_hears_its_place_as_the_queue_moves(broker, http):
    """No worker: three jobs wait. A WebSocket and an SSE follower of the last one get its `queued` event,
    then another each time a job ahead of it leaves the queue (here: cancelled), with its new position
    and ETA, then its own end."""
    from gateway.settings import GatewaySettings
    from imagegen import runtime

    gateway = await runtime.start_gateway(GatewaySettings(nats_url=broker.url, port=0))
    url = f"http://127.0.0.1:{gateway.port}"
    try:
        first, second, third = [await submit(http, url, seed=i) for i in range(3)]
        async with http.ws_connect(f"{url}/v1/jobs/{third}/ws") as ws, http.get(f"{url}/v1/jobs/{third}/events") as sse:
            assert sse.status == 200

            async def next_ws() -> dict:
                return await asyncio.wait_for(ws.receive_json(), 30)

            async def next_sse() -> dict:
                block = b""
                while not block.endswith(b"\n\n"):
                    block += await asyncio.wait_for(sse.content.readline(), 30)
                lines = dict(line.split(": ", 1) for line in block.decode().strip().splitlines())
                return json.loads(lines["data"])

            async def next_news(follower, place: int) -> dict:
                """The next event that is not the same place again (with nothing moving, the ETA the
                follower counts down from is set right now and then)."""
                for _ in range(100):
                    event = await follower()
                    if event["type"] != "queued" or event["position"] != place:
                        return event
                raise AssertionError(f"only the same place came, position {place}")

            for follower in (next_ws, next_sse):
                queued = await follower()
                assert (queued["type"], queued["position"]) == ("queued", 2), queued
            etas = [queued["eta_s"]]
            for ahead, position in ((first, 1), (second, 0)):
                async with http.post(f"{url}/v1/jobs/{ahead}/cancel") as r:
                    assert r.status == 200
                for follower in (next_ws, next_sse):
                    moved = await next_news(follower, position + 1)
                    assert (moved["type"], moved["position"]) == ("queued", position), moved
                etas.append(moved["eta_s"])
            assert etas[0] > etas[1] > etas[2] > 0  # one job less ahead each time
            async with http.post(f"{url}/v1/jobs/{third}/cancel") as r:
                assert r.status == 200
            for follower in (next_ws, next_sse):
                assert (await next_news(follower, 0))["type"] == "cancelled"
    finally:
        await gateway.stop()


async def test_a_place_that_cannot_be_worked_out_costs_the_follower_no_event(broker, http, monkeypatch):
    """A failure while working out a queued job's place is logged; its follower still gets the job's own
    events."""
    from gateway.state import event_feed
    from gateway.settings import GatewaySettings
    from imagegen import runtime

    gateway = await runtime.start_gateway(GatewaySettings(nats_url=broker.url, port=0))
    url = f"http://127.0.0.1:{gateway.port}"
    try:
        first, second = [await submit(http, url, seed=i) for i in range(2)]
        async with http.ws_connect(f"{url}/v1/jobs/{second}/ws") as ws:
            assert (await asyncio.wait_for(ws.receive_json(), 30))["type"] == "queued"

            def broken(jobs, job_id, last):
                raise RuntimeError("no forecast")

            monkeypatch.setattr(event_feed, "_moved", broken)
            async with http.post(f"{url}/v1/jobs/{first}/cancel") as r:
                assert r.status == 200
            await asyncio.sleep(1.5)  # a place check or more with the job ahead gone
            monkeypatch.undo()
            async with http.post(f"{url}/v1/jobs/{second}/cancel") as r:
                assert r.status == 200
            later = await asyncio.wait_for(ws.receive_json(), 30)
            while later["type"] == "queued":  # a place worked out once the ETA came back
                later = await asyncio.wait_for(ws.receive_json(), 30)
            assert later["type"] == "cancelled"
    finally:
        await gateway.stop()


async def test_a_job_queued_straight_over_nats_gets_its_place_from_the_gateway(broker, http):
    """A service that queues over NATS sends `queued` without a place (it has no view of the queue); a
    WebSocket follower through the gateway then gets the job's position and ETA from the gateway."""
    from gateway.settings import GatewaySettings
    from imagegen import runtime
    from imagegen.client import AsyncClient

    gateway = await runtime.start_gateway(GatewaySettings(nats_url=broker.url, port=0))
    url = f"http://127.0.0.1:{gateway.port}"
    try:
        await submit(http, url, seed=1)  # one job ahead of it
        async with AsyncClient(nats=broker.url) as service:
            job_id = await service.submit("queued over NATS", width=64, height=64, steps=6)
        async with http.ws_connect(f"{url}/v1/jobs/{job_id}/ws") as ws:
            stored = await asyncio.wait_for(ws.receive_json(), 30)
            assert stored["type"] == "queued" and "position" not in stored, stored
            placed = await asyncio.wait_for(ws.receive_json(), 30)
            assert placed["type"] == "queued" and placed["position"] == 1 and placed["eta_s"] > 0, placed
    finally:
        await gateway.stop()
