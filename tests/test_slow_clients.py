"""Slow and numerous clients against real gateway processes: a body that crawls gets 408, headers that
crawl get the connection closed, and one connection past the cap gets 503 with Retry-After; the gateway
answers others all along. The timeouts and the cap are set small here; counts are bounded, loopback only."""

from __future__ import annotations

import asyncio
import time

import pytest

from imagegen.embedded_nats import EmbeddedNats, free_port
from tests.helpers.real_processes import Parts

pytestmark = pytest.mark.processes  # each test starts imagegen or nats-server processes of its own

CAP = 4


@pytest.fixture(scope="module")
async def gateways(tmp_path_factory):
    """(a gateway with 1 s body and header timeouts, a gateway capped at CAP connections), as URLs."""
    root = tmp_path_factory.mktemp("slow")
    broker = EmbeddedNats(store_dir=root / "nats", port=free_port()).start()
    parts = Parts(logs=root)
    try:
        quick, capped = free_port(), free_port()
        await parts.gateway(broker.url, quick, "--body-timeout", "1", "--header-timeout", "1", name="quick-gateway")
        await parts.gateway(broker.url, capped, "--max-connections", str(CAP), name="capped-gateway")
        yield f"127.0.0.1:{quick}", f"127.0.0.1:{capped}"
    finally:
        parts.stop_all()
        broker.stop()


async def connect(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = address.split(":")
    return await asyncio.wait_for(asyncio.open_connection(host, int(port)), 10)


async def answer_of(reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes]:
    """The status line, headers (lower-case names) and body of one HTTP answer."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status, *lines = head.decode("latin-1").strip().split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), 10)
    return status, headers, body


async def healthz(address: str) -> str:
    reader, writer = await connect(address)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        return (await answer_of(reader))[0]
    finally:
        writer.close()


async def dribble_until_answered(reader, writer, piece: bytes, *, every_s: float = 0.2, most: int = 100) -> bytes:
    """Sends `piece` every `every_s` until the gateway answers or closes (at most `most` pieces); what
    it sent back (b"" for a close without an answer)."""
    reading = asyncio.ensure_future(reader.read(65536))
    for _ in range(most):
        if reading.done():
            break
        try:
            writer.write(piece)
            await writer.drain()
        except ConnectionError:
            break
        await asyncio.wait([reading], timeout=every_s)
    assert reading.done(), f"still open after {most} pieces"
    try:
        return reading.result()
    except ConnectionError:
        return b""


async def test_a_body_that_crawls_gets_408_and_the_gateway_answers_others_meanwhile(gateways):
    quick, _ = gateways
    reader, writer = await connect(quick)
    try:
        writer.write(b"POST /v1/jobs HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
        await writer.drain()
        assert await healthz(quick) == "HTTP/1.1 200 OK"
        answer = await dribble_until_answered(reader, writer, b" ")
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"the body did not arrive within 1 s" in answer


async def test_headers_that_crawl_get_the_connection_closed(gateways):
    quick, _ = gateways
    reader, writer = await connect(quick)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: test\r\n")
        await writer.drain()
        answer = await dribble_until_answered(reader, writer, b"X-Slow: 1\r\n")
    finally:
        writer.close()
    assert answer == b""
    assert await healthz(quick) == "HTTP/1.1 200 OK"


async def test_one_connection_past_the_cap_gets_503_with_retry_after(gateways):
    _, capped = gateways
    held = []
    try:
        for _ in range(CAP):  # CAP keep-alive connections, each with an answered request
            reader, writer = await connect(capped)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
            assert (await answer_of(reader))[0] == "HTTP/1.1 200 OK"
            held.append(writer)
        reader, writer = await connect(capped)
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
            status, headers, body = await answer_of(reader)
        finally:
            writer.close()
        assert status == "HTTP/1.1 503 Service Unavailable" and headers["retry-after"] == "1"
        assert f"at most {CAP}".encode() in body and b"too many connections" in body
    finally:
        for writer in held:
            writer.close()
    deadline = time.monotonic() + 10  # the closed ones are let go: a new connection is served again
    while (status := await healthz(capped)) != "HTTP/1.1 200 OK" and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert status == "HTTP/1.1 200 OK"
