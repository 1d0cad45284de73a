"""A key's quota of unfinished jobs (`max_concurrent`) holds across gateways under concurrent submits:
two gateway processes over one nats-server, a burst of submits at once, exactly the quota accepted; the
places come back when the jobs end on a worker."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import nats
import pytest

from gateway.http.auth import new_key_entry
from gateway.state.quota import RECORD_GRACE_S, reserve
from gateway.http.ratelimit import RateLimited
from imagegen.embedded_nats import free_port
from schemas import names
from schemas.jetstream import ensure_topology
from tests.helpers.real_processes import wait_state

BURST = 30


async def test_thirty_concurrent_submits_over_two_gateways_accept_exactly_the_quota(broker, parts, tmp_path):
    secret, entry = new_key_entry("two-at-once", tiers=["normal"], rate_per_minute=1000, max_concurrent=2)
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps([entry]))
    ports = [free_port(), free_port()]
    for i, port in enumerate(ports):
        await parts.gateway(broker.url, port, "--api-keys", str(keys), name=f"quota-gateway-{i}")
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    headers = {"Authorization": f"Bearer {secret}"}

    async with aiohttp.ClientSession(headers=headers) as http:

        async def submit(i: int) -> tuple[int, dict]:
            body = {"prompt": f"quota {i}", "seed": i, "width": 64, "height": 64, "steps": 2, "cache": False}
            async with http.post(f"{urls[i % 2]}/v1/jobs", json=body, timeout=aiohttp.ClientTimeout(total=60)) as r:
                return r.status, await r.json()

        # No worker yet: every accepted job stays unfinished while the burst lasts.
        answers = await asyncio.gather(*(submit(i) for i in range(BURST)))
        accepted = [body["job_id"] for status, body in answers if status == 202]
        refused = [body for status, body in answers if status == 429]
        assert len(accepted) == 2, answers
        assert len(refused) == BURST - 2, answers
        assert all("has 2 unfinished jobs, its quota is 2" in body["error"] for body in refused), refused[0]

        again, _ = await submit(BURST)
        assert again == 429  # still full while both are queued

        await parts.worker(broker.url, "--sim-step-s", "0.01", name="quota-worker")
        for i, job_id in enumerate(accepted):
            await wait_state(http, urls[i % 2], job_id, {"done"}, timeout=60)

        # Their places are back, on either gateway, up to the quota again.
        after = [await submit(BURST + 1 + i) for i in range(2)]
        assert [status for status, _ in after] == [202, 202], after


async def test_places_a_gateway_reserved_before_it_died_come_back_after_the_grace(broker):
    """A gateway that reserved places and died before writing the jobs' records: the places count for
    RECORD_GRACE_S, then the key's next submit drops them."""
    nc = await nats.connect(broker.url)
    try:
        js = nc.jetstream()
        await ensure_topology(js)
        quota_kv, status_kv = await js.key_value(names.QUOTA_BUCKET), await js.key_value(names.STATUS_BUCKET)
        await reserve(quota_kv, status_kv, "crashy", ["never-written-1", "never-written-2"], limit=2, now=1000.0)
        with pytest.raises(RateLimited, match="has 2 unfinished jobs, its quota is 2"):
            await reserve(quota_kv, status_kv, "crashy", ["next"], limit=2, now=1000.0 + RECORD_GRACE_S / 2)
        await reserve(quota_kv, status_kv, "crashy", ["next"], limit=2, now=1000.0 + RECORD_GRACE_S + 1)
        await reserve(quota_kv, status_kv, "crashy", ["again"], limit=2, now=1000.0 + RECORD_GRACE_S + 2)
        with pytest.raises(RateLimited):
            await reserve(quota_kv, status_kv, "crashy", ["third"], limit=2, now=1000.0 + RECORD_GRACE_S + 3)
    finally:
        await nc.close()
