"""Nothing is lost when a process dies: workers and gateways run as real processes against their own
nats-server, and are SIGKILLed, SIGTERMed and restarted in the middle of jobs.

Every test gets a fresh nats-server (so no other worker can take its jobs) and runs with a 2 s ack
wait and 3 deliveries at most, the same on every process, so redeliveries happen within the test.
"""

from __future__ import annotations

import asyncio
import io
import json
import signal

import aiohttp
import msgpack
import nats
import pytest
from nats.js.api import DeliverPolicy
from PIL import Image

from gateway.settings import GatewaySettings
from imagegen import runtime
from imagegen.embedded_nats import free_port
from schemas import names
from schemas.jetstream import Topology
from tests.helpers.real_processes import job_state, stored_events, submit, wait_state

ACK_WAIT_S = 2.0
MAX_DELIVER = 3
TOPOLOGY = Topology(ack_wait_s=ACK_WAIT_S, max_deliver=MAX_DELIVER)
TOPOLOGY_FLAGS = ("--ack-wait", str(ACK_WAIT_S), "--max-deliver", str(MAX_DELIVER))
WORKER_FLAGS = (*TOPOLOGY_FLAGS, "--sim-step-s", "0.2", "--log-level", "INFO")
POISON = "__crash__"


@pytest.fixture
async def gateway(broker):
    """A gateway in the test's loop (its crash is tested with a real process below)."""
    running = await runtime.start_gateway(GatewaySettings(nats_url=broker.url, port=0, topology=TOPOLOGY))
    yield f"http://127.0.0.1:{running.port}"
    await running.stop()


def job_body(prompt: str, *, steps: int, seed: int = 1) -> dict:
    return {"prompt": prompt, "width": 64, "height": 64, "steps": steps, "seed": seed}


def starts(events) -> list[tuple[int, str]]:
    return [(e.attempt, e.worker) for e in events if e.type == "started"]


def finals(events) -> list[str]:
    return [e.type for e in events if e.final]


async def image_of(http: aiohttp.ClientSession, url: str, job_id: str) -> Image.Image:
    async with http.get(f"{url}/v1/jobs/{job_id}/image", timeout=aiohttp.ClientTimeout(total=10)) as r:
        assert r.status == 200, await r.text()
        return Image.open(io.BytesIO(await r.read()))


async def test_killed_worker_job_is_redelivered_and_finished_once(broker, gateway, parts, http):
    doomed = await parts.worker(broker.url, *WORKER_FLAGS, name="doomed")
    job_id = await submit(http, gateway, job_body("a lighthouse at dusk", steps=10, seed=7))
    running = await wait_state(http, gateway, job_id, {"running"})
    assert running["worker"] == "doomed" and running["attempt"] == 1

    await doomed.kill()
    await parts.worker(broker.url, *WORKER_FLAGS, name="rescuer")
    done = await wait_state(http, gateway, job_id, {"done", "failed", "cancelled", "expired"}, timeout=30)

    assert done["state"] == "done", done
    assert done["attempt"] == 2 and done["worker"] == "rescuer"
    events = await stored_events(broker.url, job_id)
    assert starts(events) == [(1, "doomed"), (2, "rescuer")]
    assert finals(events) == ["done"]
    assert (await image_of(http, gateway, job_id)).size == (64, 64)

    nc = await nats.connect(broker.url)
    try:
        images = await nc.jetstream().object_store(names.IMAGES_BUCKET)
        stored = [info for info in await images.list() if info.name == job_id]
    finally:
        await nc.close()
    assert len(stored) == 1 and not stored[0].deleted


async def test_long_job_is_not_redelivered_while_its_worker_heartbeats(broker, gateway, parts, http):
    # 30 steps of 0.2 s: three ack waits long. A second, idle worker would take the job if it came back.
    await asyncio.gather(
        parts.worker(broker.url, *WORKER_FLAGS, name="first"), parts.worker(broker.url, *WORKER_FLAGS, name="second")
    )
    job_id = await submit(http, gateway, job_body("a long exposure of the sea", steps=30))

    done = await wait_state(http, gateway, job_id, {"done", "failed"}, timeout=40)

    assert done["state"] == "done" and done["attempt"] == 1
    events = await stored_events(broker.url, job_id)
    assert starts(events) == [(1, done["worker"])]
    assert [e.step for e in events if e.type == "progress"] == list(range(1, 31))


