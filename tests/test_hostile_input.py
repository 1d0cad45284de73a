"""Hostile input, over HTTP, WebSocket and straight onto the job subjects over NATS: every piece gets a
clear answer (a 4xx naming the problem; a job `failed` with the reason and a dead letter), never a
500, a hang or a stuck message, and the service goes on serving normal jobs afterwards.

A nats-server, a gateway and a worker on the simulated engine run as real processes of this module's
own, so no other test's worker takes these messages and no other test's dead letters mix in.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import zlib

import aiohttp
import msgpack
import nats
import pytest
from nats.js.api import DeliverPolicy

from gateway.settings import GatewaySettings
from schemas import names
from schemas.codec import decode, encode
from schemas.job import JobEnvelope
from schemas.request import parse_request
from schemas.status import JobState, JobStatus
from tests.helpers.real_processes import own_stack, submit, wait_state

pytestmark = pytest.mark.processes  # each test starts imagegen or nats-server processes of its own

FLAGS = ("--ack-wait", "2", "--max-deliver", "2")
POSTS = ["/api/generate", "/v1/jobs", "/api/load", "/v1/images/generations"]
JOB_POSTS = ["/api/generate", "/v1/jobs"]
JSON = {"Content-Type": "application/json"}
BOUNDED = aiohttp.ClientTimeout(total=30)
SMALL_JOB = {"prompt": "a calm sea", "width": 64, "height": 64, "steps": 2}


@pytest.fixture(scope="module")
async def stack(tmp_path_factory):
    """(gateway URL, NATS URL, gateway process, worker process), all of this module's own."""
    worker_flags = (*FLAGS, "--sim-step-s", "0.01")
    async with own_stack(tmp_path_factory.mktemp("hostile"), name="hostile", worker_flags=worker_flags, gateway_flags=FLAGS) as parts:
        yield parts


@pytest.fixture(scope="module")
def url(stack) -> str:
    return stack[0]


def error_text(body: dict) -> str:
    """The error of either shape: ours ({"error": "..."}) or OpenAI's ({"error": {"message": "..."}})."""
    error = body["error"]
    return error["message"] if isinstance(error, dict) else error


async def post_raw(http, url: str, data, headers: dict | None = None) -> tuple[int, str, int]:
    """(status, error text, answer size) of a POST whose answer must be JSON."""
    async with http.post(url, data=data, headers=headers or JSON, timeout=BOUNDED) as r:
        raw = await r.read()
        assert r.content_type == "application/json", (r.status, raw[:300])
        return r.status, error_text(json.loads(raw)), len(raw)


# -- HTTP bodies ----------------------------------------------------------------------------------


def deep(depth: int, opener: bytes, closer: bytes) -> bytes:
    return opener * depth + closer * depth


