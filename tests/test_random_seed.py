"""Seed -1 means "random", as AUTOMATIC1111 users type it, on every API: each such request gets a seed
of its own, picked by the server and reported; any other negative seed is refused by name."""

from __future__ import annotations

import pytest

from schemas.request import RequestInvalid, parse_request

SMALL = {"width": 64, "height": 64, "steps": 1}


async def seed_of(http, url: str, job_id: str) -> int:
    async with http.get(f"{url}/v1/jobs/{job_id}") as r:
        assert r.status == 200, await r.text()
        return (await r.json())["seed"]


async def native(http, url: str, seed) -> int:
    async with http.post(f"{url}/v1/jobs", json={"prompt": "a fox", "seed": seed, **SMALL}) as r:
        assert r.status in (200, 201, 202), await r.text()
        return (await r.json())["seed"]


async def mflux(http, url: str, seed) -> int:
    async with http.post(f"{url}/api/generate", json={"prompt": "a fox", "seed": seed, **SMALL}) as r:
        assert r.status == 200, await r.text()
        return await seed_of(http, url, (await r.json())["task_id"])


async def openai(http, url: str, seed) -> int:
    body = {"prompt": "a fox", "seed": seed, "size": "64x64", "steps": 1}
    async with http.post(f"{url}/v1/images/generations", json=body) as r:
        assert r.status == 200, await r.text()
        return (await r.json())["data"][0]["seed"]


async def a1111(http, url: str, seed) -> int:
    async with http.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "a fox", "seed": seed, **SMALL}) as r:
        assert r.status == 200, await r.text()
        import json

        return json.loads((await r.json())["info"])["seed"]


@pytest.mark.parametrize("api", [native, mflux, openai, a1111])
@pytest.mark.parametrize("seed", [-1, "-1"], ids=["number", "text"])
async def test_seed_minus_one_is_a_random_seed(service, http, api, seed):
    if api in (openai, a1111) and seed == "-1":
        pytest.skip("OpenAI's and AUTOMATIC1111's seeds are JSON numbers")
    first, second = await api(http, service.url, seed), await api(http, service.url, seed)
    assert first >= 0 and second >= 0 and first != second


def test_seed_minus_one_over_nats_is_no_seed_and_other_negatives_are_refused():
    assert parse_request({"prompt": "a fox", "seed": -1}).seed is None
    assert parse_request({"prompt": "a fox", "seed": " -1 "}).seed is None
    for bad in (-2, "-2", -1.5):
        with pytest.raises(RequestInvalid, match="seed") as refused:
            parse_request({"prompt": "a fox", "seed": bad})
        assert "-1" in str(refused.value)
