"""A job onto the queue, the one way the gateway, the Python client and any service on NATS put it there:
its first status record in KV `imagegen-jobs`, its `queued` event on `imagegen.events.<job_id>`, and the
job message on its subject with the job id as its `Nats-Msg-Id` (the stream keeps a job published twice
within its duplicate window once).

The `queued` event goes out before the job, on the same connection, so that it comes before the worker's
`started`. A job with a fresh id goes out in the same send as its record, without waiting for the
record's ack (one broker round trip less per job): a broker stores what one connection publishes in the
order sent, so the worker that takes the job finds the record; on a cluster, where the two streams have
their own leaders, a worker that finds none writes it from the job itself (as for a job published with
no record) and the record written here is then refused as a repeat. A job id that may exist already (an
idempotency key's) is published only once its record is new.

    nc = await nats.connect("nats://127.0.0.1:4222")
    js = nc.jetstream()
    job = JobEnvelope.for_request(parse_request({"prompt": "a boat"}))
    await enqueue(nc, js, await js.key_value(names.STATUS_BUCKET), job)
"""

from __future__ import annotations

import asyncio
from typing import Callable

from nats.aio.client import Client as NATS
from nats.js.api import PubAck
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from schemas import jobstore, names
from schemas.codec import encode
from schemas.connect import BROKER_ERRORS
from schemas.events import JobEvent
from schemas.job import JobEnvelope
from schemas.status import JobStatus


async def enqueue(
    nc: NATS,
    js: JetStreamContext,
    kv: KeyValue,
    envelope: JobEnvelope,
    *,
    subject: str | None = None,
    status: JobStatus | None = None,
    queued: JobEvent | None = None,
    fresh_id: bool = True,
    created: set[str] | None = None,
    on_stored: Callable[[JobStatus, int], None] | None = None,
) -> int | None:
    """Writes the job's first record (`status`, else `envelope.queued_status()`) to `kv`, sends its
    `queued` event (`queued`, else one with the job id only) on `nc` and publishes the job on `js` to
    `subject` (else its tier's, which every worker reads: a worker of another model moves it to its
    model's lane); returns the record's revision, None when the job id had a record already (with
    `fresh_id=False` nothing is then sent). `on_stored` gets the record and its revision as soon as the
    store acks it, and `created` the job's id when its record was written here, or may have been (its
    write went unanswered), also when the publish then fails."""
    status = status or envelope.queued_status()
    queued = queued or JobEvent(type="queued", job_id=envelope.job_id)

    async def record() -> int | None:
        try:
            revision = await jobstore.create_status(kv, status)
        except BROKER_ERRORS:
            if created is not None:  # unanswered, not refused: it may be stored
                created.add(status.job_id)
            raise
        if revision is not None:
            if on_stored is not None:
                on_stored(status, revision)
            if created is not None:
                created.add(status.job_id)
        return revision

    if not fresh_id:
        revision = await record()
        if revision is not None:
            await nc.publish(names.events_subject(envelope.job_id), encode(queued))
            await publish_job(js, envelope, subject)
        return revision
    await nc.publish(names.events_subject(envelope.job_id), encode(queued))
    # Tasks start in the order made, and each queues its message before its first wait: the record is
    # sent before the job.
    recording = asyncio.ensure_future(record())
    publishing = asyncio.ensure_future(publish_job(js, envelope, subject))
    revision, published = await asyncio.gather(recording, publishing, return_exceptions=True)
    for outcome in (revision, published):
        if isinstance(outcome, BaseException):
            raise outcome
    return revision


async def publish_job(js: JetStreamContext, envelope: JobEnvelope, subject: str | None = None) -> PubAck:
    """The job message alone, on `subject` (else its tier's), with the job id as its `Nats-Msg-Id`: also
    how a job still queued is published again, which the stream drops if the first one is stored."""
    return await js.publish(
        subject or envelope.tier.subject, encode(envelope), headers={names.MSG_ID_HEADER: envelope.job_id}
    )
