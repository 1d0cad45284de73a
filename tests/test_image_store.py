"""The worker's one-round-trip image put, against a real nats-server: what it stores reads back through
the object store client, and a name stored already (an earlier try, or another run that finished
first) ends with exactly one image and no stray chunks."""

from __future__ import annotations

import os
import secrets

import nats
import pytest

from gpu_worker.image_store import ImageStore
from schemas import names
from schemas.jetstream import Topology, ensure_topology

STREAM = f"OBJ_{names.IMAGES_BUCKET}"


@pytest.fixture
async def images(nats_server):
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await ensure_topology(js, Topology())
    yield js, await js.object_store(names.IMAGES_BUCKET)
    await nc.close()


async def chunk_messages(js, nuid: str) -> int:
    info = await js.stream_info(STREAM, subjects_filter=f"$O.{names.IMAGES_BUCKET}.C.{nuid}")
    return sum((info.state.subjects or {}).values())


def store_of(js, obs) -> ImageStore:
    return ImageStore(js, obs, names.IMAGES_BUCKET)


async def never() -> bool:
    raise AssertionError("asked whether another run finished, with no image stored")


@pytest.mark.parametrize("size", [1_000, 300_000])  # one chunk; three chunks of 128 KiB
async def test_a_new_image_reads_back_whole(images, size):
    js, obs = images
    name, data = f"job-{secrets.token_hex(6)}", os.urandom(size)
    stored = await store_of(js, obs).put(name, data, finished_elsewhere=never)
    info = await obs.get_info(name)
    assert (stored.nuid, stored.digest) == (info.nuid, info.digest)
    assert (info.size, info.chunks) == (size, -(-size // (128 * 1024)))
    assert (await obs.get(name)).data == data  # the client checks the digest too


async def test_an_earlier_try_s_image_is_replaced_and_its_chunks_dropped(images):
    js, obs = images
    name = f"job-{secrets.token_hex(6)}"
    await obs.put(name, b"first try")
    first = await obs.get_info(name)
    asked = []

    async def not_finished() -> bool:
        asked.append(name)
        return False

    assert await store_of(js, obs).put(name, b"second try", finished_elsewhere=not_finished) is not None
    assert asked == [name]
    assert (await obs.get(name)).data == b"second try"
    assert await chunk_messages(js, first.nuid) == 0


async def test_an_image_of_a_run_that_finished_first_stands(images):
    js, obs = images
    name = f"job-{secrets.token_hex(6)}"
    await obs.put(name, b"finished first")
    before = await js.stream_info(STREAM)

    async def finished() -> bool:
        return True

    assert await store_of(js, obs).put(name, b"finished second", finished_elsewhere=finished) is None
    assert (await obs.get(name)).data == b"finished first"
    after = await js.stream_info(STREAM)
    assert after.state.messages == before.state.messages  # its own chunk was dropped again


async def test_the_gateway_reads_an_image_of_many_chunks_whole_and_follows_a_replacement(images, service):
    """The gateway's read of a finished image: every chunk in one batched Direct Get, named by the
    record; a record naming chunks that a later try replaced reads the replacement through its
    description, as does a record without them (an image the result cache stored)."""
    from gateway.core.caller import SERVICE
    from schemas.status import ImageRef

    js, obs = images
    jobs = service.gateway.runner.app[SERVICE]
    name, data = f"job-{secrets.token_hex(6)}", os.urandom(1_000_000)  # 8 chunks
    stored = await store_of(js, obs).put(name, data, finished_elsewhere=never)
    ref = ImageRef(name=name, content_type="image/png", size=len(data), width=1, height=1, digest=stored.digest, chunks_id=stored.nuid)
    assert await jobs._read_image(ref) == data

    async def not_finished() -> bool:
        return False

    later = os.urandom(300_000)
    assert await store_of(js, obs).put(name, later, finished_elsewhere=not_finished) is not None
    assert await jobs._read_image(ref) == later  # the old chunks are gone; the description names the new
    plain = ImageRef(name=name, content_type="image/png", size=len(later), width=1, height=1)
    assert await jobs._read_image(plain) == later
