"""A request of n images as n jobs: the gateway and the Python client's NATS path both queue through here.

The jobs are `<group_id>-0`, `<group_id>-1`, ... (one job: an id of its own, no group), with seeds
seed, seed+1, ...; a request without a seed gets one picked for the group, and those jobs keep out of
the result cache unless the request asked for it (`cache: true`), since the caller never chose that
seed. The request's init and mask images are stored once, under the group's id, and every job reads
them (`Placement`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from schemas import uploads
from schemas.job import Placement, group_job_ids, new_job_id, new_seed
from schemas.request import GenerateRequest
from schemas.status import UploadRef

log = logging.getLogger("imagegen.group")


@dataclass(frozen=True, kw_only=True)
class GroupMember:
    """One job of a group: its id, its one-image request (with its seed) and its placement."""

    job_id: str
    request: GenerateRequest
    placement: Placement


@dataclass(frozen=True, kw_only=True)
class GroupPlan:
    """The ids and seeds of a request's jobs, fixed before anything is stored or queued."""

    group_id: str | None
    job_ids: list[str]
    first_seed: int | None  # None: one job without a seed, its submitter picks one

    @property
    def upload_prefix(self) -> str:
        """Uploads lie under `<group_id>/` (one job: `<job_id>/`)."""
        return self.group_id or self.job_ids[0]

    def members(self, request: GenerateRequest, stored: dict[str, UploadRef]) -> list[GroupMember]:
        """The jobs to queue for `request` (as prepared: its images taken out), each reading the
        uploads in `stored` (by request field)."""
        n = len(self.job_ids)
        update: dict[str, Any] = {"n": 1}
        if request.seed is None and request.cache is None and n > 1:
            update["cache"] = False  # a seed picked here is no seed the caller could ask for again
        return [
            GroupMember(
                job_id=job_id,
                request=request.model_copy(update={**update, "seed": self.first_seed + i if self.first_seed is not None else None}),
                placement=Placement(
                    init_image=stored.get("init_image"),
                    mask_image=stored.get("mask_image"),
                    control_image=stored.get("control_image"),
                    group_id=self.group_id,
                    group_index=i,
                    group_size=n,
                ),
            )
            for i, job_id in enumerate(self.job_ids)
        ]

    def describe(self) -> str:
        seeds = f", seeds {self.first_seed}..{self.first_seed + len(self.job_ids) - 1}" if self.first_seed is not None else ""
        return f"{len(self.job_ids)} jobs{seeds}"


def plan_group(request: GenerateRequest, *, first_id: str | None = None) -> GroupPlan:
    """Plans the request's `n` jobs; `first_id` (an idempotent id, say) names the job or the group.
    Only the request's n and seed count, so the plan may be made before its images are decoded."""
    n = request.n
    first_id = first_id or new_job_id()
    group_id = first_id if n > 1 else None
    return GroupPlan(
        group_id=group_id,
        job_ids=group_job_ids(group_id, n) if group_id else [first_id],
        first_seed=request.seed if request.seed is not None or n == 1 else new_seed(),
    )


async def store_uploads(obs: Any, plan: GroupPlan, prepared: list[uploads.Upload], *, timeout_s: float) -> dict[str, UploadRef]:
    """Stores the request's checked images in object store `imagegen-uploads` (`obs`) under the plan's
    prefix; when one cannot be stored, those stored before it are removed again and the error raised."""
    stored: dict[str, UploadRef] = {}
    try:
        for upload in prepared:
            name = uploads.object_name(plan.upload_prefix, upload.field)
            stored[upload.field] = await uploads.store(obs, name, upload, timeout_s=timeout_s)
    except BaseException:
        try:
            await uploads.delete(obs, [ref.name for ref in stored.values()])
        except Exception as exc:  # best effort: what is left expires with the bucket's TTL
            log.warning("uploads of %s not removed after a failed store: %s", plan.upload_prefix, exc)
        raise
    return stored
