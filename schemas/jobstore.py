"""Status records in KV `imagegen-jobs`, changed only by compare-and-set so gateway and worker never
overwrite each other's facts (a cancel request and a finished image can race; both survive)."""

from __future__ import annotations

import time
from typing import Callable

from nats.js.errors import KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from nats.aio.client import Client as NATS

from schemas import names
from schemas.codec import decode, encode
from schemas.events import JobEvent
from schemas.status import JobState, JobStatus

Mutation = Callable[[JobStatus], "JobStatus | None"]


async def read_status(kv: KeyValue, job_id: str) -> JobStatus | None:
    status, _ = await read_status_at(kv, job_id)
    return status


async def read_status_at(kv: KeyValue, job_id: str) -> tuple[JobStatus | None, int]:
    """The record and its KV revision; (None, 0) for an unknown job."""
    try:
        entry = await kv.get(job_id)
    except (KeyNotFoundError, KeyDeletedError):
        return None, 0
    if not entry.value:
        return None, 0
    return decode(entry.value, JobStatus), entry.revision


async def create_status(kv: KeyValue, status: JobStatus) -> int | None:
    """Writes the first record of a job and returns its revision; None when the job id exists already
    (a repeated submit)."""
    try:
        return await kv.create(status.job_id, encode(status))
    except KeyWrongLastSequenceError:
        return None


async def change_status(kv: KeyValue, job_id: str, mutate: Mutation, *, tries: int = 20) -> JobStatus | None:
    """Applies `mutate` to the current record with compare-and-set, retrying on conflict.

    `mutate` gets a copy and returns the new record, or None to leave the record as it is. Returns the
    record as stored afterwards, or None if the job is unknown.
    """
    status, _, _ = await change_status_at(kv, job_id, mutate, tries=tries)
    return status


async def change_status_at(
    kv: KeyValue, job_id: str, mutate: Mutation, *, tries: int = 20, known: tuple[JobStatus, int] | None = None
) -> tuple[JobStatus | None, int, bool]:
    """`change_status`, also returning the KV revision of the record it returns (0 when unknown) and
    whether the change was applied (False when `mutate` left the record as it is, or the job is unknown).

    `known`: the record as this caller last read or wrote it, with its revision. The change is then
    written over it by compare-and-set without a read first; when the record changed meanwhile the
    write is refused and the change starts over from a fresh read. A mutation that leaves the known
    record as it is returns it unread.
    """
    if known is not None:
        status, revision = known
        changed = mutate(status.model_copy(deep=True))
        if changed is None:
            return status, revision, False
        try:
            return changed, await kv.update(job_id, encode(changed), last=revision), True
        except KeyWrongLastSequenceError:
            pass
    for _ in range(tries):
        try:
            entry = await kv.get(job_id)
        except (KeyNotFoundError, KeyDeletedError):
            return None, 0, False
        if not entry.value:
            return None, 0, False
        current = decode(entry.value, JobStatus)
        changed = mutate(current.model_copy(deep=True))
        if changed is None:
            return current, entry.revision, False
        try:
            return changed, await kv.update(job_id, encode(changed), last=entry.revision), True
        except KeyWrongLastSequenceError:
            continue
    raise RuntimeError(f"status of {job_id} kept changing under {tries} tries")


def cancel_mutation(status: JobStatus) -> JobStatus | None:
    """Marks a cancel request; a job still queued is cancelled at once. None for a finished job."""
    if status.state.final:
        return None
    status.cancel_requested = True
    if status.state is JobState.QUEUED:
        status.state, status.finished_at, status.error = JobState.CANCELLED, time.time(), "cancelled"
    return status


async def request_cancel(nc: NATS, kv: KeyValue, job_id: str) -> tuple[JobStatus | None, int]:
    """Cancels a job and says so: a queued job ends here, with its `cancelled` event; for a running one
    the job id goes out on CANCEL_SUBJECT so its worker stops at the next step. Returns the record and
    its revision (None, 0 for an unknown job)."""
    seen: list[JobState] = []

    def mutate(status: JobStatus) -> JobStatus | None:
        seen.append(status.state)
        return cancel_mutation(status)

    status, revision, _ = await change_status_at(kv, job_id, mutate)
    if status is None:
        return None, 0
    if seen and seen[-1] is JobState.QUEUED:
        event = JobEvent(type="cancelled", job_id=job_id, reason="cancelled")
        await nc.publish(names.events_subject(job_id), encode(event))
    elif status.state is JobState.RUNNING:
        await nc.publish(names.CANCEL_SUBJECT, job_id.encode())
    return status, revision
