"""Webhooks: a job's start and end POSTed to the URL its request names, signed, retried until the
receiver takes them, made once however many gateways run. Over real NATS, the tiny-sdxl worker, and
a receiver on loopback (which the gateways here are allowed to call)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
from collections import Counter

import nats
import pytest
from aiohttp import web

from gateway.settings import GatewaySettings
from gateway.http.webhooks import NotPublic, PublicOnlyResolver
from imagegen import runtime
from imagegen.embedded_nats import EmbeddedNats, free_port
from schemas import jobstore, names
from schemas.codec import encode
from schemas.job import JobEnvelope
from schemas.request import Limits, parse_request
from tests.helpers.service import start_service, stop_service

SECRET_KEY = b"a webhook secret of this test"
SECRET = "whsec_" + base64.b64encode(SECRET_KEY).decode()
JOB = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2}
WEBHOOKS = {"webhook_secret": SECRET, "webhook_allow_private": True, "webhook_retry_s": (0.2, 0.2, 0.2)}


class Receiver:
    """A webhook receiver on loopback: /ok takes every call, /flaky/N refuses a call's first N tries
    with 503, /gone answers 410."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.arrived = asyncio.Condition()
        self.tries: Counter[str] = Counter()
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        call = {"path": request.path, "headers": dict(request.headers), "raw": body, "job": json.loads(body)}
        async with self.arrived:
            self.calls.append(call)
            self.arrived.notify_all()
        self.tries[request.headers["webhook-id"]] += 1
        if request.path == "/gone":
            return web.Response(status=410)
        if request.path.startswith("/flaky/") and self.tries[request.headers["webhook-id"]] <= int(request.path.rsplit("/", 1)[1]):
            return web.Response(status=503)
        return web.Response(text="ok")

    def of(self, job_id: str) -> list[dict]:
        return [c for c in self.calls if c["job"]["job_id"] == job_id]

    async def wait_for(self, job_id: str, count: int, *, timeout: float = 60) -> list[dict]:
        async with asyncio.timeout(timeout), self.arrived:
            await self.arrived.wait_for(lambda: len(self.of(job_id)) >= count)
        return self.of(job_id)


