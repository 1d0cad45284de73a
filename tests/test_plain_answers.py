"""Answers a client can act on: /healthz says when to come back while the broker is away, a request too
malformed for HTTP is a 400 logged as one WARNING line, and DELETE of a finished job removes it with
its image. Over the real gateway, a real nats-server and the tiny-sdxl worker."""

from __future__ import annotations

import asyncio
import logging

from gateway.settings import GatewaySettings
from imagegen import runtime
from tests.helpers.real_processes import submit, wait_state

SMALL = {"prompt": "a red boat", "width": 64, "height": 64, "steps": 2}


async def test_healthz_answers_503_with_retry_after_while_the_broker_is_away(broker, http):
    gateway = await runtime.start_gateway(GatewaySettings(nats_url=broker.url, port=0))
    url = f"http://127.0.0.1:{gateway.port}"
    try:
        async with http.get(f"{url}/healthz") as r:
            assert r.status == 200 and "Retry-After" not in r.headers
        broker.process.kill()
        broker.process.wait(timeout=10)
        async with asyncio.timeout(30):
            while True:
                async with http.get(f"{url}/healthz") as r:
                    if r.status == 503:
                        assert (await r.json())["nats"] == "disconnected"
                        assert int(r.headers["Retry-After"]) >= 1
                        break
                await asyncio.sleep(0.1)
        broker.start()  # the same port and store: the gateway reconnects and is healthy again
        async with asyncio.timeout(30):
            while True:
                async with http.get(f"{url}/healthz") as r:
                    if r.status == 200:
                        break
                await asyncio.sleep(0.1)
    finally:
        await gateway.stop()


async def test_a_malformed_request_is_a_400_logged_as_one_warning_line(service, caplog):
    caplog.set_level(logging.INFO)
    port = int(service.url.rsplit(":", 1)[1])
    for raw in (b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", b"GET /\x00 HTTP/1.1\r\n\r\n",
                b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n"):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(100), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.0 400") or answer.startswith(b"HTTP/1.1 400"), answer
    server = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert [r.levelname for r in server] == ["WARNING"] * 3, [r.getMessage() for r in server]
    assert all(r.exc_info is None and "\n" not in r.getMessage() for r in server)
    assert "Invalid header token" in server[0].getMessage() and "Content-Length" in server[2].getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_delete_of_a_finished_job_removes_it_and_its_image(service, http):
    job_id = await submit(http, service.url, SMALL)
    await wait_state(http, service.url, job_id, {"done"}, timeout=60)
    async with http.delete(f"{service.url}/v1/jobs/{job_id}") as r:
        assert r.status == 200
        answer = await r.json()
    assert answer["job_id"] == job_id and answer["state"] == "done" and answer["deleted"] is True
    for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/image"):
        async with http.get(f"{service.url}{path}") as r:
            assert r.status == 404, path
    async with http.get(f"{service.url}/v1/jobs") as r:
        assert job_id not in [j["job_id"] for j in await r.json()]
    async with http.delete(f"{service.url}/v1/jobs/{job_id}") as r:
        assert r.status == 404


async def test_delete_of_a_queued_job_cancels_it_and_a_second_delete_removes_it(broker, http):
    gateway = await runtime.start_gateway(GatewaySettings(nats_url=broker.url, port=0))  # no worker: it stays queued
    url = f"http://127.0.0.1:{gateway.port}"
    try:
        job_id = await submit(http, url, SMALL)
        async with http.delete(f"{url}/v1/jobs/{job_id}") as r:
            assert r.status == 200
            answer = await r.json()
        assert answer["state"] == "cancelled" and answer["deleted"] is False
        job = await wait_state(http, url, job_id, {"cancelled"})
        assert job["job_id"] == job_id
        async with http.delete(f"{url}/v1/jobs/{job_id}") as r:
            assert r.status == 200 and (await r.json())["deleted"] is True
        async with http.get(f"{url}/v1/jobs/{job_id}") as r:
            assert r.status == 404
    finally:
        await gateway.stop()