async def test_poison_job_is_retried_a_bounded_number_of_times_then_dead_lettered(broker, gateway, parts, http):
    worker = await parts.worker(broker.url, *WORKER_FLAGS, "--sim-fail-marker", POISON, name="sturdy")
    nc = await nats.connect(broker.url)
    try:
        js = nc.jetstream()
        dlq = await js.subscribe(names.DLQ_SUBJECT, deliver_policy=DeliverPolicy.ALL)
        poison = await submit(http, gateway, job_body(f"a cat {POISON}", steps=2))

        failed = await wait_state(http, gateway, poison, {"done", "failed"}, timeout=30)

        assert failed["state"] == "failed" and failed["attempt"] == MAX_DELIVER
        assert f"failed {MAX_DELIVER} times" in failed["error"] and POISON in failed["error"]
        letter = msgpack.unpackb((await dlq.next_msg(timeout=10)).data)
        assert letter["job_id"] == poison and letter["attempt"] == MAX_DELIVER
        assert letter["reason"] == failed["error"]
        events = await stored_events(broker.url, poison)
        assert starts(events) == [(n, "sturdy") for n in range(1, MAX_DELIVER + 1)]
        assert finals(events) == ["failed"]

        after = await submit(http, gateway, job_body("a calm cat", steps=2))
        done = await wait_state(http, gateway, after, {"done", "failed"}, timeout=20)
        assert done["state"] == "done" and done["attempt"] == 1 and done["worker"] == "sturdy"
        consumer = await js.consumer_info(names.JOBS_STREAM, names.Tier.NORMAL.consumer)
        assert consumer.num_pending == 0 and consumer.num_ack_pending == 0
        with pytest.raises(nats.errors.TimeoutError):
            await dlq.next_msg(timeout=0.5)  # one letter, not one per try
    finally:
        await nc.close()
    assert worker.alive


async def test_job_whose_worker_dies_on_every_try_ends_failed_not_running(broker, gateway, parts, http):
    # The worker running the job is SIGKILLed on each of the 3 tries, with the next worker already idle.
    # It is frozen (SIGSTOP) first, so the job cannot end on it while its successor starts, however long
    # that takes on a loaded machine; a frozen worker sends no heartbeat, as a dead one.
    worker = await parts.worker(broker.url, *WORKER_FLAGS, name="w1")
    job_id = await submit(http, gateway, job_body("a job that outlives its workers", steps=30))
    for attempt in range(1, MAX_DELIVER + 1):
        running = await wait_state(http, gateway, job_id, {"running"})
        for _ in range(100):
            if running["attempt"] == attempt:
                break
            await asyncio.sleep(0.1)
            running = await wait_state(http, gateway, job_id, {"running"})
        assert (running["attempt"], running["worker"]) == (attempt, f"w{attempt}")
        worker.signal(signal.SIGSTOP)
        assert (await job_state(http, gateway, job_id))["state"] == "running"
        successor = await parts.worker(broker.url, *WORKER_FLAGS, name=f"w{attempt + 1}")
        await worker.kill()
        worker = successor

    failed = await wait_state(http, gateway, job_id, {"done", "failed"}, timeout=20)

    assert failed["state"] == "failed" and f"none of its {MAX_DELIVER} tries finished" in failed["error"]
    events = await stored_events(broker.url, job_id)
    assert starts(events) == [(n, f"w{n}") for n in range(1, MAX_DELIVER + 1)]
    assert finals(events) == ["failed"]
    assert worker.alive


async def test_sigterm_finishes_the_job_in_hand_and_takes_no_more(broker, gateway, parts, http):
    draining = await parts.worker(broker.url, *WORKER_FLAGS, name="draining")
    first = await submit(http, gateway, job_body("the job in hand", steps=15))
    second = await submit(http, gateway, job_body("the next job", steps=2))
    await wait_state(http, gateway, first, {"running"})

    draining.signal(signal.SIGTERM)

    assert await draining.wait_exit(timeout=30) == 0
    finished = await wait_state(http, gateway, first, {"done", "failed"}, timeout=5)
    assert finished["state"] == "done" and finished["attempt"] == 1 and finished["worker"] == "draining"
    assert (await wait_state(http, gateway, second, {"queued", "running", "done"}))["state"] == "queued"

    await parts.worker(broker.url, *WORKER_FLAGS, name="successor")
    taken = await wait_state(http, gateway, second, {"done", "failed"}, timeout=20)
    assert taken["state"] == "done" and taken["attempt"] == 1 and taken["worker"] == "successor"


async def read_sse(http: aiohttp.ClientSession, url: str) -> list[tuple[str, dict]]:
    async with http.get(url, timeout=aiohttp.ClientTimeout(total=30)) as r:
        assert r.status == 200, await r.text()
        text = (await r.read()).decode()
    events = []
    for block in text.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in lines:
            events.append((lines["event"], json.loads(lines["data"])))
    return events


async def test_killed_gateway_loses_nothing_a_new_one_serves_it_all(broker, parts, http):
    await parts.worker(broker.url, *WORKER_FLAGS, name="painter")
    first_port, second_port = free_port(), free_port()
    first = await parts.gateway(broker.url, first_port, *TOPOLOGY_FLAGS, name="gateway-a")
    job_id = await submit(http, f"http://127.0.0.1:{first_port}", job_body("a harbour", steps=10, seed=3))

    await first.kill()
    await parts.gateway(broker.url, second_port, *TOPOLOGY_FLAGS, name="gateway-b")
    url = f"http://127.0.0.1:{second_port}"

    done = await wait_state(http, url, job_id, {"done", "failed"}, timeout=30)
    assert done["state"] == "done" and done["attempt"] == 1
    events = await read_sse(http, f"{url}/v1/jobs/{job_id}/events")
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "queued" and kinds[-1] == "done" and kinds.count("started") == 1
    assert [body["step"] for kind, body in events if kind == "progress"] == list(range(1, 11))
    assert (await image_of(http, url, job_id)).size == (64, 64)
    async with http.get(f"{url}/api/status", params={"task_id": job_id}) as r:
        assert (await r.json()) == {"status": "done"}
