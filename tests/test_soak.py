"""The soak of `bench/soak.py`, run in CI the same way: 2,000 jobs over HTTP through real processes
(nats-server with file storage, a gateway, 4 simulated workers) while busy workers are SIGKILLed and
started again and the broker is SIGKILLed and started again once; then every job is checked from the
broker's own records: final, one image per done job, no job doubled, none lost. About 45 s on two
cores. And a submit retried with its Idempotency-Key after its first try stopped between writing the
job's record and publishing the job: the retry publishes it, and the job runs once."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nats
import pytest

from gateway.core.service import idempotent_job_id
from imagegen.embedded_nats import free_port
from schemas import jobstore, names
from schemas.request import parse_request
from schemas.status import JobStatus
from tests.helpers.real_processes import stored_events, wait_state

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from soak import SoakSettings, problems, run_soak, table  # noqa: E402

pytestmark = pytest.mark.processes  # each test starts imagegen and nats-server processes of its own

JOBS = 2000
KILLS = 6


async def test_soak_with_worker_kills_and_a_broker_restart_loses_and_doubles_nothing(tmp_path):
    result = await run_soak(SoakSettings(jobs=JOBS, rate=50, kills=KILLS, workdir=str(tmp_path)))
    print(table(result))

    assert result["not_submitted"] == [] and result["submitted"] == JOBS
    assert result["lost"] == 0
    assert result["duplicates"] == 0, result["duplicate_ids"]
    assert result["states"] == {"done": JOBS}
    assert result["done_with_one_image"] == JOBS
    assert result["kills"] == KILLS and result["broker_restarts"] == 1
    assert result["redeliveries"] >= 1  # the jobs in the killed workers' hands came back
    assert result["submit_retries"] >= 1  # clients met the outage and sent again with the same key
    assert result["processes_alive_at_end"] == {"gateway": True, "workers": 4}
    assert result["done_without_event"] == 0 and result["done_without_image"] == 0
    assert result["runs"] >= JOBS  # every job's run is in the workers' logs, the outage's too
    assert problems(result) == []


@pytest.mark.parametrize("seed", [7, None], ids=["seeded", "unseeded"])
async def test_submit_retried_after_its_first_try_stopped_before_publishing_runs_once(broker, parts, http, seed):
    await parts.worker(broker.url, "--sim-step-s", "0.01", name="painter")
    port = free_port()
    await parts.gateway(broker.url, port)
    url = f"http://127.0.0.1:{port}"
    body = {"prompt": "half submitted", "width": 64, "height": 64, "steps": 2} | ({"seed": seed} if seed else {})
    key = f"retry-{seed}"
    job_id = idempotent_job_id(None, key)
    request = parse_request(body)
    nc = await nats.connect(broker.url)
    try:  # what the first try left when the gateway (or the broker) went away before it published the job
        kv = await nc.jetstream().key_value(names.STATUS_BUCKET)
        queued = JobStatus(
            job_id=job_id, request=request.model_dump(mode="json", exclude_none=True), seed=seed or 1, submitted_at=time.time()
        )
        assert await jobstore.create_status(kv, queued)
    finally:
        await nc.close()

    for _ in range(2):  # the retry, then one more: the same job each time
        async with http.post(f"{url}/v1/jobs", json=body, headers={"Idempotency-Key": key}) as r:
            assert r.status == 202 and (await r.json())["job_id"] == job_id
        done = await wait_state(http, url, job_id, {"done", "failed"}, timeout=30)
        assert done["state"] == "done" and done["attempt"] == 1

    kinds = [event.type for event in await stored_events(broker.url, job_id)]
    assert kinds.count("started") == 1 and kinds.count("done") == 1
