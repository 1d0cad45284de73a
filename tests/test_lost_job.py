"""A worker that stalls past the ack wait loses its job to another and, on waking, stops at its next
step without writing over the try that holds the job now: real worker processes (the simulated engine),
one paused with SIGSTOP and resumed with SIGCONT, over a nats-server of the test's own."""

from __future__ import annotations

import asyncio
import signal

from gateway.settings import GatewaySettings
from imagegen import runtime
from schemas.jetstream import Topology
from tests.helpers.real_processes import stored_events, submit, wait_state

ACK_WAIT_S = 2.0
TOPOLOGY_FLAGS = ("--ack-wait", str(ACK_WAIT_S))
WORKER_FLAGS = (*TOPOLOGY_FLAGS, "--sim-step-s", "0.2", "--log-level", "INFO")
STEPS = 20
FINAL = {"done", "failed", "cancelled", "expired"}


async def test_a_worker_paused_past_its_ack_wait_stops_at_its_next_step_and_the_job_ends_once(broker, parts, http):
    gateway = await runtime.start_gateway(
        GatewaySettings(nats_url=broker.url, port=0, topology=Topology(ack_wait_s=ACK_WAIT_S))
    )
    url = f"http://127.0.0.1:{gateway.port}"
    try:
        sleeper = await parts.worker(broker.url, *WORKER_FLAGS, name="sleeper")
        job_id = await submit(http, url, {"prompt": "a lost job", "width": 64, "height": 64, "steps": STEPS, "seed": 3})
        deadline = asyncio.get_running_loop().time() + 30
        while (job := await wait_state(http, url, job_id, {"running"}))["step"] < 2:
            assert asyncio.get_running_loop().time() < deadline, job
            await asyncio.sleep(0.05)

        sleeper.signal(signal.SIGSTOP)
        try:
            await parts.worker(broker.url, *WORKER_FLAGS, name="taker")
            deadline = asyncio.get_running_loop().time() + 30
            while (job := await wait_state(http, url, job_id, {"running", *FINAL}))["worker"] != "taker":
                assert asyncio.get_running_loop().time() < deadline, job
                await asyncio.sleep(0.05)
            assert job["attempt"] == 2 and job["state"] == "running", job
        finally:
            sleeper.signal(signal.SIGCONT)

        await sleeper.wait_for_log(f"job {job_id} try 1 lost the job", timeout=20)
        done = await wait_state(http, url, job_id, FINAL, timeout=30)
        assert done["state"] == "done" and done["worker"] == "taker" and done["attempt"] == 2, done
        assert sleeper.alive  # it goes on serving

        events = await stored_events(broker.url, job_id)
        assert [(e.attempt, e.worker) for e in events if e.type == "started"] == [(1, "sleeper"), (2, "taker")]
        assert [e.type for e in events if e.final] == ["done"]
        second = next(i for i, e in enumerate(events) if e.type == "started" and e.attempt == 2)
        steps_after = [e.step for e in events[second:] if e.type == "progress"]
        assert steps_after == list(range(1, STEPS + 1)), steps_after  # the taker's steps only, none of the sleeper's
        async with http.get(f"{url}/v1/jobs/{job_id}/image") as r:
            assert r.status == 200
        assert "try 1 done" not in sleeper.log()
    finally:
        await gateway.stop()
