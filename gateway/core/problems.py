"""The gateway's neutral exceptions: what the job service and the waiting raise, in no protocol's words.

Each API renders them in its own error shape.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.http.ratelimit import RateLimited
from gateway.state.stream_leader import NoLeader
from schemas.connect import BROKER_ERRORS
from schemas.request import RequestInvalid, field_named_by
from schemas.storage import StoreFull, full_message


class IdempotencyKeyReused(Exception):
    """An Idempotency-Key sent again with another request than the one it first came with: 422, as
    the IETF Idempotency-Key draft says."""

    def __init__(self, idempotency_key: str):
        shown = idempotency_key if len(idempotency_key) <= 80 else idempotency_key[:80] + "..."
        super().__init__(
            f"Idempotency-Key {shown!r} was first sent with another request; a retry must send the same body, "
            "a new request a new key"
        )
        self.idempotency_key = idempotency_key


class UnknownJob(LookupError):
    """No job with this id (or not one this caller may see)."""


class Forbidden(Exception):
    """The caller's key may not do this; the text says why."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


class NotReady(Exception):
    """The job has no image (yet, or ever); the text says which."""


class BrokerAway(ConnectionError):
    """The gateway is not connected to NATS right now (it is reconnecting): answered at once, not after a timeout."""


BROKER_DOWN = (BrokerAway, NoLeader, *BROKER_ERRORS)  # what a broker outage raises: 503 with Retry-After


class JobLost(LookupError):
    """A job vanished before it finished (its record expired or was removed while waited for)."""

    def __init__(self):
        super().__init__("an image job vanished before it finished")


class WaitTimedOut(TimeoutError):
    """The jobs were not finished within the wait; they are cancelled."""

    def __init__(self, wait_s: float):
        super().__init__(f"the images were not finished within {wait_s:g} seconds; their jobs are cancelled")
        self.wait_s = wait_s


class JobEnded(Exception):
    """A waited-for job ended otherwise than done: failed, cancelled or expired, with its reason."""

    def __init__(self, job_id: str, state: str, reason: str | None):
        self.job_id, self.state, self.reason = job_id, state, reason or state
        super().__init__(f"image job {job_id} {state}: {self.reason}")


class ImageLost(LookupError):
    """A done job's image could not be read."""

    def __init__(self, job_id: str, why: str):
        super().__init__(f"image job {job_id}: {why}")
        self.job_id = job_id


RETRY_AFTER_S = 2  # what a 503 asks a client to wait while the broker is away
BROKER_AWAY_MESSAGE = "the job broker (NATS) is unavailable; retry shortly"


@dataclass(frozen=True, kw_only=True)
class Problem:
    """One failure in no protocol's words: the HTTP status, a short code, the message, the request field
    it is about (None when none), and the seconds a client should wait before retrying (None: no advice)."""

    status: int
    code: str
    message: str
    field: str | None = None
    retry_after_s: int | None = None


def classify(exc: BaseException) -> Problem | None:
    """The neutral Problem for a failure the job service, the waiting, the rate limits or the broker
    raise; None for anything else (each API's renderer handles its own failures first)."""
    if isinstance(exc, RequestInvalid):
        first = exc.errors[0]["field"] if exc.errors else "body"
        return Problem(status=400, code="invalid_value", message=str(exc), field=first)
    if isinstance(exc, UnknownJob):
        return Problem(status=404, code="unknown_job", message=f"unknown task_id {exc.args[0]!r}" if exc.args else "unknown job")
    if isinstance(exc, NotReady):
        return Problem(status=404, code="not_ready", message=str(exc))
    if isinstance(exc, Forbidden):
        return Problem(status=403, code="forbidden", message=str(exc), field=exc.field)
    if isinstance(exc, IdempotencyKeyReused):
        return Problem(status=422, code="idempotency_key_reused", message=str(exc), field="Idempotency-Key")
    if isinstance(exc, RateLimited):
        return Problem(status=429, code="rate_limit_exceeded", message=str(exc), retry_after_s=exc.retry_after_s)
    if isinstance(exc, JobEnded):
        field = field_named_by(exc.reason)
        if exc.state == "failed" and field is not None:  # the job's request was at fault: the caller's to fix
            return Problem(status=400, code="invalid_value", message=str(exc), field=field)
        return Problem(status=502, code=f"job_{exc.state}", message=str(exc))
    if isinstance(exc, WaitTimedOut):
        return Problem(status=504, code="timeout", message=str(exc))
    if isinstance(exc, (JobLost, ImageLost)):
        return Problem(status=502, code="job_lost" if isinstance(exc, JobLost) else "image_lost", message=str(exc))
    if isinstance(exc, (StoreFull, *BROKER_DOWN)):
        if (full := full_message(exc)) is not None:  # a bucket at its max_bytes answers as a broker away would
            return Problem(status=507, code="storage_full", message=full)
        return Problem(status=503, code="service_unavailable", message=BROKER_AWAY_MESSAGE, retry_after_s=RETRY_AFTER_S)
    return None
