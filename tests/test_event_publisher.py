"""A worker's stored events (a run's start, a job's end) reach the events stream once each, also when
they were sent while the stream could not take them: they are sent again until it acks them."""

from __future__ import annotations

import asyncio

import nats

from gpu_worker.event_publisher import EventPublisher
from schemas import names
from schemas.codec import decode
from schemas.events import JobEvent
from schemas.jetstream import ensure_topology


async def stored_types(js, job_id: str) -> list[str]:
    sub = await js.subscribe(names.events_subject(job_id), ordered_consumer=True)
    seen = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=0.5)
            except nats.errors.TimeoutError:
                return seen
            seen.append(decode(msg.data, JobEvent).type)
    finally:
        await sub.unsubscribe()


async def test_stored_events_are_sent_again_until_the_stream_takes_them_once(broker):
    nc = await nats.connect(broker.url)
    js = nc.jetstream()
    events = EventPublisher(nc, worker_id="w1", retry_s=0.2)
    try:
        job_id = "job-before-the-stream"
        await events.publish(JobEvent(type="started", job_id=job_id, worker="w1", attempt=1, total=2))
        await events.publish(JobEvent(type="progress", job_id=job_id, step=1, total=2))  # plain: never waited on
        await events.publish(JobEvent(type="done", job_id=job_id, worker="w1"))
        await events.publish(JobEvent(type="done", job_id=job_id, worker="w1"))  # told again: kept once
        await asyncio.sleep(0.5)
        assert len(events.unacked) == 3  # no stream yet: nothing acked, nothing given up
        await ensure_topology(js)
        await asyncio.wait_for(events.all_acked.wait(), 5)
        assert await stored_types(js, job_id) == ["started", "done"]

        job_id = "job-with-the-stream"  # the common case: acked at once, nothing sent again
        await events.publish(JobEvent(type="started", job_id=job_id, worker="w1", attempt=1, total=1))
        await events.publish(JobEvent(type="done", job_id=job_id, worker="w1"))
        await asyncio.wait_for(events.all_acked.wait(), 5)
        assert await stored_types(js, job_id) == ["started", "done"]
    finally:
        await events.close()
        await nc.close()


async def test_an_event_never_acked_is_given_up(broker):
    nc = await nats.connect(broker.url)
    events = EventPublisher(nc, worker_id="w1", retry_s=0.1, give_up_s=0.3)
    try:
        await events.publish(JobEvent(type="done", job_id="nobody-stores-it", worker="w1"))
        await asyncio.wait_for(events.all_acked.wait(), 3)
        assert not events.unacked
    finally:
        await events.close()
        await nc.close()
