"""What the Python client raises: `ImagegenError` for whatever the gateway or NATS refuses, `JobFailed`
(`JobCancelled`) for a job that ends without an image, `JobTimeout` for one that does not end in time."""

from __future__ import annotations

from schemas.request import RequestInvalid
from schemas.status import JobState


class ImagegenError(Exception):
    """The gateway or NATS refused a call; the text says why. `status` is the HTTP status (None over
    NATS or when the gateway is unreachable), `field` the request field at fault when there is one."""

    def __init__(self, message: str, *, status: int | None = None, field: str | None = None):
        super().__init__(message)
        self.status = status
        self.field = field


class JobFailed(ImagegenError):
    """The job ended without an image: failed, cancelled or expired; `reason` says why."""

    def __init__(self, job_id: str, state: str, reason: str | None):
        self.job_id, self.state, self.reason = job_id, state, reason or state
        super().__init__(f"job {job_id} {state}: {self.reason}")


class JobCancelled(JobFailed):
    """The job was cancelled before it finished."""


class JobTimeout(ImagegenError, TimeoutError):
    """The job did not finish within the time the caller gave it."""


def job_failed(job_id: str, state: str, reason: str | None) -> JobFailed:
    kind = JobCancelled if state == JobState.CANCELLED.value else JobFailed
    return kind(job_id, state, reason)


def invalid(exc: RequestInvalid) -> ImagegenError:
    return ImagegenError(str(exc), status=400, field=exc.errors[0]["field"] if exc.errors else None)
