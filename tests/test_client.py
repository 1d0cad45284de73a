"""The Python client and `imagegen generate` against the real gateway, and the client straight over
NATS, with the tiny-sdxl worker of the session."""

from __future__ import annotations

import asyncio
import io
import json
import re
import sys

import aiohttp
import nats
import pytest
from aiohttp import web
from nats.aio.client import Client as NATS
from PIL import Image

from gateway.http.auth import new_key_entry
from gateway.settings import GatewaySettings
from imagegen import runtime
from imagegen.client import AsyncClient, Client, ImagegenError, JobCancelled, Progress
from imagegen.embedded_nats import free_port
from schemas import JobEvent, decode, names
from tests.helpers.service import collect_events


def steps_seen(progress: list[Progress]) -> list[int]:
    return [p.step for p in progress if p.type == "progress"]


async def test_async_client_over_http_reports_every_step(service):
    progress: list[Progress] = []
    async with AsyncClient(url=service.url) as client:
        image = await client.generate("a harbour", width=64, height=96, steps=3, format="png", on_progress=progress.append)
    assert image.size == (64, 96) and image.format == "PNG"
    assert progress[0].type == "queued" and progress[0].position is not None
    assert steps_seen(progress) == [1, 2, 3] and {p.total for p in progress if p.type == "progress"} == {3}


async def test_sync_client_in_a_thread(service):
    progress: list[Progress] = []

    def use_it() -> tuple[Image.Image, dict, Image.Image]:
        with Client(service.url) as client:
            image = client.generate("a bridge", width=64, height=64, steps=2, seed=99, on_progress=progress.append)
            job_id = client.submit("a bridge", width=64, height=64, steps=2, seed=99, format="png")
            final = client.wait(job_id)
            return image, final, client.image(job_id)

    image, final, again = await asyncio.to_thread(use_it)
    assert image.size == (64, 64) and steps_seen(progress) == [1, 2]
    assert final["state"] == "done" and final["seed"] == 99
    assert again.format == "PNG" and again.convert("RGB").size == (64, 64)


@pytest.fixture
async def proxy_without_websockets(service):
    """A reverse proxy in front of the gateway that refuses WebSocket upgrades, as some do."""
    async with aiohttp.ClientSession() as upstream:

        async def forward(request: web.Request) -> web.Response:
            if request.path.endswith("/ws"):
                return web.json_response({"error": "no websockets here"}, status=404)
            async with upstream.request(request.method, f"{service.url}{request.rel_url}", data=await request.read(),
                                        headers={"Content-Type": request.content_type}) as r:
                return web.Response(body=await r.read(), status=r.status, content_type=r.content_type)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", forward)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        await runner.cleanup()


async def test_polling_when_the_websocket_is_refused(proxy_without_websockets):
    progress: list[Progress] = []
    async with AsyncClient(url=proxy_without_websockets, poll_s=0.05) as client:
        job_id = await client.submit("polled", width=64, height=64, steps=4)
        final = await client.wait(job_id, on_progress=progress.append, timeout=60)
        image = await client.image(job_id)
    steps = steps_seen(progress)
    assert final["state"] == "done" and image.size == (64, 64)
    assert steps == sorted(set(steps)) and set(steps) <= {1, 2, 3, 4}


async def test_errors_name_the_problem(service):
    async with AsyncClient(url=service.url) as client:
        with pytest.raises(ImagegenError) as caught:
            await client.submit("odd", width=65, height=64)
        assert caught.value.status == 400 and caught.value.field == "width" and "multiple of 8" in str(caught.value)
        with pytest.raises(ImagegenError) as caught:
            await client.status("no-such-job-1")
        assert caught.value.status == 404
    async with AsyncClient(nats=service.nats_url) as client:
        with pytest.raises(ImagegenError) as caught:
            await client.submit("odd", width=64, height=65)
        assert caught.value.field == "height"
        with pytest.raises(ImagegenError) as caught:
            await client.status("no-such-job-1")
        assert "unknown job" in str(caught.value)
    async with AsyncClient(url="http://127.0.0.1:9") as client:
        with pytest.raises(ImagegenError, match="cannot reach the gateway"):
            await client.status("any-job-id-1")


async def test_a_nats_address_that_does_not_answer_is_reported_not_waited_for():
    """A service waits for its broker; a client whose user gave a wrong address says so after a few tries."""
    port = free_port()
    async with AsyncClient(nats=f"nats://127.0.0.1:{port}") as client:
        with pytest.raises(ImagegenError, match=rf"cannot reach NATS at nats://127.0.0.1:{port}: no answer after 3 tries \(last: .*Connect call failed"):
            await client.status("any-job-id-1")


async def test_api_key_is_sent_as_bearer(service):
    secret, entry = new_key_entry("client-test", tiers=["normal"], rate_per_minute=100, max_concurrent=10)
    gateway = await runtime.start_gateway(GatewaySettings(nats_url=service.nats_url, port=0, api_keys=json.dumps([entry])))
    url = f"http://127.0.0.1:{gateway.port}"
    try:
        async with AsyncClient(url=url) as anonymous:
            with pytest.raises(ImagegenError) as caught:
                await anonymous.submit("no key", width=64, height=64, steps=2)
            assert caught.value.status == 401
        async with AsyncClient(url=url, api_key=secret) as client:
            image = await client.generate("with a key", width=64, height=64, steps=2)
        assert image.size == (64, 64)
    finally:
        await gateway.stop()


