"""What becomes of a job's message after a try: the one place that acks, naks (with back-off) and terms,
writes the final state a try ends with, keeps a failed job's message in the dead letters (`imagegen.dlq`),
and records the try's outcome on the audit stream.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import TYPE_CHECKING

import msgpack
from nats.aio.msg import Msg

from gpu_worker.errors import JobCancelled, JobExpired, JobFailed, JobLost, Rerouted, RetryLater
from schemas import jobstore, names
from schemas.connect import BROKER_ERRORS
from schemas.events import JobEvent
from schemas.status import JobState, JobStatus

if TYPE_CHECKING:
    from gpu_worker.worker import Worker

log = logging.getLogger("imagegen.worker")

BROKER_TROUBLE = BROKER_ERRORS


def retry_delay(attempt: int) -> float:
    return min(30.0, 0.5 * 2 ** (attempt - 1))


async def settle(worker: Worker, msg: Msg, job_id: str, attempt: int, outcome: BaseException | None, duration: float) -> None:
    """Acks, naks or terms the message for this outcome. When the broker cannot be told (it is
    away), the message stays unacknowledged and comes back after the ack wait; the worker goes on."""
    try:
        await _settle(worker, msg, job_id, attempt, outcome, duration)
    except Exception as exc:
        worker.broker_trouble = True
        log.warning(
            "job %s try %d not settled (%s: %s); it is redelivered after %.0fs",
            job_id or "?", attempt, type(exc).__name__, exc, worker.settings.topology.ack_wait_s,
        )


async def _settle(worker: Worker, msg: Msg, job_id: str, attempt: int, outcome: BaseException | None, duration: float) -> None:
    tag = f"job {job_id or '?'} try {attempt}"
    if outcome is None:
        await msg.ack()
        log.info("%s done in %.2fs", tag, duration)
    elif isinstance(outcome, JobLost):  # the message is the other try's now: no ack, nak or term
        log.warning("%s lost the job after %.2fs: %s; stopped, nothing written", tag, duration, outcome.reason)
    elif isinstance(outcome, JobCancelled):
        await write_final(worker, job_id, JobState.CANCELLED, "cancelled")
        await msg.ack()
        log.info("%s cancelled after %.2fs", tag, duration)
    elif isinstance(outcome, JobExpired):
        await write_final(worker, job_id, JobState.EXPIRED, "expired in the queue before a worker took it")
        await msg.ack()
        log.info("%s expired", tag)
    elif isinstance(outcome, Rerouted):
        await msg.ack()
        log.info("job %s %s", job_id or "?", outcome.reason)
    elif isinstance(outcome, RetryLater):
        await worker.naks.nak(msg, outcome.delay_s, tag=tag)
        log.info("%s deferred %.1fs: %s", tag, outcome.delay_s, outcome.reason)
    elif isinstance(outcome, JobFailed):
        await dead_letter(worker, msg, job_id, attempt, outcome.reason)
        await msg.term()
        log.warning("%s failed after %.2fs: %s", tag, duration, outcome.reason)
    elif isinstance(outcome, BROKER_TROUBLE):
        worker.broker_trouble = True
        await worker.naks.nak(msg, retry_delay(attempt), tag=tag)
        log.warning("%s interrupted by the broker, will retry in %.1fs: %s", tag, retry_delay(attempt), outcome)
    else:
        reason = f"{type(outcome).__name__}: {outcome}"
        if attempt >= worker.settings.topology.max_deliver:
            await dead_letter(worker, msg, job_id, attempt, f"failed {attempt} times, last: {reason}")
            await msg.term()
            log.warning("%s crashed for the last time: %s", tag, reason)
        else:
            await worker.naks.nak(msg, retry_delay(attempt), tag=tag)
            log.warning("%s crashed, will retry in %.1fs: %s", tag, retry_delay(attempt), reason)


async def write_final(worker: Worker, job_id: str, state: JobState, reason: str) -> None:
    """Writes a final state unless the record has one already (then whoever wrote it told the client)."""
    if not job_id:
        return

    def to_final(s: JobStatus) -> JobStatus | None:
        if s.state.final:
            return None
        s.state, s.finished_at, s.error = state, time.time(), reason
        return s

    _, _, changed = await jobstore.change_status_at(worker.status_kv, job_id, to_final)
    if changed:
        await worker.events.publish(JobEvent(type=state.value, job_id=job_id, reason=reason))


async def dead_letter(worker: Worker, msg: Msg, job_id: str, attempt: int, reason: str) -> None:
    """Marks the job failed with the reason, then keeps the message in `imagegen.dlq`."""
    if job_id and re.fullmatch(r"[A-Za-z0-9_-]{8,64}", job_id):
        existing = await jobstore.read_status(worker.status_kv, job_id)
        if existing is None:
            await jobstore.create_status(worker.status_kv, JobStatus(job_id=job_id, submitted_at=time.time()))
        await write_final(worker, job_id, JobState.FAILED, reason)
    letter = {"job_id": job_id, "reason": reason, "subject": msg.subject, "attempt": attempt, "data": msg.data}
    packed = msgpack.packb(letter, use_bin_type=True)
    if len(packed) > worker.nc.max_payload - 4096:  # a job message near the size limit: keep its head
        letter |= {"data": msg.data[: worker.nc.max_payload // 2], "data_truncated_from": len(msg.data)}
        packed = msgpack.packb(letter, use_bin_type=True)
    await worker.js.publish(names.DLQ_SUBJECT, packed)


async def audit(worker: Worker, job_id: str, attempt: int, outcome: BaseException | None, duration: float) -> None:
    """The outcome of one try, for the audit stream IMAGEGEN_AUDIT."""
    result = "done" if outcome is None else type(outcome).__name__
    record = {
        "event": "outcome",
        "job_id": job_id,
        "attempt": attempt,
        "result": result,
        "reason": getattr(outcome, "reason", None) or (str(outcome) if outcome else None),
        "duration_s": round(duration, 4),
        "worker": worker.worker_id,
        "ts": time.time(),
    }
    try:
        await worker.nc.publish(names.AUDIT_SUBJECT, json.dumps(record).encode())
    except Exception as exc:
        log.warning("job %s audit record not published: %s", job_id, exc)