def gzip_bomb() -> bytes:
    """100 MiB of spaces in about 100 KiB: larger than the body limit once inflated."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: the gzip container
    mebibyte = b" " * (1024 * 1024)
    return b"".join(packer.compress(mebibyte) for _ in range(100)) + packer.flush()


HOSTILE_BODIES = [
    pytest.param(b"x" * (GatewaySettings().body_limit_bytes + 1), JSON, 413, "too large", id="over-the-body-limit"),
    pytest.param(gzip_bomb(), {**JSON, "Content-Encoding": "gzip"}, 413, "too large", id="gzip-bomb"),
    pytest.param(b"\x1f\x8b\x08 not gzip", {**JSON, "Content-Encoding": "gzip"}, 400, "unreadable body", id="broken-gzip"),
    pytest.param(deep(100_000, b"[", b"]"), JSON, 400, "nested too deeply", id="100k-nested-arrays"),
    pytest.param(deep(5_000, b"{\"a\":", b"}").replace(b"}", b"1}", 1), JSON, 400, "nested too deeply", id="5k-nested-objects"),
    pytest.param(b'{"prompt": "a", "loras": ' + deep(50_000, b"[", b"]") + b"}", JSON, 400, "nested too deeply", id="nested-in-field"),
    pytest.param(b'{"prompt": "a", "seed": ' + b"7" * 5000 + b"}", JSON, 400, "4300 digits", id="5000-digit-number"),
    pytest.param(b'{"prompt": "a \\ud800 b"}', JSON, 400, "lone surrogate \\ud800", id="lone-surrogate"),
    pytest.param(b'{"prompt": "caf\xe9"}', JSON, 400, "not UTF-8 at byte 15", id="latin-1-bytes"),
    pytest.param(b"\x00\x01\x02\xff" * 1000, JSON, 400, "not UTF-8", id="binary"),
    pytest.param(b"prompt=a&width=64", {"Content-Type": "application/x-www-form-urlencoded"}, 400, "not JSON", id="form"),
    pytest.param(b"<job><prompt>a</prompt></job>", {"Content-Type": "application/xml"}, 400, "not JSON", id="xml"),
    pytest.param(
        b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\na\r\n--b--\r\n',
        {"Content-Type": "multipart/form-data; boundary=b"},
        400,
        "not JSON",
        id="multipart",
    ),
    pytest.param(b"", {"Content-Type": "text/plain"}, 400, "empty body", id="empty-text"),
]


@pytest.mark.parametrize("data, headers, status, fragment", HOSTILE_BODIES)
@pytest.mark.parametrize("path", POSTS)
async def test_hostile_body_gets_a_clear_4xx(url, http, path, data, headers, status, fragment):
    answer, error, size = await post_raw(http, f"{url}{path}", data, headers)
    assert answer == status and fragment in error, error
    assert size < 4096


async def chunks(total: int, size: int = 1024 * 1024):
    for _ in range(total // size):
        yield b"x" * size


@pytest.mark.parametrize("path", POSTS)
async def test_oversized_chunked_body_without_length_is_413(url, http, path):
    answer, error, _ = await post_raw(http, f"{url}{path}", chunks(GatewaySettings().body_limit_bytes + 2 * 1024 * 1024))
    assert answer == 413 and "too large" in error


HUGE_BASE64 = "QUJD" * (2 * 1024 * 1024)  # 8 MiB of valid base64 text


@pytest.mark.parametrize("field", ["prompt", "negative_prompt", "model", "scheduler"])
@pytest.mark.parametrize("path", JOB_POSTS)
async def test_huge_base64_string_in_a_field_is_named_and_not_echoed_whole(url, http, path, field):
    body = {**SMALL_JOB, field: HUGE_BASE64}
    async with http.post(f"{url}{path}", json=body, timeout=BOUNDED) as r:
        assert r.status == 400
        raw = await r.read()
    answer = json.loads(raw)
    assert answer["field"] == field and field in answer["error"]
    assert len(raw) < 4096


@pytest.mark.parametrize("path", JOB_POSTS)
async def test_a_hundred_unknown_fields_get_a_short_answer(url, http, path):
    body = {**SMALL_JOB, **{f"field{n}": n for n in range(150)}}
    async with http.post(f"{url}{path}", json=body, timeout=BOUNDED) as r:
        assert r.status == 400
        raw = await r.read()
    answer = json.loads(raw)
    assert answer["field"] == "field0" and "unknown field" in answer["error"] and "130 more" in answer["error"]
    assert len(answer["errors"]) == 20 and len(raw) < 8192


@pytest.mark.parametrize("path", JOB_POSTS)
async def test_more_fields_than_a_request_has_are_refused_by_count(url, http, path):
    body = {**SMALL_JOB, **{f"field{n}": n for n in range(3000)}}
    answer, error, _ = await post_raw(http, f"{url}{path}", json.dumps(body))
    assert answer == 400 and "3004 fields; a request has at most 200" in error


def huge_keys(keys: int = 1_500_000) -> bytes:
    """A JSON object of 1.5 million unknown keys, about 18 MB: seconds to parse and validate."""
    return b'{"prompt":"a",' + b",".join(b'"k%d":1' % n for n in range(keys)) + b"}"


async def healthz_ok(http, url: str) -> bool:
    async with http.get(f"{url}/healthz", timeout=BOUNDED) as r:
        return r.status == 200


async def post_with_pause(http, url: str, body: bytes, headers: dict, meanwhile) -> tuple[int, str, bool]:
    """POSTs `body` in two parts: the first 200 KB, then the rest only after `meanwhile()` has run,
    while the gateway reads the first part (or has just refused it). Returns the answer's status and
    error text and what `meanwhile()` returned."""
    first_sent, go_on = asyncio.Event(), asyncio.Event()

    async def parts():
        yield body[:200_000]
        first_sent.set()
        await go_on.wait()
        yield body[200_000:]

    async def post() -> tuple[int, str]:
        async with http.post(url, data=parts(), headers={**headers, "Content-Length": str(len(body))}, timeout=BOUNDED) as r:
            return r.status, error_text(await r.json())

    posting = asyncio.ensure_future(post())
    await asyncio.wait([asyncio.ensure_future(first_sent.wait()), posting], return_when=asyncio.FIRST_COMPLETED)
    seen = await meanwhile()
    go_on.set()
    return *await posting, seen


@pytest.mark.parametrize(
    "body, headers, status, fragment",
    [
        (huge_keys(), JSON, 400, "too many keys and items"),
        (gzip_bomb(), {**JSON, "Content-Encoding": "gzip"}, 413, "inflates past"),
    ],
    ids=["18MB-of-keys", "gzip-bomb"],
)
@pytest.mark.parametrize("path", JOB_POSTS)
async def test_a_hostile_body_is_refused_by_name_and_healthz_answers_while_it_arrives(url, http, path, body, headers, status, fragment):
    answer, error, healthy = await post_with_pause(http, f"{url}{path}", body, headers, meanwhile=lambda: healthz_ok(http, url))
    assert healthy and answer == status and fragment in error, error
    assert await healthz_ok(http, url)


@pytest.mark.parametrize("path", JOB_POSTS)
async def test_a_client_posting_18MB_of_keys_reads_the_refusal(url, http, path):
    answer, error, _ = await post_raw(http, f"{url}{path}", huge_keys())
    assert answer == 400 and "too many keys and items" in error


async def test_an_unknown_content_encoding_is_415(url, http):
    answer, error, _ = await post_raw(http, f"{url}/v1/jobs", b"\x00" * 64, {**JSON, "Content-Encoding": "br"})
    assert answer == 415 and "'br' is not taken" in error


async def test_a_gzipped_request_within_the_caps_is_taken(url, http):
    body = zlib.compress(json.dumps(SMALL_JOB).encode(), wbits=31)
    async with http.post(f"{url}/v1/jobs", data=body, headers={**JSON, "Content-Encoding": "gzip"}, timeout=BOUNDED) as r:
        assert r.status == 202, await r.text()


@pytest.mark.parametrize("path", ["/api/load", "/v1/images/generations"])
async def test_a_route_without_images_takes_a_body_of_one_mebibyte(url, http, path):
    answer, error, _ = await post_raw(http, f"{url}{path}", b" " * (GatewaySettings().max_json_bytes + 1))
    assert answer == 413 and f"over {GatewaySettings().max_json_bytes} bytes, the cap of this route" in error


# -- WebSocket messages ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message, fragment",
    [
        ("not json", "JSON objects"),
        ("[1, 2]", "JSON objects"),
        ('{"a": ' + "9" * 5000 + "}", "JSON objects"),
        ('{"follow": ' + "[" * 100_000 + "]" * 100_000 + "}", "JSON objects"),
        ('{"follow": 5}', "follow: a job id or a list"),
        ('{"follow": null}', "follow: a job id or a list"),
        ('{"follow": {"a": 1}}', "follow: a job id or a list"),
        (json.dumps({"follow": [f"job{n:08d}" for n in range(1001)]}), "at most 1000"),
        ('{"cancel": {"x": [1]}}', "unknown job"),
    ],
    ids=["text", "array", "5000-digits", "deep", "follow-int", "follow-null", "follow-map", "follow-1001", "cancel-map"],
)
async def test_hostile_socket_message_is_answered_and_the_socket_lives_on(url, http, message, fragment):
    async with http.ws_connect(f"{url}/v1/ws", timeout=aiohttp.ClientWSTimeout(ws_close=5)) as ws:
        await ws.send_str(message)
        answer = await ws.receive_json(timeout=10)
        assert answer["type"] == "error" and fragment in answer["error"], answer
        await ws.send_str(json.dumps({"follow": ["nosuchjob1"]}))
        followed = await ws.receive_json(timeout=10)
        assert (followed["type"], followed["job_id"]) == ("error", "nosuchjob1") and "unknown job" in followed["error"]


# -- messages straight onto the job subjects ------------------------------------------------------


def envelope_bytes(job_id: str, **request) -> bytes:
    return encode(JobEnvelope.for_request(parse_request({**SMALL_JOB, **request}), job_id=job_id))


def bad_messages(tag: str) -> list[tuple[str, bytes, str]]:
    """(job id in the Nats-Msg-Id header, message, a fragment of the reason it must fail with)."""
    many_fields = {**SMALL_JOB, **{f"k{n:06d}": 1 for n in range(60_000)}}
    return [
        (f"garbage-{tag}", b"\xc1 this is not msgpack", "not msgpack"),
        (f"truncated-{tag}", envelope_bytes(f"truncated-{tag}")[:-7], "not msgpack"),
        (f"array-{tag}", msgpack.packb([1, 2, 3]), "expected a msgpack map, got list"),
        (f"noversion-{tag}", msgpack.packb({"job_id": f"noversion-{tag}"}), "unsupported schema version None"),
        (f"future-{tag}", msgpack.packb({"v": 99, "job_id": f"future-{tag}"}), "unsupported schema version 99"),
        (
            f"shape-{tag}",
            msgpack.packb({"v": 1, "job_id": f"shape-{tag}", "seed": 1, "request": "a string, not a map"}),
            "invalid JobEnvelope: request",
        ),
        (
            f"fields-{tag}",
            msgpack.packb({"v": 1, "job_id": f"fields-{tag}", "seed": 1, "request": many_fields}),
            "Extra inputs are not permitted",
        ),
        (
            f"huge-{tag}",  # just under the server's 1 MiB payload limit
            msgpack.packb({"v": 1, "job_id": f"huge-{tag}", "seed": 1, "request": {**SMALL_JOB, "prompt": "p" * 1_048_000}}),
            "prompt: exceeds 2000 characters",
        ),
        (f"deep-{tag}", b"\x91" * 200_000 + b"\xc0", "not msgpack"),
    ]


async def dead_letters(sub, wanted: int, *, timeout: float = 30) -> list[dict]:
    letters: list[dict] = []
    deadline = time.monotonic() + timeout
    while len(letters) < wanted and time.monotonic() < deadline:
        try:
            msg = await sub.next_msg(timeout=max(0.1, deadline - time.monotonic()))
        except nats.errors.TimeoutError:
            break
        letters.append(msgpack.unpackb(msg.data))
    return letters


async def settled(js, tier: names.Tier, *, timeout: float = 20):
    """The tier's consumer once it has nothing pending or unacknowledged."""
    deadline = time.monotonic() + timeout
    while True:
        info = await js.consumer_info(names.JOBS_STREAM, tier.consumer)
        if (info.num_pending == 0 and info.num_ack_pending == 0) or time.monotonic() > deadline:
            return info
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("tier", list(names.TIERS), ids=lambda t: t.value)
async def test_bad_job_messages_fail_with_reason_and_dead_letter_then_a_normal_job_completes(stack, http, tier):
    url, nats_url, gateway, worker = stack
    tag = f"{tier.value}-{secrets.token_hex(3)}"
    bad = bad_messages(tag)
    anonymous = b"\xc1 no header, no id " + tag.encode()
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        dlq = await js.subscribe(names.DLQ_SUBJECT, deliver_policy=DeliverPolicy.NEW)
        kv = await js.key_value(names.STATUS_BUCKET)
        for job_id, data, _ in bad:
            await js.publish(tier.subject, data, headers={names.MSG_ID_HEADER: job_id})
        await js.publish(tier.subject, anonymous)

        letters = await dead_letters(dlq, len(bad) + 1)

        by_id = {letter["job_id"]: letter for letter in letters}
        for job_id, data, fragment in bad:
            assert job_id in by_id, f"no dead letter for {job_id}; got {sorted(by_id)}"
            letter = by_id[job_id]
            assert fragment in letter["reason"] and letter["attempt"] == 1 and letter["subject"] == tier.subject
            assert len(letter["reason"]) < 2100
            assert letter["data"] == data or (letter["data_truncated_from"] == len(data) and data.startswith(letter["data"]))
            status = decode((await kv.get(job_id)).value, JobStatus)
            assert status.state is JobState.FAILED and status.error == letter["reason"]
        assert by_id[""]["data"] == anonymous and "not msgpack" in by_id[""]["reason"]
        info = await settled(js, tier)
        assert (info.num_pending, info.num_ack_pending) == (0, 0)

        job_id = await submit(http, url, {**SMALL_JOB, "tier": tier.value, "seed": secrets.randbelow(10**9)})
        done = await wait_state(http, url, job_id, {"done", "failed"}, timeout=30)
        assert done["state"] == "done" and done["attempt"] == 1
    finally:
        await nc.close()
    assert gateway.alive and worker.alive


async def test_a_job_whose_envelope_names_another_id_runs_under_the_envelopes_id(stack, http):
    """The header is only the duplicate check; the envelope is the job. Nothing is lost or run twice."""
    url, nats_url, *_ = stack
    header_id, envelope_id = f"header-{secrets.token_hex(4)}", f"envelope-{secrets.token_hex(4)}"
    nc = await nats.connect(nats_url)
    try:
        await nc.jetstream().publish(
            names.Tier.NORMAL.subject, envelope_bytes(envelope_id), headers={names.MSG_ID_HEADER: header_id}
        )
    finally:
        await nc.close()
    state = None
    for _ in range(300):  # the worker writes the first record of a job published straight onto NATS
        async with http.get(f"{url}/v1/jobs/{envelope_id}", timeout=BOUNDED) as r:
            state = (await r.json())["state"] if r.status == 200 else None
        if state in ("done", "failed"):
            break
        await asyncio.sleep(0.1)
    assert state == "done"
    async with http.get(f"{url}/v1/jobs/{header_id}", timeout=BOUNDED) as r:
        assert r.status == 404
