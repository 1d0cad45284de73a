"""The job message that a gateway or a NATS publisher puts on `imagegen.jobs.<tier>`."""

from __future__ import annotations

import secrets
import time

from pydantic import BaseModel, ConfigDict, Field

from schemas.names import Tier
from schemas.request import GenerateRequest

JOB_ID_BYTES = 16  # 128 random bits


def new_job_id() -> str:
    """A URL-safe id with 128 random bits; also the job message's Nats-Msg-Id."""
    return secrets.token_urlsafe(JOB_ID_BYTES)


def new_seed() -> int:
    return secrets.randbelow(2**32)


class JobEnvelope(BaseModel):
    """What travels on the job stream. The request inside is validated again by the worker."""

    model_config = ConfigDict(extra="forbid")

    job_id: str = Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    request: GenerateRequest
    seed: int = Field(ge=0, description="The seed used: the request's, or one the submitter picked.")
    tier: Tier = Tier.NORMAL
    submitted_at: float = Field(default_factory=time.time)
    owner: str | None = Field(None, description="Name of the API key that submitted the job.")
    deadline: float | None = Field(None, description="Epoch seconds after which a queued job is not started.")

    @classmethod
    def for_request(
        cls,
        request: GenerateRequest,
        *,
        job_id: str | None = None,
        owner: str | None = None,
        default_timeout_s: float | None = None,
    ) -> "JobEnvelope":
        submitted_at = time.time()
        timeout_s = request.timeout_s or default_timeout_s
        return cls(
            job_id=job_id or new_job_id(),
            request=request,
            seed=request.seed if request.seed is not None else new_seed(),
            tier=request.effective_tier,
            owner=owner,
            submitted_at=submitted_at,
            deadline=submitted_at + timeout_s if timeout_s else None,
        )