async def test_async_client_over_nats(service):
    progress: list[Progress] = []
    async with AsyncClient(nats=service.nats_url) as client:
        job_id = await client.submit("straight over nats", width=64, height=64, steps=3, seed=7, format="PNG")
        assert (await client.status(job_id))["state"] in ("queued", "running", "done")
        final = await client.wait(job_id, on_progress=progress.append, timeout=60)
        image = await client.image(job_id)
    assert final["state"] == "done" and final["seed"] == 7
    assert image.size == (64, 64) and image.format == "PNG"
    assert steps_seen(progress) == [1, 2, 3]


@pytest.mark.parametrize("over", ["http", "nats"])
async def test_a_jobs_events_come_queued_started_progress_done(service, over, monkeypatch):
    """The `queued` event goes out before the job, so a worker's `started` cannot come before it, even
    when sending the `queued` event takes a while (an idle worker takes a job at once): the client hears
    queued, started, every step, and the stream keeps them in that order, done last."""
    publish = NATS.publish

    async def queued_late(self, subject, payload=b"", *args, **kw):
        if subject.startswith(names.events_subject("")) and decode(payload, JobEvent).type == "queued":
            await asyncio.sleep(0.5)
        return await publish(self, subject, payload, *args, **kw)

    monkeypatch.setattr(NATS, "publish", queued_late)
    where = {"url": service.url} if over == "http" else {"nats": service.nats_url}
    progress: list[Progress] = []
    async with AsyncClient(**where) as client:
        job_id = await client.submit(f"in order, {over}", width=64, height=64, steps=3, cache=False)
        await client.wait(job_id, on_progress=progress.append, timeout=60)
    monkeypatch.undo()
    assert [p.type for p in progress] == ["queued", "started", "progress", "progress", "progress"]
    nc = await nats.connect(service.nats_url)
    kinds = [e.type for e in await collect_events(nc.jetstream(), job_id) if e.type != "preview"]
    await nc.close()
    assert kinds == ["queued", "started", "progress", "progress", "progress", "done"]


async def wait_running(client: AsyncClient, job_id: str) -> None:
    async with asyncio.timeout(60):
        while (await client.status(job_id))["state"] != "running":
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("over", ["http", "nats"])
async def test_cancel_a_running_and_a_queued_job(service, over):
    where = {"url": service.url} if over == "http" else {"nats": service.nats_url}
    async with AsyncClient(**where) as client:
        running = await client.submit(f"long, {over}", width=256, height=256, steps=60)
        queued = await client.submit(f"behind it, {over}", width=64, height=64, steps=2)
        await wait_running(client, running)
        assert (await client.cancel(queued))["state"] == "cancelled"
        assert (await client.cancel(running))["state"] in ("running", "cancelled")  # stops at its next step
        for job_id in (running, queued):
            with pytest.raises(JobCancelled) as caught:
                await client.wait(job_id, timeout=60)
            assert caught.value.state == "cancelled" and caught.value.job_id == job_id
        assert (await client.status(running))["step"] < 60


async def test_generate_command_saves_the_image_and_shows_progress(service, tmp_path):
    output = tmp_path / "out.png"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "imagegen", "generate", "a prompt", "-o", str(output),
        "--url", service.url, "--width", "64", "--height", "64", "--steps", "2", "--model", "tiny-sdxl", "--tier", "high",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, stderr = await asyncio.wait_for(proc.communicate(), 120)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = stderr.decode()
    assert proc.returncode == 0, text
    image = Image.open(io.BytesIO(output.read_bytes()))
    assert image.format == "PNG" and image.size == (64, 64)
    assert "queued" in text and "2/2" in text and "ETA" in text and f"saved {output}" in text
    job_id = re.search(r"^job (\S+)$", text, re.M).group(1)
    async with aiohttp.ClientSession() as http, http.get(f"{service.url}/v1/jobs/{job_id}") as r:
        job = await r.json()
    assert job["request"]["model"] == "tiny-sdxl" and job["tier"] == "high"


async def test_generate_command_names_a_model_no_worker_serves(service, tmp_path):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "imagegen", "generate", "a prompt", "-o", str(tmp_path / "x.png"),
        "--url", service.url, "--width", "64", "--height", "64", "--model", "no-such-model",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 2 and "model" in stderr.decode() and "no-such-model" in stderr.decode()
    assert not (tmp_path / "x.png").exists()


async def test_generate_command_reports_bad_input(service, tmp_path):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "imagegen", "generate", "a prompt", "-o", str(tmp_path / "x.png"),
        "--url", service.url, "--width", "60",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 2 and "width" in stderr.decode() and "multiple of 8" in stderr.decode()
    assert not (tmp_path / "x.png").exists()
