"""GET /v1/jobs: the caller's jobs newest first, a page at a time, filtered by state. Over real NATS,
with a gateway whose jobs no worker takes."""

from __future__ import annotations

import re

import pytest

from gateway.settings import GatewaySettings
from imagegen import runtime

JOB = {"prompt": "a listed job", "width": 64, "height": 64, "steps": 2}


@pytest.fixture
async def queue_only(broker):
    gateway = await runtime.start_gateway(GatewaySettings(nats_url=broker.url, port=0))
    yield f"http://127.0.0.1:{gateway.port}"
    await gateway.stop()


async def submitted(http, url: str, count: int) -> list[str]:
    job_ids = []
    for i in range(count):
        async with http.post(f"{url}/v1/jobs", json={**JOB, "seed": i}) as r:
            assert r.status == 202, await r.text()
            job_ids.append((await r.json())["job_id"])
    return job_ids


def next_link(response) -> str | None:
    found = re.fullmatch(r'<([^>]+)>; rel="next"', response.headers.get("Link", ""))
    return found.group(1) if found else None


async def test_a_listing_pages_through_every_job_newest_first(queue_only, http):
    job_ids = await submitted(http, queue_only, 5)
    pages, path = [], "/v1/jobs?limit=2"
    while path is not None:
        async with http.get(f"{queue_only}{path}") as r:
            assert r.status == 200, await r.text()
            pages.append([j["job_id"] for j in await r.json()])
            path = next_link(r)
        assert len(pages) <= 5
    assert pages == [job_ids[4:2:-1], job_ids[2:0:-1], job_ids[:1]]


async def test_a_listing_without_a_limit_answers_the_newest_hundred(queue_only, http):
    job_ids = await submitted(http, queue_only, 3)
    async with http.get(f"{queue_only}/v1/jobs") as r:
        assert [j["job_id"] for j in await r.json()] == job_ids[::-1]
        assert "Link" not in r.headers


async def test_a_listing_by_state_answers_only_jobs_in_those_states(queue_only, http):
    job_ids = await submitted(http, queue_only, 4)
    for job_id in job_ids[1:3]:
        async with http.post(f"{queue_only}/v1/jobs/{job_id}/cancel") as r:
            assert r.status == 200
    async with http.get(f"{queue_only}/v1/jobs?state=cancelled") as r:
        assert [j["job_id"] for j in await r.json()] == [job_ids[2], job_ids[1]]
    async with http.get(f"{queue_only}/v1/jobs?state=queued,running&limit=1") as r:
        assert [j["job_id"] for j in await r.json()] == [job_ids[3]]
        following = next_link(r)
    assert "state=queued%2Crunning" in following and "limit=1" in following
    async with http.get(f"{queue_only}{following}") as r:
        assert [j["job_id"] for j in await r.json()] == [job_ids[0]]
        assert next_link(r) is None


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("state=finished", "state"),
        ("state=", "state"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=ten", "limit"),
        ("limit=%C2%B2", "limit"),  # a superscript two: a digit to str.isdigit, not to int()
        ("limit=" + "9" * 5000, "limit"),
        ("before=yesterday", "before"),
        ("before=nan_abc", "before"),
        ("before=12.5_", "before"),
    ],
)
async def test_a_bad_listing_query_is_refused_naming_it(queue_only, http, query, named):
    async with http.get(f"{queue_only}/v1/jobs?{query}") as r:
        assert r.status == 400
        error = await r.json()
    assert error["field"] == named
