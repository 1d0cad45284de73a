"""ComfyUI's clients against the real gateway and a tiny-sdxl worker: ComfyUI's two websocket script
flows (`tests.helpers.comfy_flows`: images through /history, and through the socket with SaveImageWebsocket),
previews only when asked for, uploads kept in subfolders and LoadImage's spellings of them, and
/history's times those of the run, not of the read."""

from __future__ import annotations

import asyncio
import io
import struct

import aiohttp
import pytest
from PIL import Image

from gateway.settings import GatewaySettings
from imagegen import runtime
from tests.helpers import comfy_flows
from tests.helpers.comfy import history_when_done, image_to_image, messages_until_idle, picture, queue_prompt, upload, workflow

WAIT_S = 120.0


def server_of(url: str) -> str:
    return url.removeprefix("http://")


async def test_comfys_websocket_script_gets_its_images_through_history(service):
    prompt_id, images = await asyncio.to_thread(
        comfy_flows.images_through_history, server_of(service.url), "tiny-sdxl.safetensors", wait_s=WAIT_S
    )
    [image] = images["9"]
    assert Image.open(io.BytesIO(image)).size == (512, 512)


async def test_comfys_ws_images_script_gets_its_image_over_the_socket_and_history_keeps_none(service, http):
    prompt_id, images = await asyncio.to_thread(
        comfy_flows.images_through_socket, server_of(service.url), "tiny-sdxl.safetensors", wait_s=WAIT_S
    )
    [image] = images[comfy_flows.SOCKET_NODE]
    picture_ = Image.open(io.BytesIO(image))
    assert picture_.format == "PNG" and picture_.size == (512, 512)
    entry = await history_when_done(http, service.url, prompt_id)
    assert entry["status"]["status_str"] == "success" and entry["outputs"] == {}


async def previews_seen(http, url: str, seed: int, **extra) -> list[bytes]:
    """The binary frames a socket gets for a 6-step prompt (the worker sends a preview at step 5); a
    seed of its own, so that no cached image answers it."""
    async with http.ws_connect(f"{url}/ws?clientId=previews") as ws:
        await ws.receive_json(timeout=10)
        status, queued = await queue_prompt(http, url, workflow(**{"3": {"steps": 6, "seed": seed}}), client_id="previews", **extra)
        assert status == 200, queued
        _, frames = await messages_until_idle(ws, queued["prompt_id"])
    return frames


async def test_previews_go_out_only_when_the_prompt_or_the_server_asks(service, http):
    assert await previews_seen(http, service.url, 601) == []  # ComfyUI's default preview method: none
    asked = await previews_seen(http, service.url, 602, extra_data={"preview_method": "auto"})
    assert asked and all(frame[:8] == struct.pack(">II", 1, 1) for frame in asked)  # JPEG previews
    with_flag = await runtime.start_gateway(GatewaySettings(nats_url=service.nats_url, port=0, comfy_previews=True))
    try:
        url = f"http://127.0.0.1:{with_flag.port}"
        assert await previews_seen(http, url, 603)
        assert await previews_seen(http, url, 604, extra_data={"preview_method": "none"}) == []
    finally:
        await with_flag.stop()


async def test_uploads_keep_their_subfolder_and_load_image_finds_either_spelling(service, http):
    status, sent = await upload(http, service.url, picture(96, 64), "field.png", subfolder="shots/day one", overwrite="true")
    assert status == 200 and sent == {"name": "field.png", "subfolder": "shots/day one", "type": "input"}, sent
    status, plain = await upload(http, service.url, picture(64, 64, (0, 0, 200)), "field.png", overwrite="true")
    assert status == 200 and plain["subfolder"] == ""
    async with http.get(f"{service.url}/view", params={"filename": "field.png", "subfolder": "shots/day one", "type": "input"}) as r:
        assert r.status == 200 and await r.read() == picture(96, 64)  # ComfyUI's page shows an upload so
    for name, size in (("shots/day one/field.png", (96, 64)), ("field.png [input]", (64, 64))):
        status, queued = await queue_prompt(http, service.url, image_to_image(name))
        assert status == 200, queued
        entry = await history_when_done(http, service.url, queued["prompt_id"])
        [image] = entry["outputs"]["9"]["images"]
        async with http.get(f"{service.url}/view", params={"filename": image["filename"]}) as r:
            assert Image.open(io.BytesIO(await r.read())).size == size  # the image named, not the other


async def test_a_form_that_does_not_parse_is_refused(service, http):
    headers = {"Content-Type": "multipart/form-data; boundary=zz"}
    async with http.post(f"{service.url}/upload/image", data=b"--zz\r\ngarbage", headers=headers) as r:
        assert r.status == 400 and "multipart form" in (await r.json())["error"]["message"]


@pytest.mark.parametrize("subfolder", ["../up", "a/../../b", "/etc", "a\\b", "a\x00b", "./a"])
async def test_a_subfolder_that_would_leave_the_uploads_is_refused(service, http, subfolder):
    status, answer = await upload(http, service.url, picture(8, 8), "x.png", subfolder=subfolder)
    assert status == 400 and "subfolder" in answer["error"]["message"], answer


@pytest.mark.parametrize("name", ["../field.png", "/shots/field.png", "shots\\field.png", "shots/../field.png", "shots/./x.png"])
async def test_load_image_names_that_would_leave_the_uploads_are_refused(service, http, name):
    status, answer = await queue_prompt(http, service.url, image_to_image(name))
    assert status == 400, answer
    [error] = answer["node_errors"]["10"]["errors"]
    assert "not an uploaded image's name" in error["message"], error


async def test_history_tells_when_the_prompt_ran_not_when_it_is_read(service, http):
    status, queued = await queue_prompt(http, service.url, workflow(**{"3": {"seed": 404}}))
    assert status == 200, queued
    first = await history_when_done(http, service.url, queued["prompt_id"])
    await asyncio.sleep(0.05)
    again = await history_when_done(http, service.url, queued["prompt_id"])
    assert first["status"]["messages"] == again["status"]["messages"]
    job_id = first["outputs"]["9"]["images"][0]["filename"].removesuffix(".png")
    async with http.get(f"{service.url}/v1/jobs/{job_id}") as r:
        job = await r.json()
    ends = dict(first["status"]["messages"])
    assert ends["execution_success"]["timestamp"] == int(job["finished_at"] * 1000)
    assert ends["execution_start"]["timestamp"] == int(job["started_at"] * 1000)
