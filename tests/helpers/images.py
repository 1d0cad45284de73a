"""Native-API reads and images the image-to-image and workflow tests share: encode a picture, queue a
job, wait for its end, read its image as pixels."""

from __future__ import annotations

import asyncio
import base64
import io

import numpy as np
from PIL import Image


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def b64(image: Image.Image, fmt: str = "PNG") -> str:
    return base64.b64encode(encoded(image, fmt)).decode("ascii")


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)


async def queue(http, url: str, body: dict) -> dict:
    async with http.post(f"{url}/v1/jobs", json=body) as r:
        assert r.status == 202, await r.text()
        return await r.json()


async def finished(http, url: str, job_id: str, *, timeout: float = 120) -> dict:
    async with asyncio.timeout(timeout):
        while True:
            async with http.get(f"{url}/v1/jobs/{job_id}") as r:
                job = await r.json()
            if job["state"] not in ("queued", "running"):
                return job
            await asyncio.sleep(0.05)


async def image_of(http, url: str, job_id: str) -> bytes:
    async with http.get(f"{url}/v1/jobs/{job_id}/image") as r:
        assert r.status == 200, await r.text()
        return await r.read()


async def generated(http, url: str, body: dict) -> tuple[dict, np.ndarray]:
    job = await finished(http, url, (await queue(http, url, body))["job_id"])
    assert job["state"] == "done", job
    return job, pixels(await image_of(http, url, job["job_id"]))
