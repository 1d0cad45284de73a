"""ComfyUI's server API as its scripts and tools call it: a text-to-image prompt graph queued on the real
tiny-sdxl pipeline, /history and /view for its images, /queue, /interrupt, the /ws messages of its run
(on another gateway than the one it was queued through), what the server runs, and refusals in
ComfyUI's own shape."""

from __future__ import annotations

import asyncio
import copy
import io

import nats
import pytest
from PIL import Image

from gateway.settings import GatewaySettings
from imagegen import runtime
from schemas import names
from schemas.codec import encode
from schemas.events import JobEvent
from tests.helpers.service import gateway_with_keys, start_service, stop_service
from tests.helpers.comfy import (
    MALFORMED_FORMS,
    WORKFLOW,
    history_when_done,
    image_to_image,
    messages_until_idle,
    picture,
    queue_prompt,
    upload,
    workflow,
)


async def test_the_default_workflow_runs_and_history_and_view_give_its_images(service, http):
    status, queued = await queue_prompt(http, service.url, workflow(**{"5": {"batch_size": 2}}), client_id="script")
    assert status == 200, queued
    assert queued["node_errors"] == {} and isinstance(queued["number"], int)
    entry = await history_when_done(http, service.url, queued["prompt_id"], path="/api/history")  # /api/... as well
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
    assert entry["status"]["messages"][-1][0] == "execution_success"
    assert entry["prompt"][1] == queued["prompt_id"] and entry["prompt"][2]["9"]["class_type"] == "SaveImage"
    images = entry["outputs"]["9"]["images"]
    assert len(images) == 2 and all(i["type"] == "output" and i["subfolder"] == "" for i in images)
    for image in images:
        async with http.get(f"{service.url}/view", params={"filename": image["filename"], "subfolder": "", "type": "output"}) as r:
            assert r.status == 200 and r.content_type == "image/png"
            assert Image.open(io.BytesIO(await r.read())).size == (64, 64)
    job_id = images[1]["filename"].removesuffix(".png")
    async with http.get(f"{service.url}/v1/jobs/{job_id}") as r:
        job = await r.json()
    asked = job["request"]
    assert asked["prompt"] == "a lighthouse at dusk" and asked["negative_prompt"] == "text, watermark"
    assert asked["scheduler"] == "euler" and asked["guidance"] == 8.0 and asked["steps"] == 2 and job["seed"] == 6
    assert asked["model"] == "tiny-sdxl"
    async with http.get(f"{service.url}/history", params={"max_items": "1"}) as r:
        assert list(await r.json()) == [queued["prompt_id"]]


async def test_the_same_prompt_id_queues_once(service, http):
    graph = workflow(**{"3": {"seed": 77}})
    first = await queue_prompt(http, service.url, graph, prompt_id="my-own-id-1")
    again = await queue_prompt(http, service.url, graph, prompt_id="my-own-id-1")
    assert first[0] == again[0] == 200 and first[1]["prompt_id"] == again[1]["prompt_id"] == "my-own-id-1"
    assert first[1]["number"] == again[1]["number"]
    entry = await history_when_done(http, service.url, "my-own-id-1")
    assert len(entry["outputs"]["9"]["images"]) == 1
    status, refused = await queue_prompt(http, service.url, workflow(**{"3": {"seed": 78}}), prompt_id="my-own-id-1")
    assert status == 400 and "prompt_id was sent before with another prompt" in refused["error"]["message"]


def without(node: str) -> dict:
    graph = copy.deepcopy(WORKFLOW)
    del graph[node]
    return graph


def with_lora(strength_clip: float = 0.5, *, clip_through_lora: bool = True, name: str = "style") -> dict:
    graph = workflow(**{"3": {"model": ["10", 0]}})
    graph["10"] = {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "clip": ["4", 1], "lora_name": f"{name}.safetensors",
                                                            "strength_model": 0.5, "strength_clip": strength_clip}}
    if clip_through_lora:
        graph["6"]["inputs"]["clip"] = graph["7"]["inputs"]["clip"] = ["10", 1]
    return graph


