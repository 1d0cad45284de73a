"""mflux-server's documented client workflow, unchanged, against the real service with tiny-sdxl."""

from __future__ import annotations

import base64
import io

from PIL import Image

from tests.helpers.service import wait_status


async def test_generate_poll_fetch_delete(service, http):
    body = {
        "prompt": "A beautiful landscape",
        "seed": "1725311496",
        "height": 72,
        "width": 96,
        "steps": 4,
        "format": "JPEG",
        "quality": 85,
        "priority": False,
    }
    async with http.post(f"{service.url}/api/generate", json=body) as r:
        assert r.status == 200, await r.text()
        answer = await r.json()
    assert set(answer) == {"task_id", "task_length", "expected_time_seconds"}
    assert answer["task_length"] >= 1 and answer["expected_time_seconds"] > 0

    assert (await wait_status(http, service.url, answer["task_id"])) == {"status": "done"}

    params = {"task_id": answer["task_id"], "base64": "false", "delete": "true"}
    async with http.get(f"{service.url}/api/image", params=params) as r:
        assert r.status == 200
        assert r.content_type == "image/jpeg"
        image = Image.open(io.BytesIO(await r.read()))
    assert image.format == "JPEG" and image.size == (96, 72)

    async with http.get(f"{service.url}/api/status", params={"task_id": answer["task_id"]}) as r:
        assert r.status == 404  # delete=true removed it


async def test_base64_png_kept_without_delete(service, http):
    body = {"prompt": "a red cube", "seed": 7, "width": 64, "height": 64, "steps": 2, "format": "PNG"}
    async with http.post(f"{service.url}/api/generate", json=body) as r:
        task_id = (await r.json())["task_id"]
    assert (await wait_status(http, service.url, task_id))["status"] == "done"
    params = {"task_id": task_id, "base64": "true", "delete": "false"}
    async with http.get(f"{service.url}/api/image", params=params) as r:
        assert r.status == 200 and r.content_type == "text/plain"
        image = Image.open(io.BytesIO(base64.b64decode(await r.text())))
    assert image.format == "PNG" and image.size == (64, 64)
    async with http.get(f"{service.url}/api/image", params={"task_id": task_id}) as r:
        assert r.status == 200  # still there: the first fetch kept it; this one deletes it
    async with http.get(f"{service.url}/api/image", params={"task_id": task_id}) as r:
        assert r.status == 404


async def test_webp_and_sdxl_fields(service, http):
    body = {
        "prompt": "a lighthouse",
        "negative_prompt": "blurry, low quality",
        "guidance": 6.5,
        "use_refiner": True,
        "width": 64,
        "height": 64,
        "steps": 5,
        "format": "WEBP",
        "quality": 60,
    }
    async with http.post(f"{service.url}/api/generate", json=body) as r:
        assert r.status == 200, await r.text()
        task_id = (await r.json())["task_id"]
    assert (await wait_status(http, service.url, task_id))["status"] == "done"
    async with http.get(f"{service.url}/api/image", params={"task_id": task_id}) as r:
        assert r.content_type == "image/webp"
        assert Image.open(io.BytesIO(await r.read())).size == (64, 64)


async def test_same_seed_same_image_different_seed_different(service, http):
    async def image_for(seed):
        body = {"prompt": "a cat", "seed": seed, "width": 64, "height": 64, "steps": 3, "format": "PNG"}
        async with http.post(f"{service.url}/api/generate", json=body) as r:
            task_id = (await r.json())["task_id"]
        await wait_status(http, service.url, task_id)
        async with http.get(f"{service.url}/api/image", params={"task_id": task_id}) as r:
            return Image.open(io.BytesIO(await r.read())).tobytes()

    first, again, other = await image_for(11), await image_for("11"), await image_for(12)
    assert first == again
    assert first != other


async def test_tasks_cancel_clear_ls_ps_load(service, http):
    async with http.get(f"{service.url}/api/ls") as r:
        models = await r.json()
    assert "tiny-sdxl" in models and models["tiny-sdxl"]["steps"] == 4 and models["tiny-sdxl"]["refiner"] is True
    async with http.get(f"{service.url}/api/ps") as r:
        ps = await r.json()
    assert ps["model"] == "tiny-sdxl" and ps["default_steps"] == 4
    async with http.post(f"{service.url}/api/load", json={"model": "no-such-model"}) as r:
        assert r.status == 400 and "no-such-model" in (await r.json())["error"]
    async with http.post(f"{service.url}/api/load", json={"model": "tiny-sdxl"}) as r:
        assert r.status == 200

    body = {"prompt": "listed", "width": 64, "height": 64, "steps": 2}
    async with http.post(f"{service.url}/api/generate", json=body) as r:
        task_id = (await r.json())["task_id"]
    async with http.get(f"{service.url}/api/tasks") as r:
        tasks = await r.json()
    listed = [t for t in tasks if t["task_id"] == task_id]
    assert listed and listed[0]["prompt"] == "listed" and "image" not in listed[0]
    assert {"start_time", "compute_time", "end_time"} <= set(listed[0])

    async with http.get(f"{service.url}/api/cancel", params={"task_id": "nope-nope-nope"}) as r:
        assert r.status == 404
    async with http.get(f"{service.url}/api/cancel", params={"task_id": task_id}) as r:
        assert r.status == 200
    status = await wait_status(http, service.url, task_id)
    assert status["status"] in ("error", "done")  # it may have finished before the cancel arrived

    async with http.get(f"{service.url}/api/clear") as r:
        assert r.status == 200
    async with http.get(f"{service.url}/api/tasks") as r:
        assert await r.json() == []
