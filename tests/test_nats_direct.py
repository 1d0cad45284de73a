"""A service that speaks only NATS: publishes a msgpack job built with `schemas`, follows its events,
and reads the image from the object store, without touching HTTP."""

from __future__ import annotations

import io

import msgpack
import nats
from nats.js.api import DeliverPolicy
from PIL import Image

from schemas import JobEnvelope, JobState, JobStatus, decode, encode, parse_request
from schemas import names
from tests.helpers.service import collect_events


async def test_job_published_on_nats_completes(service):
    nc = await nats.connect(service.nats_url)
    js = nc.jetstream()
    request = parse_request({"prompt": "a boat", "seed": 5, "width": 64, "height": 96, "steps": 3, "format": "PNG"})
    envelope = JobEnvelope.for_request(request)
    ack = await js.publish(
        names.Tier.NORMAL.subject, encode(envelope), headers={names.MSG_ID_HEADER: envelope.job_id}
    )
    assert ack.stream == names.JOBS_STREAM

    events = await collect_events(js, envelope.job_id)
    kinds = [e.type for e in events]
    assert kinds[0] == "started" and kinds[-1] == "done"
    assert [e.step for e in events if e.type == "progress"] == [1, 2, 3]

    kv = await js.key_value(names.STATUS_BUCKET)
    status = decode((await kv.get(envelope.job_id)).value, JobStatus)
    assert status.state is JobState.DONE and status.seed == 5

    obs = await js.object_store(names.IMAGES_BUCKET)
    image = Image.open(io.BytesIO((await obs.get(envelope.job_id)).data))
    assert image.size == (64, 96) and image.format == "PNG"
    await nc.close()


async def test_same_job_id_published_twice_makes_one_job(service):
    nc = await nats.connect(service.nats_url)
    js = nc.jetstream()
    envelope = JobEnvelope.for_request(parse_request({"prompt": "once", "width": 64, "height": 64, "steps": 2}))
    first = await js.publish(names.Tier.LOW.subject, encode(envelope), headers={names.MSG_ID_HEADER: envelope.job_id})
    second = await js.publish(names.Tier.LOW.subject, encode(envelope), headers={names.MSG_ID_HEADER: envelope.job_id})
    assert second.duplicate and second.seq == first.seq
    events = await collect_events(js, envelope.job_id)
    assert [e.type for e in events].count("started") == 1
    await nc.close()


async def test_garbage_and_invalid_jobs_fail_with_reason_and_worker_keeps_serving(service):
    nc = await nats.connect(service.nats_url)
    js = nc.jetstream()
    dlq = await js.subscribe(names.DLQ_SUBJECT, deliver_policy=DeliverPolicy.NEW)
    kv = await js.key_value(names.STATUS_BUCKET)

    await js.publish(names.Tier.NORMAL.subject, b"\xc1 not msgpack", headers={names.MSG_ID_HEADER: "garbage-job-0001"})
    letter = msgpack.unpackb((await dlq.next_msg(timeout=30)).data)
    assert letter["job_id"] == "garbage-job-0001" and "not msgpack" in letter["reason"]
    status = decode((await kv.get("garbage-job-0001")).value, JobStatus)
    assert status.state is JobState.FAILED and "not msgpack" in status.error

    bad = {"v": 1, "job_id": "invalid-job-0001", "seed": 1, "request": {"prompt": "", "width": 64, "height": 64}}
    await js.publish(names.Tier.NORMAL.subject, msgpack.packb(bad), headers={names.MSG_ID_HEADER: "invalid-job-0001"})
    letter = msgpack.unpackb((await dlq.next_msg(timeout=30)).data)
    assert letter["job_id"] == "invalid-job-0001" and "prompt" in letter["reason"]
    status = decode((await kv.get("invalid-job-0001")).value, JobStatus)
    assert status.state is JobState.FAILED and "prompt" in status.error

    envelope = JobEnvelope.for_request(parse_request({"prompt": "still alive", "width": 64, "height": 64, "steps": 2}))
    await js.publish(names.Tier.NORMAL.subject, encode(envelope), headers={names.MSG_ID_HEADER: envelope.job_id})
    events = await collect_events(js, envelope.job_id)
    assert events[-1].type == "done"
    await nc.close()