@pytest.mark.parametrize(
    ("graph", "kind", "node", "input_name", "words"),
    [
        ({**WORKFLOW, "10": {"class_type": "UpscaleModelLoader", "inputs": {}}}, "invalid_prompt", None, None, "UpscaleModelLoader does not exist"),
        ({"1": {"inputs": {}}}, "invalid_prompt", None, None, "missing the class_type"),
        (without("9"), "prompt_no_outputs", None, None, "Prompt has no outputs"),
        ([1, 2], "invalid_prompt", None, None, "not a graph of nodes"),
        (workflow(**{"3": {"sampler_name": "lcm"}}), "prompt_outputs_failed_validation", "3", "sampler_name", "'lcm' not in"),
        (workflow(**{"3": {"scheduler": "exponential"}}), "prompt_outputs_failed_validation", "3", "scheduler", "with euler not in ['normal']"),
        (workflow(**{"3": {"denoise": 0.6}}), "prompt_outputs_failed_validation", "3", "denoise", "needs an image to start from"),
        (workflow(**{"3": {"steps": "many"}}), "prompt_outputs_failed_validation", "3", "steps", "must be an integer"),
        (workflow(**{"3": {"steps": "2"}}), "prompt_outputs_failed_validation", "3", "steps", "must be an integer here, got '2'"),
        (workflow(**{"3": {"steps": True}}), "prompt_outputs_failed_validation", "3", "steps", "must be an integer here, got True"),
        (workflow(**{"3": {"cfg": "7"}}), "prompt_outputs_failed_validation", "3", "cfg", "must be a number here"),
        (workflow(**{"3": {"steps": 500}}), "prompt_outputs_failed_validation", "3", "steps", "between 1 and"),
        (workflow(**{"3": {"latent_image": ["6", 0]}}), "prompt_outputs_failed_validation", "3", "latent_image", "EmptyLatentImage"),
        (workflow(**{"4": {"ckpt_name": "sd_xl_turbo.safetensors"}}), "prompt_outputs_failed_validation", "4", "ckpt_name", "not in ['tiny-sdxl']"),
        (workflow(**{"5": {"width": 100}}), "prompt_outputs_failed_validation", "5", "width", "multiple of 8"),
        (workflow(**{"5": {"batch_size": 99}}), "prompt_outputs_failed_validation", "5", "batch_size", "between 1 and 8, got 99"),
        (workflow(**{"6": {"text": None}}), "prompt_outputs_failed_validation", "6", "text", "Required input is missing"),
        (workflow(**{"8": {"vae": ["4", 1]}}), "prompt_outputs_failed_validation", "8", "vae", "output 2 of a CheckpointLoaderSimple"),
        (with_lora(strength_clip=0.8), "prompt_outputs_failed_validation", "10", "strength_clip", "strength_model must equal strength_clip"),
        (with_lora(clip_through_lora=False), "prompt_outputs_failed_validation", "6", "clip", "same checkpoint and LoraLoader"),
        (with_lora(0.5), "prompt_outputs_failed_validation", "10", "lora_name", "no adapter 'style'"),
    ],
)
async def test_prompts_it_cannot_run_are_refused_in_comfyuis_shape(service, http, graph, kind, node, input_name, words):
    status, answer = await queue_prompt(http, service.url, graph)
    assert status == 400, answer
    assert answer["error"]["type"] == kind
    if node is None:
        assert words in answer["error"]["message"] + answer["error"]["details"] and answer["node_errors"] == {}
        return
    problem = answer["node_errors"][node]
    assert problem["class_type"] == graph[node]["class_type"] and problem["dependent_outputs"] == ["9"]
    [error] = problem["errors"]
    assert error["extra_info"]["input_name"] == input_name and words in error["message"], error


