"""An object's bytes from a JetStream object store without setting up a consumer.

The object store's own reader creates an ordered consumer for every read (a consumer's set-up and
tear-down on the server; under many reads at once, the account's consumer limit) and hashes the bytes
again as it reads. Here the chunks come from one batched Direct Get on the chunks' subject
(`gateway.state.direct_get`) and are checked against the object's size only: chunks are written once, under
a subject (`nuid`) of their own that no later write reuses, and a description names them only once
all are stored, so a read that finds the size described has the object's bytes; one cut short by a
purge under way (the object replaced or deleted meanwhile) does not. The object store's reader is used
only where Direct Gets are not answered or the size does not match.
"""

from __future__ import annotations

import base64
import json

from nats.js import JetStreamContext
from nats.js.api import ObjectInfo
from nats.js.errors import ObjectNotFoundError
from nats.js.object_store import OBJ_CHUNKS_PRE_TEMPLATE, OBJ_META_PRE_TEMPLATE, OBJ_STREAM_TEMPLATE, ObjectStore

from gateway.state.direct_get import DirectReader


class ObjectReader:
    def __init__(self, js: JetStreamContext, direct: DirectReader, store: ObjectStore, bucket: str):
        self.js = js
        self.direct = direct
        self.store = store
        self.bucket = bucket
        self.stream = OBJ_STREAM_TEMPLATE.format(bucket=bucket)

    async def chunks(self, nuid: str, *, size: int) -> bytes | None:
        """The object whose chunks are named `nuid`, or None when they are not all there."""
        chunks = await self.direct.read(self.stream, OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=self.bucket, obj=nuid))
        if chunks is None:
            return None
        data = b"".join(data for _, data in chunks)
        return data if len(data) == size else None

    async def info(self, name: str) -> ObjectInfo:
        """The object's description, from one Direct Get; ObjectNotFoundError when it has none or was deleted."""
        subject = OBJ_META_PRE_TEMPLATE.format(bucket=self.bucket, obj=base64.urlsafe_b64encode(name.encode()).decode())
        info = ObjectInfo.from_response(json.loads((await self.js.get_msg(self.stream, subject=subject, direct=True)).data))
        if info.deleted:
            raise ObjectNotFoundError
        return info

    async def read(self, info: ObjectInfo) -> bytes:
        """The bytes of the object `info` describes."""
        if info.nuid and not info.is_link():
            data = await self.chunks(info.nuid, size=info.size or 0)
            if data is not None:
                return data
        return (await self.store.get(info.name)).data
