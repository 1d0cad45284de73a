"""The job message that a gateway or a NATS publisher puts on `imagegen.jobs.<tier>`."""

from __future__ import annotations

import secrets
import time

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.names import Tier, jobs_subject
from schemas.plan import control_image_text
from schemas.request import MAX_IMAGES, GenerateRequest
from schemas.status import JobStatus, UploadRef

JOB_ID_BYTES = 16  # 128 random bits


def new_job_id() -> str:
    """A URL-safe id with 128 random bits; also the job message's Nats-Msg-Id."""
    return secrets.token_urlsafe(JOB_ID_BYTES)


def new_seed() -> int:
    return secrets.randbelow(2**32)


def group_job_ids(group_id: str, size: int) -> list[str]:
    """The jobs of a group of `size` images: `<group_id>-0`, `<group_id>-1`, ...; never more than
    MAX_IMAGES, whatever size a record read from the store claims."""
    return [f"{group_id}-{i}" for i in range(min(size, MAX_IMAGES))]


class Placement(BaseModel):
    """Where a job sits besides its request: the stored uploads it reads and its place in a group."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    init_image: UploadRef | None = Field(
        None, description="Image-to-image: the init image, an object in object store imagegen-uploads."
    )
    mask_image: UploadRef | None = Field(None, description="Inpainting: the mask, an object in imagegen-uploads.")
    control_image: UploadRef | None = Field(
        None, description="A plan's ControlNet stages: the control image, an object in imagegen-uploads (as init images travel)."
    )
    group_id: str | None = Field(
        None, min_length=8, max_length=60, pattern=r"^[A-Za-z0-9_-]+$", description="The request of n images this job belongs to."
    )
    group_index: int = Field(0, ge=0)
    group_size: int = Field(1, ge=1, le=MAX_IMAGES)

    @property
    def uploads(self) -> dict[str, UploadRef]:
        """The stored images, by request field."""
        pairs = (("init_image", self.init_image), ("mask_image", self.mask_image), ("control_image", self.control_image))
        return {name: ref for name, ref in pairs if ref is not None}

    @model_validator(mode="after")
    def _consistent(self) -> "Placement":
        if self.mask_image is not None and self.init_image is None:
            raise ValueError("mask_image: inpainting needs an init_image reference too")
        if self.group_index >= self.group_size:
            raise ValueError(f"group_index {self.group_index} is not below group_size {self.group_size}")
        return self

    @classmethod
    def of(cls, status: JobStatus) -> "Placement":
        """The placement a job's record holds."""
        return cls(
            init_image=status.init_image, mask_image=status.mask_image, control_image=status.control_image, group_id=status.group_id,
            group_index=status.group_index, group_size=status.group_size,
        )


class JobEnvelope(Placement):
    """What travels on the job stream: the request, its seed and tier, and the placement fields
    (uploads, group) at the top level. The request inside is validated again by the worker."""

    model_config = ConfigDict(extra="forbid", frozen=False)

    job_id: str = Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    request: GenerateRequest
    seed: int = Field(ge=0, description="The seed used: the request's, or one the submitter picked.")
    tier: Tier = Tier.NORMAL
    submitted_at: float = Field(default_factory=time.time)
    owner: str | None = Field(None, description="Name of the API key that submitted the job.")
    deadline: float | None = Field(None, description="Epoch seconds after which a queued job is not started.")

    @model_validator(mode="after")
    def _one_image_by_reference(self) -> "JobEnvelope":
        if self.request.init_image is not None or self.request.mask_image is not None:
            raise ValueError(
                "images travel through object store imagegen-uploads: store them there and set the job's "
                "init_image / mask_image references, not the request's base64 fields"
            )
        if control_image_text(self.request) is not None:
            raise ValueError(
                "controlnet: the control image travels through object store imagegen-uploads: store it there and set the "
                "job's control_image reference, not the request's base64 field"
            )
        if self.request.n != 1:
            raise ValueError(
                "n: one job message makes one image; publish one per image (seeds seed, seed+1, ...) with a shared group_id"
            )
        return self

    @classmethod
    def for_request(
        cls,
        request: GenerateRequest,
        *,
        job_id: str | None = None,
        owner: str | None = None,
        default_timeout_s: float | None = None,
        placement: Placement | None = None,
    ) -> "JobEnvelope":
        """The job message for a one-image request; `placement`: the uploads it reads and its group."""
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
            **dict(placement or Placement()),
        )

    @property
    def subject(self) -> str:
        """Where the job message goes: its tier's subject, in its model's lane when it names one."""
        return jobs_subject(self.tier, self.request.model)

    def queued_status(self) -> JobStatus:
        """The first status record of this job."""
        return JobStatus(
            job_id=self.job_id,
            tier=self.tier,
            request=self.request.model_dump(mode="json", exclude_none=True),
            seed=self.seed,
            owner=self.owner,
            submitted_at=self.submitted_at,
            deadline=self.deadline,
            init_image=self.init_image,
            mask_image=self.mask_image,
            control_image=self.control_image,
            group_id=self.group_id,
            group_index=self.group_index,
            group_size=self.group_size,
        )