@pytest.fixture
async def receiver():
    got = Receiver()
    app = web.Application()
    app.router.add_post("/{tail:.*}", got.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    got.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    yield got
    await runner.cleanup()


@pytest.fixture(scope="module")
def webhook_broker(tmp_path_factory) -> EmbeddedNats:
    server = EmbeddedNats(store_dir=tmp_path_factory.mktemp("webhook-nats"), port=free_port()).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
async def hooked(webhook_broker, data_dir):
    """A gateway and a tiny-sdxl worker whose gateway signs webhooks and may call loopback. The worker takes
    at most 10 steps, its gateway 100: a job of more fails on the worker."""
    svc = await start_service(webhook_broker.url, data_dir, gateway_kw=WEBHOOKS, limits=Limits(max_steps=10))
    yield svc
    await stop_service(svc)


def signed_right(call: dict) -> bool:
    """The Standard Webhooks check a receiver makes: HMAC-SHA256 of "id.timestamp.body" with the key."""
    h = call["headers"]
    expected = hmac.new(SECRET_KEY, f"{h['webhook-id']}.{h['webhook-timestamp']}.".encode() + call["raw"], hashlib.sha256).digest()
    return h["webhook-signature"] == "v1," + base64.b64encode(expected).decode()


async def submit(http, url: str, body: dict, path: str = "/v1/jobs") -> str:
    async with http.post(f"{url}{path}", json=body) as r:
        assert r.status in (200, 202), await r.text()
        answer = await r.json()
    return answer.get("job_id") or answer["task_id"]


async def test_a_finished_job_is_posted_once_to_its_webhook_signed(hooked, receiver, http):
    job_id = await submit(http, hooked.url, {**JOB, "webhook": f"{receiver.url}/ok"})
    (call,) = await receiver.wait_for(job_id, 1)
    job = call["job"]
    assert job["state"] == "done" and job["image_url"] == f"/v1/jobs/{job_id}/image" and job["request"]["webhook"] == f"{receiver.url}/ok"
    assert call["headers"]["webhook-id"] == f"{job_id}.completed" and call["headers"]["X-Imagegen-Event"] == "completed"
    assert signed_right(call)
    async with http.get(f"{hooked.url}{job['image_url']}") as r:
        assert r.status == 200
    await asyncio.sleep(1.0)  # a second call would have come by now
    assert len(receiver.of(job_id)) == 1


async def test_start_and_completed_are_posted_in_order_when_the_filter_asks_for_both(hooked, receiver, http):
    body = {**JOB, "steps": 4, "webhook": f"{receiver.url}/ok", "webhook_events_filter": ["start", "completed"]}
    job_id = await submit(http, hooked.url, body, path="/api/generate")  # mflux-server's API takes them too
    calls = await receiver.wait_for(job_id, 2)
    assert [c["headers"]["X-Imagegen-Event"] for c in calls] == ["start", "completed"]
    assert calls[0]["job"]["state"] == "running" and calls[0]["job"]["worker"]
    assert calls[1]["job"]["state"] == "done"
    assert all(signed_right(c) for c in calls)


async def webhook_calls(http, url: str) -> Counter[str]:
    """The gateway's imagegen_webhook_calls_total for completed calls, by outcome."""
    async with http.get(f"{url}/metrics") as r:
        text = await r.text()
    found = re.findall(r'^imagegen_webhook_calls_total\{moment="completed",outcome="(\w+)"\} ([0-9.]+)$', text, re.M)
    return Counter({outcome: int(float(n)) for outcome, n in found})


async def test_a_receiver_that_fails_gets_the_call_again_until_it_takes_it(hooked, receiver, http):
    before = await webhook_calls(http, hooked.url)
    job_id = await submit(http, hooked.url, {**JOB, "webhook": f"{receiver.url}/flaky/2"})
    calls = await receiver.wait_for(job_id, 3)
    assert {c["headers"]["webhook-id"] for c in calls} == {f"{job_id}.completed"}
    assert all(c["job"]["state"] == "done" for c in calls)
    await asyncio.sleep(1.0)  # taken on the third try: no fourth
    assert len(receiver.of(job_id)) == 3
    assert await webhook_calls(http, hooked.url) - before == Counter({"retried": 2, "delivered": 1})


async def test_a_receiver_that_refuses_the_call_is_not_called_again(hooked, receiver, http):
    before = await webhook_calls(http, hooked.url)
    job_id = await submit(http, hooked.url, {**JOB, "webhook": f"{receiver.url}/gone"})
    await receiver.wait_for(job_id, 1)
    await asyncio.sleep(1.0)  # retries come 0.2 s apart here
    assert len(receiver.of(job_id)) == 1
    assert await webhook_calls(http, hooked.url) - before == Counter({"given_up": 1})


async def test_a_failed_job_is_posted_with_its_reason(hooked, receiver, http):
    job_id = await submit(http, hooked.url, {**JOB, "steps": 12, "webhook": f"{receiver.url}/ok"})
    (call,) = await receiver.wait_for(job_id, 1)
    assert call["job"]["state"] == "failed" and call["job"]["error"].startswith("steps:") and "between 1 and 10, got 12" in call["job"]["error"]


async def test_a_job_queued_straight_over_nats_gets_its_webhook(hooked, receiver):
    nc = await nats.connect(hooked.nats_url)
    js = nc.jetstream()
    envelope = JobEnvelope.for_request(parse_request({**JOB, "webhook": f"{receiver.url}/ok"}))
    await js.publish(names.Tier.NORMAL.subject, encode(envelope), headers={names.MSG_ID_HEADER: envelope.job_id})
    (call,) = await receiver.wait_for(envelope.job_id, 1)
    assert call["job"]["state"] == "done"
    await nc.close()


async def test_a_webhook_that_cannot_be_called_is_given_up_at_once(hooked, http):
    """Over NATS nothing checks a webhook's host before the call: the call gives up, once, and counts it."""
    before = await webhook_calls(http, hooked.url)
    nc = await nats.connect(hooked.nats_url)
    js = nc.jetstream()
    envelope = JobEnvelope.for_request(parse_request({**JOB, "webhook": "http://a..example.com/hook"}))
    await js.publish(names.Tier.NORMAL.subject, encode(envelope), headers={names.MSG_ID_HEADER: envelope.job_id})
    await nc.close()
    async with asyncio.timeout(60):
        while (await webhook_calls(http, hooked.url) - before)["given_up"] < 1:
            await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)  # retries come 0.2 s apart here
    assert await webhook_calls(http, hooked.url) - before == Counter({"given_up": 1})


