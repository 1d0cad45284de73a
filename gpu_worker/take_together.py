"""Taking jobs together (`--max-batch`): after a job, more from its lane while each shares its engine
batch key; they then meet at the engine in a `Gathering` (batching.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nats.aio.msg import Msg

from gpu_worker.admit import generation_task
from gpu_worker.outcomes import BROKER_TROUBLE
from schemas import names
from schemas.codec import DecodeError, decode
from schemas.job import JobEnvelope

if TYPE_CHECKING:
    from gpu_worker.worker import Worker


def batch_key(worker: Worker, msg: Msg) -> tuple | None:
    """The engine's batch key of the job in `msg`; None when it runs alone (or cannot be read)."""
    engine = worker.engine
    if not (msg.headers or {}).get(names.MSG_ID_HEADER) or not hasattr(engine, "batch_key"):
        return None
    try:
        envelope = decode(msg.data, JobEnvelope)
    except DecodeError:
        return None
    request = envelope.request
    if envelope.init_image or envelope.mask_image or (request.model and request.model != engine.name):
        return None
    if request.use_refiner and not engine.has_refiner:
        return None
    return engine.batch_key(generation_task(worker, envelope))


async def take_together(worker: Worker, first: Msg) -> list[Msg]:
    """`first`, and up to `max_batch - 1` more jobs waiting on its lane while each shares its batch
    key; the first that does not is kept too (it is taken already) and runs alone beside them."""
    most = worker.settings.max_batch
    if most <= 1 or not hasattr(worker.engine, "generate_batch"):
        return [first]
    key = batch_key(worker, first)
    if key is None:
        return [first]
    try:  # a request's n images are published one after another: the rest may be a moment behind
        envelope = decode(first.data, JobEnvelope)
        siblings = envelope.group_size - envelope.group_index - 1 if envelope.group_id else 0
    except DecodeError:
        siblings = 0
    taken = [first]
    while len(taken) < most and not worker.stopping.is_set():
        try:
            msg = await worker.puller.take_more(first.subject, wait_s=0.1 if siblings > len(taken) - 1 else 0.0)
        except BROKER_TROUBLE:
            break
        if msg is None:
            break
        taken.append(msg)
        if batch_key(worker, msg) != key:
            break
    return taken
