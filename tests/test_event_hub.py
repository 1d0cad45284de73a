"""The gateway's shared event subscription over a real nats-server: followers that join before,
during and after a job's events each get every event once and in order, also past one Direct Get
batch; with Direct Gets unavailable or a lagging read they still do, through a consumer of their own."""

from __future__ import annotations

import asyncio
import uuid
from contextlib import asynccontextmanager
from typing import AsyncIterator

import nats
from nats.js.api import RetentionPolicy, StorageType, StreamConfig

from gateway.state.direct_get import BATCH, DirectReader
from gateway.state.event_hub import EventHub
from schemas import names
from schemas.codec import encode
from schemas.events import JobEvent
from schemas.status import JobStatus

STEPS = BATCH + 44  # more stored events than one Direct Get answer holds


async def publish_job_events(nc, job_id: str, *, steps: int, halfway: asyncio.Event | None = None) -> None:
    js = nc.jetstream()
    for step in range(1, steps + 1):
        await nc.publish(names.events_subject(job_id), encode(JobEvent(type="progress", job_id=job_id, step=step, total=steps)))
        if step % 50 == 0:
            await nc.flush()
            await asyncio.sleep(0)
        if halfway is not None and step == steps // 2:
            await nc.flush()
            halfway.set()
    await js.publish(names.events_subject(job_id), encode(JobEvent(type="done", job_id=job_id)))


@asynccontextmanager
async def running_hub(nats_url: str, *, timeout_s: float = 5.0, setup=None) -> AsyncIterator[tuple]:
    """(connection, hub) on a connection of its own; `setup(js)` runs before the hub starts. All is
    closed afterwards."""
    nc = await nats.connect(nats_url)
    try:
        if setup is not None:
            await setup(nc.jetstream())
        reader = DirectReader(nc, timeout_s=timeout_s)
        await reader.start()
        hub = EventHub(nc.jetstream(), reader)
        await hub.start()
        try:
            yield nc, hub
        finally:
            await hub.close()
            await reader.close()
    finally:
        await nc.close()


async def collect(hub: EventHub, job_id: str) -> list[JobEvent]:
    async def read_status() -> JobStatus:
        return JobStatus(job_id=job_id)

    events = []
    async with asyncio.timeout(60):
        async for event in hub.follow(job_id, read_status=read_status, poll_s=0.5):
            events.append(event)
    return events


def assert_every_event_once_in_order(events: list[JobEvent], steps: int) -> None:
    assert [e.step for e in events[:-1]] == list(range(1, steps + 1))
    assert events[-1].type == "done"


async def test_followers_joining_before_during_and_after_get_every_event_once(service):
    async with running_hub(service.nats_url) as (nc, hub):
        job_id = uuid.uuid4().hex
        early = asyncio.create_task(collect(hub, job_id))
        await asyncio.sleep(0.1)
        halfway = asyncio.Event()
        publishing = asyncio.create_task(publish_job_events(nc, job_id, steps=STEPS, halfway=halfway))
        await halfway.wait()
        middle = asyncio.create_task(collect(hub, job_id))
        await publishing
        late = await collect(hub, job_id)  # everything replayed from the stream, in two batches
        for events in (await early, await middle, late):
            assert_every_event_once_in_order(events, STEPS)
        assert not hub.listeners  # every follower unregistered once done


async def test_a_read_behind_the_last_delivered_event_follows_through_its_own_consumer(service):
    async with running_hub(service.nats_url) as (nc, hub):
        job_id = uuid.uuid4().hex
        await publish_job_events(nc, job_id, steps=5)
        hub.last_seq[job_id] = 2**62  # as if a lagging replica answered the read: its events end too early
        assert_every_event_once_in_order(await collect(hub, job_id), 5)


async def test_without_direct_gets_followers_still_get_every_event(broker):
    async def events_stream_without_direct_gets(js) -> None:
        await js.add_stream(StreamConfig(
            name=names.EVENTS_STREAM, subjects=[f"{names.EVENTS_SUBJECT_PREFIX}.>"],
            retention=RetentionPolicy.LIMITS, storage=StorageType.FILE, allow_direct=False,
        ))

    async with running_hub(broker.url, timeout_s=2.0, setup=events_stream_without_direct_gets) as (nc, hub):
        job_id = uuid.uuid4().hex
        await publish_job_events(nc, job_id, steps=5)
        assert await hub.stored(job_id) is None
        assert_every_event_once_in_order(await collect(hub, job_id), 5)
