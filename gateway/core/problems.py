"""The gateway's neutral exceptions: what the job service and the waiting raise, in no protocol's words.

Each API renders them in its own error shape.
"""

from __future__ import annotations

from gateway.state.stream_leader import NoLeader
from schemas.connect import BROKER_ERRORS


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
