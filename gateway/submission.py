"""One request onto the queue, for every API of the gateway: its init and mask images checked and stored
in object store `imagegen-uploads`, then its `n` images as n jobs with seeds seed, seed+1, ... grouped
under one group id (job ids `<group_id>-0`, `<group_id>-1`, ...), all sharing the stored images.

A group is queued whole or not at all: when job k cannot be queued (a quota, say), the jobs before it
are deleted again and the error goes to the caller.
"""

from __future__ import annotations

import asyncio
import logging

from gateway.auth import ApiKey
from gateway.jobs import JobService, UnknownJob, idempotent_job_id
from schemas import jobstore, uploads
from schemas.job import group_job_ids, new_job_id, new_seed
from schemas.request import GenerateRequest
from schemas.status import JobStatus

log = logging.getLogger("imagegen.gateway")


async def submit_request(
    jobs: JobService,
    request: GenerateRequest,
    *,
    owner: str | None = None,
    key: ApiKey | None = None,
    idempotency_key: str | None = None,
) -> list[JobStatus]:
    """Queues the request's n jobs and returns their first status records, in seed order."""
    prepared = await asyncio.to_thread(uploads.prepare, request, jobs.settings.limits)
    request, n = prepared.request, prepared.request.n
    first_id = idempotent_job_id(owner, idempotency_key) if idempotency_key else new_job_id()
    group_id = first_id if n > 1 else None
    job_ids = group_job_ids(group_id, n) if group_id else [first_id]
    if idempotency_key and prepared.uploads:  # a repeated submit: answer what the first one queued
        jobs.connected()
        existing = [s for s in [await jobstore.read_status(jobs.status_kv, j) for j in job_ids] if s is not None]
        if existing:
            return existing
    placement: dict = {"group_id": group_id, "group_size": n}
    if prepared.uploads:
        jobs.connected()
        for upload in prepared.uploads:
            name = uploads.object_name(group_id or first_id, upload.field)
            placement[upload.field] = await uploads.store(jobs.uploads, name, upload, timeout_s=jobs.settings.nats_timeout_s * 6)
    first_seed = request.seed if request.seed is not None or n == 1 else new_seed()
    queued: list[JobStatus] = []
    try:
        for i, job_id in enumerate(job_ids):
            seed = first_seed + i if first_seed is not None else None
            queued.append(
                await jobs.submit(
                    request.model_copy(update={"n": 1, "seed": seed}),
                    owner=owner,
                    key=key,
                    job_id=job_id,
                    idempotency_key=idempotency_key if n == 1 else None,
                    placement={**placement, "group_index": i},
                )
            )
    except BaseException:
        await _undo(jobs, queued, placement, owner)
        raise
    if group_id:
        log.info("group %s queued: %d jobs, seeds %d..%d", group_id, n, first_seed, first_seed + n - 1)
    return queued


async def _undo(jobs: JobService, queued: list[JobStatus], placement: dict, owner: str | None) -> None:
    """Takes back a group queued in part: deletes its jobs (which releases the uploads), or the uploads
    alone when no job was queued."""
    try:
        if queued:
            for status in queued:
                await jobs.delete(status.job_id, owner=owner)
        else:
            stored = [ref.name for ref in (placement.get("init_image"), placement.get("mask_image")) if ref is not None]
            await uploads.delete(jobs.uploads, stored)
    except Exception as exc:  # best effort: what is left expires with the buckets' TTL
        log.warning("group %s: taking back a partly queued request failed: %s", placement.get("group_id"), exc)


async def group_jobs(jobs: JobService, group_id: str, *, owner: str | None = None) -> list[JobStatus]:
    """The jobs of a group that still exist (not deleted), in seed order; UnknownJob when none does."""
    size = 0
    for job_id in group_job_ids(group_id, jobs.settings.limits.max_images):  # any member tells the size
        try:
            size = (await jobs.get(job_id, owner=owner)).group_size
            break
        except UnknownJob:
            continue
    members: list[JobStatus] = []
    for job_id in group_job_ids(group_id, size):
        try:
            members.append(await jobs.get(job_id, owner=owner))
        except UnknownJob:
            continue
    if not members:
        raise UnknownJob(group_id)
    return members
