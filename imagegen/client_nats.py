"""The client's way straight onto JetStream, needing only `schemas`: the job queued as the gateway queues
it (`schemas.enqueue`), events from `imagegen.events.<id>`, status from KV `imagegen-jobs`, the image
from object store `imagegen-images`."""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from typing import Any, AsyncIterator

from imagegen.client_errors import ImagegenError, invalid
from schemas import jobstore, names, uploads
from schemas.enqueue import enqueue
from schemas.follow import follow_events
from schemas.group import plan_group, store_uploads
from schemas.job import JobEnvelope
from schemas.request import Limits, RequestInvalid, parse_request
from schemas.status import JobState, JobStatus

FIRST_TRIES = 3  # a NATS address that does not answer three tries, half a second apart, is reported, not waited for


class NatsTransport:
    """Straight onto JetStream, needing only `schemas`: what a gateway does, without one."""

    def __init__(self, url: str, *, poll_s: float, limits: Limits, request_timeout_s: float):
        self.url = url
        self.poll_s = poll_s
        self.limits = limits
        self.request_timeout_s = request_timeout_s
        self.nc = None
        self._lock = asyncio.Lock()

    async def _connect(self) -> None:
        async with self._lock:
            if self.nc is not None:
                return
            from schemas.connect import connect

            try:
                nc = await connect(
                    self.url, name="imagegen-client", connect_timeout=self.request_timeout_s, first_tries=FIRST_TRIES
                )
            except Exception as exc:  # nats-py raises several unrelated types for "no server"
                raise ImagegenError(f"cannot reach NATS at {self.url}: {exc}") from None
            self.js = nc.jetstream(timeout=self.request_timeout_s)
            try:
                self.kv = await self.js.key_value(names.STATUS_BUCKET)
                self.images = await self.js.object_store(names.IMAGES_BUCKET)
                self.uploads = await self.js.object_store(names.UPLOADS_BUCKET)
            except Exception as exc:
                await nc.close()
                raise ImagegenError(f"no imagegen buckets on NATS at {self.url} (start a gateway or worker first): {exc}") from None
            self.nc = nc

    async def _record(self, job_id: str) -> JobStatus:
        await self._connect()
        status = await jobstore.read_status(self.kv, job_id)
        if status is None:
            raise ImagegenError(f"unknown job {job_id!r}", status=404)
        return status

    async def submit(self, body: dict[str, Any]) -> list[str]:
        """What the gateway does: checks the request and its images, stores the images in object store
        `imagegen-uploads`, and queues one job per image (`schemas.enqueue`), each naming the stored images."""
        try:
            request = parse_request(body, limits=self.limits)
            prepared = await asyncio.to_thread(uploads.prepare, request, self.limits)
        except RequestInvalid as exc:
            raise invalid(exc) from None
        await self._connect()
        plan = plan_group(prepared.request)
        stored = await store_uploads(self.uploads, plan, prepared.uploads, timeout_s=self.request_timeout_s * 6)
        for member in plan.members(prepared.request, stored):
            envelope = JobEnvelope.for_request(member.request, job_id=member.job_id, placement=member.placement)
            await enqueue(self.nc, self.js, self.kv, envelope)
        return plan.job_ids

    async def status(self, job_id: str) -> dict[str, Any]:
        return (await self._record(job_id)).model_dump(mode="json")

    async def image_bytes(self, job_id: str) -> bytes:
        status = await self._record(job_id)
        if status.state is not JobState.DONE or status.image is None:
            raise ImagegenError(f"job {job_id} is {status.state.value}" + (f": {status.error}" if status.error else ""), status=404)
        from nats.js.errors import NotFoundError, ObjectNotFoundError

        try:
            result = await asyncio.wait_for(self.images.get(status.image.name), timeout=self.request_timeout_s * 6)
        except (ObjectNotFoundError, NotFoundError):
            raise ImagegenError(f"the image of job {job_id} is no longer stored", status=404) from None
        return result.data

    async def cancel(self, job_id: str) -> dict[str, Any]:
        await self._connect()
        status, _ = await jobstore.request_cancel(self.nc, self.kv, job_id)
        if status is None:
            raise ImagegenError(f"unknown job {job_id!r}", status=404)
        return status.model_dump(mode="json")

    async def events(self, job_id: str) -> AsyncIterator[dict[str, Any]]:
        """Replays the job's stored events, then live ones (`schemas.follow`)."""
        await self._record(job_id)
        events = follow_events(self.js, job_id, read_status=lambda: self._record(job_id), poll_s=self.poll_s)
        async with aclosing(events):
            async for event in events:
                yield event.model_dump(mode="json", exclude_none=True, exclude={"preview"})

    async def close(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.drain()
        self.nc = None