async def test_an_uploaded_image_is_loaded_for_image_to_image(service, http):
    status, first = await upload(http, service.url, picture(96, 64), "garden.png")
    assert status == 200 and first == {"name": "garden.png", "subfolder": "", "type": "input"}
    status, second = await upload(http, service.url, picture(96, 64, (0, 90, 0)), "garden.png")
    assert status == 200 and second["name"] == "garden (1).png"  # the name was kept already
    status, again = await upload(http, service.url, picture(96, 64), "garden.png", overwrite="true")
    assert status == 200 and again["name"] == "garden.png"
    status, queued = await queue_prompt(http, service.url, image_to_image("garden (1).png", denoise=0.5))
    assert status == 200, queued
    entry = await history_when_done(http, service.url, queued["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]
    [image] = entry["outputs"]["9"]["images"]
    async with http.get(f"{service.url}/view", params={"filename": image["filename"]}) as r:
        assert Image.open(io.BytesIO(await r.read())).size == (96, 64)  # the image's own size
    async with http.get(f"{service.url}/v1/jobs/{image['filename'].removesuffix('.png')}") as r:
        job = await r.json()
    assert job["request"]["strength"] == 0.5 and job["init_image"]["width"] == 96


def inpainting(name: str) -> dict:
    """LoadImage -> VAEEncode -> SetLatentNoiseMask with the LoadImage's mask (its transparent part)."""
    graph = image_to_image(name, denoise=1.0)
    graph["12"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["11", 0], "mask": ["10", 1]}}
    graph["3"]["inputs"]["latent_image"] = ["12", 0]
    return graph


def with_hole(width: int, height: int, box: tuple[int, int, int, int]) -> bytes:
    """Opaque red, transparent in `box`: ComfyUI's LoadImage reads the transparent part as the mask."""
    image = Image.new("RGBA", (width, height), (200, 60, 30, 255))
    image.paste((0, 0, 0, 0), box)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


async def test_the_transparent_part_of_a_loaded_image_is_inpainted(service, http):
    status, sent = await upload(http, service.url, with_hole(64, 64, (16, 16, 48, 48)), "holes.png", overwrite="true")
    assert status == 200, sent
    status, queued = await queue_prompt(http, service.url, inpainting(sent["name"]))
    assert status == 200, queued
    entry = await history_when_done(http, service.url, queued["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]
    [image] = entry["outputs"]["9"]["images"]
    async with http.get(f"{service.url}/view", params={"filename": image["filename"]}) as r:
        made = Image.open(io.BytesIO(await r.read())).convert("RGB")
    outside = [(x, y) for x in range(64) for y in range(64) if not (16 <= x < 48 and 16 <= y < 48)]
    assert all(made.getpixel(xy) == (200, 60, 30) for xy in outside)  # kept where the image was opaque
    inside = [made.getpixel((x, y)) for x in range(16, 48) for y in range(16, 48)]
    assert sum(p != (0, 0, 0) for p in inside) > len(inside) // 2  # painted where it was transparent
    async with http.get(f"{service.url}/v1/jobs/{image['filename'].removesuffix('.png')}") as r:
        job = await r.json()
    assert job["mask_image"]["width"] == 64 and job["request"]["strength"] == 1.0


@pytest.mark.parametrize(
    ("graph", "node", "input_name", "words"),
    [
        (inpainting("garden.png"), "12", "mask", "the image has no transparency"),
        (image_to_image("never-sent.png"), "10", "image", "no image 'never-sent.png' was uploaded"),
        (image_to_image("../etc/passwd"), "10", "image", "not an uploaded image's name"),
        (image_to_image("garden.png", denoise=0), "3", "denoise", "between 0.01 and 1"),
    ],
)
async def test_image_to_image_refusals(service, http, graph, node, input_name, words):
    await upload(http, service.url, picture(64, 64), "garden.png", overwrite="true")
    status, answer = await queue_prompt(http, service.url, graph)
    assert status == 400, answer
    [error] = answer["node_errors"][node]["errors"]
    assert error["extra_info"]["input_name"] == input_name and words in error["message"], error


async def test_an_upload_that_is_no_image_is_refused(service, http):
    status, answer = await upload(http, service.url, b"not a picture", "notes.png")
    assert status == 400 and "not an image" in answer["error"]["message"] + answer["error"]["details"]
    status, answer = await upload(http, service.url, picture(8, 8), "a/b/../x?.png")
    assert status == 400 and "file name" in answer["error"]["message"]
    async with http.post(f"{service.url}/upload/image", data=b"garbage", headers={"Content-Type": "multipart/form-data; boundary=zz"}) as r:
        assert r.status == 400 and "multipart form" in (await r.json())["error"]["message"]


@pytest.mark.parametrize("body", MALFORMED_FORMS.values(), ids=MALFORMED_FORMS.keys())
async def test_a_malformed_multipart_upload_is_a_400_not_a_crash(service, http, caplog, body):
    async with http.post(f"{service.url}/upload/image", data=body, headers={"Content-Type": "multipart/form-data; boundary=B"}) as r:
        assert r.status == 400, await r.text()
        error = (await r.json())["error"]
    assert error["type"] == "invalid_request" and error["message"], error
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    status, _ = await upload(http, service.url, picture(8, 8), "after.png", overwrite="true")
    assert status == 200


async def test_a_body_without_a_prompt_is_refused(service, http):
    async with http.post(f"{service.url}/prompt", json={"client_id": "x"}) as r:
        assert r.status == 400 and (await r.json())["error"]["type"] == "no_prompt"
    async with http.post(f"{service.url}/prompt", data=b"{not json", headers={"Content-Type": "application/json"}) as r:
        assert r.status == 400 and "not JSON" in (await r.json())["error"]["details"]
    async with http.post(f"{service.url}/prompt", json={"prompt": WORKFLOW, "prompt_id": "no spaces please"}) as r:
        assert r.status == 400 and "prompt_id" in (await r.json())["error"]["message"]


async def test_while_the_broker_is_away_its_answers_are_503_with_retry_after(service, http, monkeypatch):
    """A prompt whose record cannot be kept, /view of an image or an upload, and /queue's clear, while the
    broker is away: 503 in ComfyUI's shape with Retry-After, as every 503 of the gateway."""
    from gateway.core.caller import SERVICE
    from gateway.core.problems import BrokerAway

    jobs = service.gateway.runner.app[SERVICE]

    async def away(*args, **kw):
        raise BrokerAway("not connected")

    for target, name in ((jobs.comfy, "add"), (jobs, "image"), (jobs.upload_reader, "info"), (jobs, "cancel_each")):
        monkeypatch.setattr(target, name, away)
    message = "the job broker (NATS) is unavailable; retry shortly"
    calls = [
        (http.post(f"{service.url}/prompt", json={"prompt": workflow(), "prompt_id": "broker-away"}), f"{message} with the same prompt_id"),
        (http.get(f"{service.url}/view", params={"filename": "job.png"}), message),
        (http.get(f"{service.url}/view", params={"filename": "cat.png", "type": "input"}), message),
        (http.post(f"{service.url}/queue", json={"clear": True}), message),
    ]
    for call, said in calls:
        async with call as r:
            body = await r.json()
            assert (r.status, r.headers.get("Retry-After")) == (503, "2"), body
            assert body["error"]["type"] == "unavailable" and body["error"]["message"] == said


async def test_what_it_runs(service, http):
    async with http.get(f"{service.url}/object_info") as r:
        info = await r.json()
    assert set(info) >= {"CheckpointLoaderSimple", "KSampler", "SaveImage", "LoraLoader"}
    assert info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"] == [["tiny-sdxl"]]
    assert "euler" in info["KSampler"]["input"]["required"]["sampler_name"][0]
    async with http.get(f"{service.url}/object_info/KSampler") as r:
        assert list(await r.json()) == ["KSampler"]
    async with http.get(f"{service.url}/models/checkpoints") as r:
        assert await r.json() == ["tiny-sdxl"]
    async with http.get(f"{service.url}/models/loras") as r:
        assert await r.json() == []
    async with http.get(f"{service.url}/embeddings") as r:
        assert await r.json() == []
    async with http.get(f"{service.url}/system_stats") as r:
        stats = await r.json()
    assert stats["system"]["comfyui_version"].startswith("imagegen") and stats["devices"][0]["type"] == "cpu"


async def test_the_socket_tells_a_prompts_run_on_another_gateway(broker, data_dir, http):
    """Queued through one gateway, followed on another's /ws: ComfyUI's messages in ComfyUI's order, the
    progress of both images of the batch, the preview a worker sends as a binary frame."""
    own = await start_service(broker.url, data_dir, model="simulated", refiner=None, sim_step_s=0.03)
    other = await runtime.start_gateway(GatewaySettings(nats_url=broker.url, port=0))
    nc = await nats.connect(broker.url)
    try:
        async with http.ws_connect(f"http://127.0.0.1:{other.port}/ws?clientId=tool-1") as ws:
            hello = await ws.receive_json(timeout=10)
            assert hello["type"] == "status" and hello["data"]["sid"] == "tool-1"
            graph = workflow(**{"4": {"ckpt_name": "simulated"}, "3": {"steps": 10}, "5": {"batch_size": 2}})
            status, queued = await queue_prompt(http, own.url, graph, client_id="tool-1", extra_data={"preview_method": "auto"})
            assert status == 200, queued
            prompt_id = queued["prompt_id"]
            first_progress = asyncio.Event()

            async def send_preview() -> None:  # as a worker does every few steps (the simulated engine makes no latents)
                await first_progress.wait()
                async with http.get(f"{own.url}/history") as r:
                    assert prompt_id not in await r.json()  # still running: not in the history yet
                buffer = io.BytesIO()
                Image.new("RGB", (8, 8), (0, 0, 255)).save(buffer, format="JPEG")
                async with http.get(f"{own.url}/queue") as r:
                    running = (await r.json())["queue_running"]
                assert running and running[0][1] == prompt_id
                async with http.get(f"{own.url}/v1/jobs", params={"state": "running"}) as r:
                    job_id = (await r.json())[0]["job_id"]
                event = JobEvent(type="preview", job_id=job_id, step=3, total=10, preview=buffer.getvalue())
                await nc.publish(names.events_subject(job_id), encode(event))
                return buffer.getvalue()

            preview = asyncio.ensure_future(send_preview())
            texts, frames = await messages_until_idle(ws, prompt_id, lambda body: body["type"] == "progress" and first_progress.set())
            jpeg = await preview
        kinds = [m["type"] for m in texts]
        assert kinds[:3] == ["execution_start", "execution_cached", "executing"] and texts[2]["data"]["node"] == "3"
        progress = [m["data"] for m in texts if m["type"] == "progress"]
        assert progress and all(p["max"] == 20 and p["node"] == "3" and p["prompt_id"] == prompt_id for p in progress)
        assert [p["value"] for p in progress] == sorted(p["value"] for p in progress) and progress[-1]["value"] == 20
        executed = next(m["data"] for m in texts if m["type"] == "executed")
        assert executed["node"] == "9" and len(executed["output"]["images"]) == 2
        assert kinds[-3:] == ["executed", "execution_success", "executing"]
        assert frames and frames[0][:8] == b"\x00\x00\x00\x01\x00\x00\x00\x01" and frames[0][8:] == jpeg
    finally:
        await nc.close()
        await other.stop()
        await stop_service(own)


async def test_queue_delete_and_interrupt_stop_prompts(broker, data_dir, http):
    own = await start_service(broker.url, data_dir, model="simulated", refiner=None, sim_step_s=0.05)
    try:
        async with http.ws_connect(f"{own.url}/ws?clientId=tool-2") as ws:
            await ws.receive_json(timeout=10)
            graph = workflow(**{"4": {"ckpt_name": "simulated"}, "3": {"steps": 40}})
            _, running = await queue_prompt(http, own.url, graph, client_id="tool-2")
            _, pending = await queue_prompt(http, own.url, workflow(**{"4": {"ckpt_name": "simulated"}, "3": {"steps": 40, "seed": 6}}))
            async with asyncio.timeout(30):
                while True:
                    async with http.get(f"{own.url}/queue") as r:
                        queue = await r.json()
                    if [e[1] for e in queue["queue_running"]] == [running["prompt_id"]]:
                        break
                    await asyncio.sleep(0.05)
            assert [e[1] for e in queue["queue_pending"]] == [pending["prompt_id"]]
            async with http.get(f"{own.url}/prompt") as r:
                assert await r.json() == {"exec_info": {"queue_remaining": 2}}
            async with http.post(f"{own.url}/queue", json={"delete": [pending["prompt_id"]]}) as r:
                assert r.status == 200
            async with http.post(f"{own.url}/interrupt") as r:
                assert r.status == 200
            texts, _ = await messages_until_idle(ws, running["prompt_id"])
        assert "execution_interrupted" in [m["type"] for m in texts]
        for prompt_id in (running["prompt_id"], pending["prompt_id"]):
            entry = await history_when_done(http, own.url, prompt_id)
            assert entry["status"]["status_str"] == "error" and entry["status"]["messages"][-1][0] == "execution_interrupted"
            assert entry["outputs"] == {}
        async with http.get(f"{own.url}/queue") as r:
            assert await r.json() == {"queue_running": [], "queue_pending": []}
    finally:
        await stop_service(own)


async def test_with_api_keys_a_prompt_is_its_keys(service, http):
    async with gateway_with_keys(service.nats_url, studio=["normal"], press=["normal"]) as (url, secrets):
        mine_secret, other_secret = secrets["studio"], secrets["press"]
        async with http.post(f"{url}/prompt", json={"prompt": WORKFLOW}) as r:
            assert r.status == 401
        async with http.post(f"{url}/prompt", json={"prompt": workflow(**{"3": {"seed": 91}})}, headers={"Authorization": f"Bearer {mine_secret}"}) as r:
            assert r.status == 200
            prompt_id = (await r.json())["prompt_id"]
        async with asyncio.timeout(60):
            while True:
                async with http.get(f"{url}/history/{prompt_id}", headers={"Authorization": f"Bearer {mine_secret}"}) as r:
                    if found := await r.json():
                        break
                await asyncio.sleep(0.05)
        filename = found[prompt_id]["outputs"]["9"]["images"][0]["filename"]
        async with http.get(f"{url}/history/{prompt_id}", headers={"Authorization": f"Bearer {other_secret}"}) as r:
            assert await r.json() == {}
        async with http.get(f"{url}/view", params={"filename": filename}, headers={"Authorization": f"Bearer {other_secret}"}) as r:
            assert r.status == 404
        async with http.get(f"{url}/view", params={"filename": filename}, headers={"Authorization": f"Bearer {mine_secret}"}) as r:
            assert r.status == 200
        # Prompt ids are each key's own: the same id from another key is another prompt, and tells nothing.
        body = {"prompt": workflow(**{"3": {"seed": 92}}), "prompt_id": prompt_id}
        async with http.post(f"{url}/prompt", json=body, headers={"Authorization": f"Bearer {other_secret}"}) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["prompt_id"] == prompt_id
        async with asyncio.timeout(60):
            while True:
                async with http.get(f"{url}/history/{prompt_id}", headers={"Authorization": f"Bearer {other_secret}"}) as r:
                    if theirs := await r.json():
                        break
                await asyncio.sleep(0.05)
        their_file = theirs[prompt_id]["outputs"]["9"]["images"][0]["filename"]
        assert their_file != filename
        async with http.get(f"{url}/history/{prompt_id}", headers={"Authorization": f"Bearer {mine_secret}"}) as r:
            assert (await r.json())[prompt_id]["outputs"]["9"]["images"][0]["filename"] == filename
        async with http.get(f"{url}/view", params={"filename": their_file}, headers={"Authorization": f"Bearer {mine_secret}"}) as r:
            assert r.status == 404
        async with http.get(f"{url}/history", headers={"Authorization": f"Bearer {other_secret}"}) as r:
            assert [entry["outputs"]["9"]["images"][0]["filename"] for entry in (await r.json()).values()] == [their_file]
