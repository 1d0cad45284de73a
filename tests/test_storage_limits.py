"""Uploads and stored images stay within their limits: ComfyUI's `/upload/image` counts against the
key's rate and its bytes budget, a full uploads store answers 507 naming its limit, and a worker whose
image store is full fails the job with that reason. A real nats-server of each test's own (so the
stores are made with the small limits), the gateway over HTTP, the simulated worker as a process."""

from __future__ import annotations

import base64
import io
import json
import random

import aiohttp
import nats
import pytest
from PIL import Image

from gateway.http.auth import new_key_entry
from gateway.settings import GatewaySettings
from imagegen import runtime
from imagegen.embedded_nats import EmbeddedNats, free_port
from schemas.jetstream import Topology, ensure_topology
from tests.helpers.real_processes import submit, wait_state


def noise_png(side: int = 150, seed: int = 0) -> bytes:
    """A PNG that does not compress: about 3 * side**2 bytes."""
    raw = random.Random(seed).randbytes(side * side * 3)
    buffer = io.BytesIO()
    Image.frombytes("RGB", (side, side), raw).save(buffer, format="PNG")
    return buffer.getvalue()


async def upload(http: aiohttp.ClientSession, url: str, secret: str, name: str, data: bytes, *, overwrite: bool = False) -> tuple[int, dict]:
    form = aiohttp.FormData()
    form.add_field("image", data, filename=name, content_type="image/png")
    form.add_field("overwrite", "true" if overwrite else "false")
    async with http.post(f"{url}/upload/image", data=form, headers={"Authorization": f"Bearer {secret}"}) as r:
        return r.status, await r.json()


async def gateway_of(broker_url: str, entries: list[dict], **settings):
    return await runtime.start_gateway(GatewaySettings(nats_url=broker_url, port=0, api_keys=json.dumps(entries), **settings))


async def test_uploads_count_against_the_keys_rate_and_its_bytes_budget(broker, http):
    slow_secret, slow = new_key_entry("two-a-minute", tiers=["normal"], rate_per_minute=2, max_concurrent=4)
    small_secret, small = new_key_entry("small-budget", tiers=["normal"], rate_per_minute=100, max_concurrent=4)
    picture = noise_png()  # about 67 KB
    gateway = await gateway_of(broker.url, [slow, small], upload_bytes_per_key=100_000)
    url = f"http://127.0.0.1:{gateway.port}"
    try:
        answers = [await upload(http, url, slow_secret, f"r{i}.png", noise_png(40, seed=i)) for i in range(3)]
        assert [status for status, _ in answers] == [200, 200, 429], answers
        assert "rate limit of 2 requests per minute" in answers[2][1]["error"]["message"]

        first = await upload(http, url, small_secret, "a.png", picture)
        assert first[0] == 200, first
        second = await upload(http, url, small_secret, "b.png", picture)
        assert second[0] == 413, second
        message = second[1]["error"]["message"]
        assert "limit of 100000 bytes" in message and "--upload-bytes-per-key" in message
        replaced = await upload(http, url, small_secret, "a.png", noise_png(seed=1), overwrite=True)
        assert replaced[0] == 200, replaced  # the same name replaces its bytes, it does not add to them
    finally:
        await gateway.stop()


async def test_a_full_uploads_store_answers_507_naming_its_limit(broker, http):
    secret, entry = new_key_entry("uploader", tiers=["normal"], rate_per_minute=100, max_concurrent=4)
    gateway = await gateway_of(broker.url, [entry], topology=Topology(uploads_max_bytes=200_000))
    url = f"http://127.0.0.1:{gateway.port}"
    try:
        answers = [await upload(http, url, secret, f"u{i}.png", noise_png(seed=i)) for i in range(5)]
        statuses = [status for status, _ in answers]
        assert statuses[0] == 200 and 507 in statuses, statuses
        refused = statuses.index(507)
        assert set(statuses[refused:]) == {507}, statuses
        message = answers[refused][1]["error"]["message"]
        assert "imagegen-uploads" in message and "200000 bytes" in message and "--uploads-max-bytes" in message

        # A submit with an init image finds the store full too, and says so in its API's own shape.
        init = base64.b64encode(noise_png(300, seed=9)).decode()  # about 270 KB as stored: more than the store holds
        body = {"init_images": [init], "prompt": "a full store", "steps": 2, "width": 320, "height": 320}
        headers = {"Authorization": f"Bearer {secret}"}
        async with http.post(f"{url}/sdapi/v1/img2img", json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=30)) as r:
            assert r.status == 507, await r.text()
            assert "imagegen-uploads" in (await r.json())["detail"]
    finally:
        await gateway.stop()


async def test_a_worker_whose_image_store_is_full_fails_the_job_with_the_reason(broker, parts, http):
    limit = 4096
    gateway = await runtime.start_gateway(
        GatewaySettings(nats_url=broker.url, port=0, topology=Topology(images_max_bytes=limit))
    )
    url = f"http://127.0.0.1:{gateway.port}"
    try:
        await parts.worker(broker.url, "--images-max-bytes", str(limit), "--sim-step-s", "0.01", name="full-worker")
        body = {"prompt": "too big to keep", "width": 1024, "height": 1024, "steps": 2, "format": "JPEG", "quality": 100, "seed": 1}
        job_id = await submit(http, url, body)
        failed = await wait_state(http, url, job_id, {"done", "failed"}, timeout=60)
        assert failed["state"] == "failed", failed
        assert "imagegen-images" in failed["error"] and f"{limit} bytes" in failed["error"] and "--images-max-bytes" in failed["error"]
    finally:
        await gateway.stop()


@pytest.mark.processes  # starts a nats-server of its own
async def test_a_server_without_storage_for_the_sizes_stops_the_start_naming_the_flags(tmp_path):
    """On one nats-server the buckets' max_bytes are reserved from its JetStream storage: a server with
    1 GB of it cannot hold the defaults, and the process says which flags to lower."""
    conf = tmp_path / "small.conf"
    conf.write_text("jetstream { max_file_store: 1GB }\n")
    server = EmbeddedNats(store_dir=tmp_path / "nats", port=free_port(), extra_args=["-c", str(conf)]).start()
    try:
        nc = await nats.connect(server.url)
        try:
            with pytest.raises(RuntimeError, match=r"could not be made with max_bytes=.*lower the --\*-max-bytes flags"):
                await ensure_topology(nc.jetstream(), Topology())
        finally:
            await nc.close()
    finally:
        server.stop()
