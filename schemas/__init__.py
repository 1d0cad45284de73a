"""Wire types of imagegen: requests, job messages, status records, events, names and the codec.

A service that publishes jobs straight onto NATS needs only this package.
"""

from schemas.codec import SCHEMA_VERSION, DecodeError, decode, encode
from schemas.events import JobEvent
from schemas.job import JobEnvelope, new_job_id
from schemas.names import TIERS, Tier, events_subject
from schemas.request import DEFAULT_LIMITS, GenerateRequest, Limits, RequestInvalid, parse_request
from schemas.status import ImageRef, JobState, JobStatus, UploadRef

__all__ = [
    "DEFAULT_LIMITS",
    "SCHEMA_VERSION",
    "TIERS",
    "DecodeError",
    "GenerateRequest",
    "ImageRef",
    "JobEnvelope",
    "JobEvent",
    "JobState",
    "JobStatus",
    "Limits",
    "RequestInvalid",
    "Tier",
    "UploadRef",
    "decode",
    "encode",
    "events_subject",
    "new_job_id",
    "parse_request",
]