async def test_with_two_gateways_each_moment_is_posted_once(hooked, webhook_broker, receiver, http):
    second = await runtime.start_gateway(GatewaySettings(nats_url=webhook_broker.url, port=0, **WEBHOOKS))
    try:
        body = {**JOB, "webhook": f"{receiver.url}/ok", "webhook_events_filter": ["start", "completed"]}
        job_ids = [await submit(http, url, body) for url in (hooked.url, f"http://127.0.0.1:{second.port}") for _ in range(2)]
        for job_id in job_ids:
            await receiver.wait_for(job_id, 2)
        await asyncio.sleep(1.0)
        assert Counter(c["headers"]["webhook-id"] for c in receiver.calls) == Counter(
            f"{job_id}.{moment}" for job_id in job_ids for moment in ("start", "completed")
        )
    finally:
        await second.stop()


async def test_a_gateway_that_starts_later_does_not_call_again(hooked, webhook_broker, receiver, http):
    job_id = await submit(http, hooked.url, {**JOB, "webhook": f"{receiver.url}/ok"})
    await receiver.wait_for(job_id, 1)
    later = await runtime.start_gateway(GatewaySettings(nats_url=webhook_broker.url, port=0, **WEBHOOKS))
    try:  # it reads every record on start, this job's end among them
        await asyncio.sleep(1.5)
        assert len(receiver.of(job_id)) == 1
    finally:
        await later.stop()


@pytest.fixture
async def queue_only(broker):
    """A gateway on a broker of its own with no worker, allowed to call loopback."""
    gateway = await runtime.start_gateway(GatewaySettings(nats_url=broker.url, port=0, **WEBHOOKS))
    yield f"http://127.0.0.1:{gateway.port}"
    await gateway.stop()


async def test_a_job_cancelled_in_the_queue_is_posted_as_cancelled(queue_only, receiver, http):
    job_id = await submit(http, queue_only, {**JOB, "webhook": f"{receiver.url}/ok"})
    async with http.post(f"{queue_only}/v1/jobs/{job_id}/cancel") as r:
        assert r.status == 200
    (call,) = await receiver.wait_for(job_id, 1, timeout=30)
    assert call["job"]["state"] == "cancelled"


@pytest.fixture
async def public_only(broker):
    """A gateway with the default settings: webhooks go to public addresses only."""
    gateway = await runtime.start_gateway(GatewaySettings(nats_url=broker.url, port=0))
    yield f"http://127.0.0.1:{gateway.port}"
    await gateway.stop()


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"webhook": "http://127.0.0.1:9/hook"}, "not public"),
        ({"webhook": "http://[::1]/hook"}, "not public"),
        ({"webhook": "http://10.1.2.3/hook"}, "not public"),
        ({"webhook": "http://169.254.169.254/latest/meta-data"}, "not public"),
        ({"webhook": "http://localhost:8080/hook"}, "this machine"),
        ({"webhook": "http://127.1/hook"}, "four decimal numbers"),
        ({"webhook": "http://2130706433/hook"}, "four decimal numbers"),
        ({"webhook": "http://[::7f00:1]/hook"}, "not public"),  # loopback in an IPv4-compatible address
        ({"webhook": "http://[64:ff9b::a00:1]/hook"}, "not public"),  # 10.0.0.1 through NAT64
        ({"webhook": "http://[2002:c0a8:101::]/hook"}, "not public"),  # 192.168.1.1 through 6to4
        ({"webhook": "http://１２７.０.０.１:9/hook"}, "address 127.0.0.1 is not public"),  # full-width digits
        ({"webhook": "http://127。0。0。1:9/hook"}, "address 127.0.0.1 is not public"),  # ideographic full stops
        ({"webhook": "http://127｡0｡0｡1:9/hook"}, "address 127.0.0.1 is not public"),  # half-width ideographic
        ({"webhook": "http://127．0．0．1:9/hook"}, "address 127.0.0.1 is not public"),  # full-width full stops
        ({"webhook": "http://1２7.0.0.1:9/hook"}, "address 127.0.0.1 is not public"),  # one full-width digit
        ({"webhook": "http://%31%32%37.0.0.1:9/hook"}, "address 127.0.0.1 is not public"),  # percent-escaped
        ({"webhook": "http://%31%30.0.0.1/hook"}, "address 10.0.0.1 is not public"),
        ({"webhook": "http://ｌｏｃａｌｈｏｓｔ:9/hook"}, "this machine"),
        ({"webhook": "http://LocalHost./hook"}, "this machine"),
        ({"webhook": "http://api.localhost/hook"}, "this machine"),
        ({"webhook": "http://0177.0.0.1/hook"}, "the IPv4 address 127.0.0.1"),  # octal
        ({"webhook": "http://0x7f.0.0.1/hook"}, "the IPv4 address 127.0.0.1"),  # hex
        ({"webhook": "http://0x7f000001/hook"}, "the IPv4 address 127.0.0.1"),
        ({"webhook": "http://１２７.１/hook"}, "the IPv4 address 127.0.0.1"),  # short form, full-width
        ({"webhook": "http://8.8.8.8.8/hook"}, "reads as an IPv4 address"),  # ends in a number: no name
        ({"webhook": "http://[::ffff:127.0.0.1]/hook"}, "carrying 127.0.0.1"),  # IPv4-mapped
        ({"webhook": "http://[::ffff:a9fe:a9fe]/hook"}, "carrying 169.254.169.254"),
        ({"webhook": "http://exa%20mple.com/hook"}, "not a valid host name"),
        ({"webhook": "http://%ff.example.com/hook"}, "not a valid host name"),
        ({"webhook": "http://a..example.com/hook"}, "not a valid host name"),
        ({"webhook": "http://" + "a" * 64 + ".example.com/hook"}, "not a valid host name"),
        ({"webhook": "ftp://example.com/hook"}, "http or https"),
        ({"webhook": "https://user:pass@example.com/hook"}, "user name or password"),
        ({"webhook": "https://example.com:99999/"}, "Port"),
        ({"webhook": "https://"}, "host"),
        ({"webhook_events_filter": ["completed"]}, "set webhook"),
        ({"webhook": "https://example.com/hook", "webhook_events_filter": ["finished"]}, "webhook_events_filter"),
        ({"webhook": "https://example.com/hook", "webhook_events_filter": []}, "webhook_events_filter"),
        ({"webhook": "https://example.com/" + "x" * 2100}, "2048"),
    ],
)
async def test_a_webhook_that_cannot_be_called_is_refused_and_queues_nothing(public_only, http, fields, named):
    async with http.post(f"{public_only}/v1/jobs", json={**JOB, **fields}) as r:
        assert r.status == 400
        error = await r.json()
    assert error["field"].startswith("webhook") and named in error["error"]
    async with http.get(f"{public_only}/v1/jobs") as r:
        assert await r.json() == []


