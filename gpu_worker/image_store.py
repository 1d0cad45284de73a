"""Puts a job's image into the object store `imagegen-images` in one round trip.

The object is laid out as the object store lays out any object (its bytes in chunks on a subject of
their own, then a description naming them, written with a rollup), so every reader of the bucket
reads it as usual. The chunks and the description go out together and their acks are awaited
together: readers fetch a job's image only once its record says `done`, which is written after both
acks, so none sees the description before its chunks.

The description is sent on condition that the name has none yet, the usual case (a job's first run),
so no read comes first. When the name has one (an earlier try of the job stored it before its worker
was lost, or another run of the job finished first), `finished_elsewhere` decides: the stored image
stands and this one's chunks are dropped, or this image replaces it and the old chunks are dropped.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
from datetime import datetime, timezone
from typing import Awaitable, Callable

from nats.js import JetStreamContext, api
from nats.js.errors import APIError, NotFoundError
from nats.js.object_store import (
    OBJ_CHUNKS_PRE_TEMPLATE,
    OBJ_DEFAULT_CHUNK_SIZE,
    OBJ_DIGEST_TEMPLATE,
    OBJ_META_PRE_TEMPLATE,
    OBJ_STREAM_TEMPLATE,
    ObjectStore,
)
from nats.nuid import NUID

log = logging.getLogger("imagegen.worker.images")

WRONG_LAST_SEQUENCE = (10071, 10164)  # the stream's answers to a failed Nats-Expected-Last-Subject-Sequence
ROLLUP = {api.Header.ROLLUP.value: "sub"}
FIRST_ON_SUBJECT = {api.Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value: "0"}


class ImageStore:
    def __init__(self, js: JetStreamContext, store: ObjectStore, bucket: str):
        self.js = js
        self.store = store  # the same bucket through the object store client, for the rare paths
        self.bucket = bucket
        self.stream = OBJ_STREAM_TEMPLATE.format(bucket=bucket)
        self._nuid = NUID()

    async def put(
        self, name: str, data: bytes, *, finished_elsewhere: Callable[[], Awaitable[bool]]
    ) -> api.ObjectInfo | None:
        """Stores `data` under `name` and returns the description written (its `nuid` names the chunks'
        subject, `digest` their hash). Returns None, leaving what is stored, when `name` has an image
        already and `finished_elsewhere()` says that its job was finished by another run."""
        nuid = self._nuid.next().decode()
        chunk_subject = OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=self.bucket, obj=nuid)
        meta_subject = OBJ_META_PRE_TEMPLATE.format(bucket=self.bucket, obj=base64.urlsafe_b64encode(name.encode()).decode())
        step = OBJ_DEFAULT_CHUNK_SIZE
        chunks = [data[i : i + step] for i in range(0, len(data), step)]
        info = api.ObjectInfo(
            name=name,
            bucket=self.bucket,
            nuid=nuid,
            size=len(data),
            chunks=len(chunks),
            digest=OBJ_DIGEST_TEMPLATE.format(digest=base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode()),
            mtime=datetime.now(timezone.utc).isoformat(),
            options=api.ObjectMetaOptions(max_chunk_size=step),
        )
        meta = json.dumps(info.as_dict()).encode()
        sends = [self.js.publish(chunk_subject, chunk) for chunk in chunks]
        sends.append(self.js.publish(meta_subject, meta, headers={**ROLLUP, **FIRST_ON_SUBJECT}))
        *chunk_results, meta_result = await asyncio.gather(*sends, return_exceptions=True)
        failed = next((r for r in chunk_results if isinstance(r, BaseException)), None)
        if failed is not None:
            await self._purge(chunk_subject)
            if not isinstance(meta_result, BaseException):  # it names chunks that are not there
                await self._purge(meta_subject)
            raise failed
        if not isinstance(meta_result, BaseException):
            return info
        if not (isinstance(meta_result, APIError) and meta_result.err_code in WRONG_LAST_SEQUENCE):
            await self._purge(chunk_subject)
            raise meta_result
        if await finished_elsewhere():
            await self._purge(chunk_subject)
            return None
        try:
            old = await self.store.get_info(name, show_deleted=True)
        except NotFoundError:
            old = None
        await self.js.publish(meta_subject, meta, headers=ROLLUP)
        if old is not None and not old.deleted and old.nuid and old.nuid != nuid:
            await self.js.purge_stream(self.stream, subject=OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=self.bucket, obj=old.nuid))
        log.info("image %s replaced an earlier try's", name)
        return info

    async def _purge(self, subject: str) -> None:
        """Drops what a failed put left; the bucket's TTL takes what this cannot."""
        try:
            await self.js.purge_stream(self.stream, subject=subject)
        except Exception as exc:
            log.warning("object store %s: %s not purged: %s", self.bucket, subject, exc)
