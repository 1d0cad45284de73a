"""Every bad input gets a 4xx JSON error that names the problem, never a 500 or a hang."""

from __future__ import annotations

import pytest

from gateway.settings import GatewaySettings

LONG = "x" * 2001


@pytest.mark.parametrize(
    "body, field",
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": LONG}, "prompt"),
        ({"prompt": "a", "negative_prompt": LONG}, "negative_prompt"),
        ({"prompt": "a", "width": 100}, "width"),
        ({"prompt": "a", "height": 1001}, "height"),
        ({"prompt": "a", "width": 4096, "height": 4096}, "width"),
        ({"prompt": "a", "width": 8}, "width"),
        ({"prompt": "a", "width": "wide"}, "width"),
        ({"prompt": "a", "steps": 0}, "steps"),
        ({"prompt": "a", "steps": 1000}, "steps"),
        ({"prompt": "a", "format": "GIF"}, "format"),
        ({"prompt": "a", "quality": 0}, "quality"),
        ({"prompt": "a", "quality": 101}, "quality"),
        ({"prompt": "a", "seed": "abc"}, "seed"),
        ({"prompt": "a", "seed": -2}, "seed"),  # -1 asks for a random seed
        ({"prompt": "a", "seed": 1.5}, "seed"),
        ({"prompt": "a", "guidance": -1}, "guidance"),
        ({"prompt": "a", "stpes": 4}, "stpes"),
        ({"prompt": "a", "tier": "urgent"}, "tier"),
        ({"prompt": 42}, "prompt"),
        ({"prompt": "a", "model": "no-such-model"}, "model"),
        ([1, 2], "body"),
    ],
)
@pytest.mark.parametrize("path", ["/api/generate", "/v1/jobs"])
async def test_bad_request_names_the_field(service, http, path, body, field):
    async with http.post(f"{service.url}{path}", json=body) as r:
        assert r.status == 400, await r.text()
        answer = await r.json()
    assert answer["field"] == field
    assert field in answer["error"] or answer["field"] == "body"


@pytest.mark.parametrize(
    "raw, fragment",
    [
        (b"", "empty body"),
        (b"{not json", "not JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[" * 100000 + b"]" * 100000, "JSON"),
    ],
)
async def test_unreadable_bodies(service, http, raw, fragment):
    async with http.post(
        f"{service.url}/api/generate", data=raw, headers={"Content-Type": "application/json"}
    ) as r:
        assert r.status == 400
        assert fragment in (await r.json())["error"]


async def test_oversized_body_is_413(service, http):
    too_large = GatewaySettings().body_limit_bytes + 1  # over room for an init image and a mask at the upload limit
    async with http.post(f"{service.url}/api/generate", data=b"x" * too_large) as r:
        assert r.status == 413
        assert "too large" in (await r.json())["error"]


@pytest.mark.parametrize("path", ["/api/status", "/api/image", "/api/cancel"])
async def test_unknown_or_missing_task_id(service, http, path):
    async with http.get(f"{service.url}{path}", params={"task_id": "doesnotexist123"}) as r:
        assert r.status == 404
        assert "doesnotexist123" in (await r.json())["error"]
    async with http.get(f"{service.url}{path}") as r:
        assert r.status == 400
        assert (await r.json())["field"] == "task_id"


async def test_unknown_job_on_native_api(service, http):
    for method, path in [("GET", "/v1/jobs/nope1234"), ("GET", "/v1/jobs/nope1234/image"), ("DELETE", "/v1/jobs/nope1234")]:
        async with http.request(method, f"{service.url}{path}") as r:
            assert r.status == 404, path


async def test_bad_boolean_query(service, http):
    async with http.get(f"{service.url}/api/image", params={"task_id": "abcdefgh", "base64": "maybe"}) as r:
        assert r.status == 400
        assert (await r.json())["field"] == "base64"


async def test_image_of_unfinished_job_is_404_and_job_survives(service, http):
    body = {"prompt": "slow", "width": 64, "height": 64, "steps": 100}
    async with http.post(f"{service.url}/api/generate", json=body) as r:
        task_id = (await r.json())["task_id"]
    async with http.get(f"{service.url}/api/image", params={"task_id": task_id}) as r:
        assert r.status == 404  # 100 steps take far longer than this round trip
        error = (await r.json())["error"]
    assert "is queued" in error or "is running" in error
    async with http.get(f"{service.url}/api/status", params={"task_id": task_id}) as s:
        assert s.status == 200 and (await s.json())["status"] == "waiting"
    async with http.get(f"{service.url}/api/cancel", params={"task_id": task_id}) as r:
        assert r.status == 200


async def test_load_without_model(service, http):
    async with http.post(f"{service.url}/api/load", json={}) as r:
        assert r.status == 400 and (await r.json())["field"] == "model"
    async with http.post(f"{service.url}/api/load", data=b"nope") as r:
        assert r.status == 400