async def test_a_webhook_is_kept_and_called_as_its_host_reads(hooked, receiver, http):
    """Full-width digits and ideographic full stops read as ASCII ones: the job keeps that URL, and the
    call goes to it (here, where loopback may be called)."""
    port = receiver.url.rsplit(":", 1)[1]
    job_id = await submit(http, hooked.url, {**JOB, "webhook": f"http://１２７。０｡0．1:{port}/ok"})
    async with http.get(f"{hooked.url}/v1/jobs/{job_id}") as r:
        assert (await r.json())["request"]["webhook"] == f"http://127.0.0.1:{port}/ok"
    (call,) = await receiver.wait_for(job_id, 1)
    assert call["path"] == "/ok" and call["job"]["request"]["webhook"] == f"http://127.0.0.1:{port}/ok"


async def test_a_public_address_in_another_spelling_is_accepted_as_its_ascii_form(public_only, http):
    job_id = await submit(http, public_only, {**JOB, "webhook": "https://８．８．８．８/hook?a=%41"})
    async with http.get(f"{public_only}/v1/jobs/{job_id}") as r:
        assert (await r.json())["request"]["webhook"] == "https://8.8.8.8/hook?a=%41"


async def test_a_job_queued_over_nats_with_a_wide_loopback_webhook_is_not_called(broker, public_only, receiver, http):
    """Nothing checks a job written straight onto NATS at submit: the call reads the host as the HTTP
    client would (127.0.0.1 here) and gives up instead of calling it. (Its record is written as a
    publisher's own gateway would, and cancelled in the queue, to end it with no worker.)"""
    before = await webhook_calls(http, public_only)
    wide = receiver.url.replace("127.0.0.1", "１２７。０。０。１")
    envelope = JobEnvelope.for_request(parse_request({**JOB, "webhook": f"{wide}/ok"}))
    nc = await nats.connect(broker.url)
    try:
        await jobstore.create_status(await nc.jetstream().key_value(names.STATUS_BUCKET), envelope.queued_status())
    finally:
        await nc.close()
    async with asyncio.timeout(30):
        while True:  # once this gateway's view has the record
            async with http.post(f"{public_only}/v1/jobs/{envelope.job_id}/cancel") as r:
                if r.status == 200:
                    break
            await asyncio.sleep(0.1)
        while (await webhook_calls(http, public_only) - before)["given_up"] < 1:
            await asyncio.sleep(0.1)
    assert receiver.calls == []


async def test_a_name_that_resolves_to_this_machine_is_not_called():
    resolver = PublicOnlyResolver()
    try:
        with pytest.raises(NotPublic, match="not public"):
            await resolver.resolve("localhost", 80)
    finally:
        await resolver.close()
