"""ComfyUI's side as the tests drive it over aiohttp: the default graph and its variants, queueing,
/history, uploads, the /ws messages of a run, and multipart bodies no form reader may crash on."""

from __future__ import annotations

import asyncio
import copy
import io
import json

import aiohttp
from PIL import Image


WORKFLOW = {
    "3": {"class_type": "KSampler", "inputs": {"seed": 5, "steps": 2, "cfg": 8, "sampler_name": "euler", "scheduler": "normal",
                                               "denoise": 1, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
                                               "latent_image": ["5", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sdxl.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse at dusk", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "text, watermark", "clip": ["4", 1]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
}


def workflow(**inputs: dict) -> dict:
    """The default workflow with some nodes' inputs changed: workflow(**{"3": {"steps": 4}})."""
    graph = copy.deepcopy(WORKFLOW)
    for node, changes in inputs.items():
        graph[node]["inputs"].update(changes)
    return graph


async def queue_prompt(http, url: str, graph: dict, **extra) -> tuple[int, dict]:
    async with http.post(f"{url}/prompt", json={"prompt": graph, **extra}) as r:
        return r.status, await r.json()


async def history_when_done(http, url: str, prompt_id: str, *, path: str = "/history") -> dict:
    async with asyncio.timeout(60):
        while True:
            async with http.get(f"{url}{path}/{prompt_id}") as r:
                assert r.status == 200
                found = await r.json()
            if found:
                return found[prompt_id]
            await asyncio.sleep(0.05)


def picture(width: int, height: int, colour=(200, 60, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


async def upload(http, url: str, data: bytes, name: str, **fields) -> tuple[int, dict]:
    form = aiohttp.FormData()
    form.add_field("image", data, filename=name, content_type="image/png")
    for key, value in fields.items():
        form.add_field(key, value)
    async with http.post(f"{url}/upload/image", data=form) as r:
        return r.status, await r.json()


def image_to_image(name: str, denoise: float = 0.5) -> dict:
    graph = workflow(**{"3": {"latent_image": ["11", 0], "denoise": denoise}})
    del graph["5"]
    graph["10"] = {"class_type": "LoadImage", "inputs": {"image": name}}
    graph["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    return graph


def form_part(headers: bytes, data: bytes) -> bytes:
    return b"--B\r\n" + headers + b"\r\n\r\n" + data + b"\r\n--B--\r\n"


MALFORMED_FORMS = {
    "nul-in-filename": form_part(b'Content-Disposition: form-data; name="image"; filename="x.png\0.txt"\r\nContent-Type: image/png', b"png"),
    "nul-in-name": form_part(b'Content-Disposition: form-data; name="ima\0ge"; filename="x.png"', b"png"),
    "control-byte-header": form_part(b'Content-Disposition: form-data; name="image"; filename="x.png"\r\nX-Odd: a\x01b', b"png"),
    "unknown-transfer-encoding": form_part(b'Content-Disposition: form-data; name="image"; filename="x.png"\r\nContent-Transfer-Encoding: rot13', b"png"),
    "unknown-charset": form_part(b'Content-Disposition: form-data; name="type"\r\nContent-Type: text/plain; charset=no-such-charset', b"input"),
    "not-utf8-field": form_part(b'Content-Disposition: form-data; name="type"\r\nContent-Type: text/plain; charset=utf-8', b"\xff\xfe"),
    "nul-in-rfc5987-filename": form_part(b"Content-Disposition: form-data; name=\"image\"; filename*=UTF-8''x.png%00.txt", b"png"),
    "truncated": b"--B\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n\r\nno end",
}
"""Multipart bodies no HTTP form reader may crash on (boundary B), by what is wrong with them."""


async def messages_until_idle(ws, prompt_id: str, on_message=None) -> tuple[list[dict], list[bytes]]:
    """The socket's JSON messages and binary frames until the prompt's `executing` with node null;
    `on_message(body)` sees each JSON message as it comes."""
    texts: list[dict] = []
    frames: list[bytes] = []
    async with asyncio.timeout(60):
        async for message in ws:
            if message.type is aiohttp.WSMsgType.BINARY:
                frames.append(message.data)
                continue
            body = json.loads(message.data)
            texts.append(body)
            if on_message is not None:
                on_message(body)
            if body["type"] == "executing" and body["data"]["node"] is None and body["data"]["prompt_id"] == prompt_id:
                break
    return texts, frames
