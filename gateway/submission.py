"""One request onto the queue, for every API of the gateway: its init and mask images checked and stored
in object store `imagegen-uploads`, then its `n` images as n jobs with seeds seed, seed+1, ... grouped
under one group id (job ids `<group_id>-0`, `<group_id>-1`, ...), all sharing the stored images
(`schemas.group`).

What refuses a request without looking at its images comes first: a blocked prompt, a tier or an `n`
the caller's key may not use, a quota with no room for n more jobs. A group is queued whole or not at
all: when job k cannot be queued (a rate limit, say), the jobs this call queued before it are deleted
again, with the images it stored, and the error goes to the caller; except when the broker went away
under a request with an Idempotency-Key: its records stay, so that the retry (after the 503) finds them.

A repeat with the same Idempotency-Key and the same request (its fingerprint, kept in each job's record)
answers the jobs the first call queued, before the key's quota
or rate is looked at: a job still queued is published again (the first call may have stopped before
publishing it), and a job missing from a group the first call did not finish is queued now, reading
the images the first call stored. A repeat with another request is IdempotencyKeyReused (422).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

from gateway.auth import ApiKey
from gateway.jobs import BROKER_DOWN, JobService, UnknownJob, check_same_request, idempotent_job_id, request_digest
from gateway.webhooks import check_destination
from schemas import jobstore, uploads
from schemas.group import GroupPlan, plan_group, store_uploads
from schemas.job import Placement, group_job_ids
from schemas.plan import control_image_text
from schemas.request import GenerateRequest
from schemas.status import JobStatus, UploadRef

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
    jobs.check_allowed(request, key)
    if request.webhook is not None:  # kept as checked: the call goes to the host as an HTTP client reads it
        webhook = check_destination(request.webhook, allow_private=jobs.settings.webhook_allow_private)
        request = request.model_copy(update={"webhook": webhook})
    plan = plan_group(request, first_id=idempotent_job_id(owner, idempotency_key) if idempotency_key else None)
    digest = request_digest(request) if idempotency_key else None
    earlier = await _earlier_records(jobs, plan) if idempotency_key else []
    for status in earlier + (await _other_shape(jobs, plan) if idempotency_key else []):
        if status is not None:
            check_same_request(status, digest, idempotency_key)
    known = next((s for s in earlier if s is not None), None)
    if known is not None and plan.group_id:  # jobs still to queue continue the first call's seeds
        plan = replace(plan, first_seed=max(0, known.seed - known.group_index))
    missing = sum(1 for status in earlier if status is None) if earlier else len(plan.job_ids)
    if key is not None and missing:
        jobs.check_quota(key, missing)
    if request.init_image is None and control_image_text(request) is None:  # nothing to decode: no thread
        prepared = uploads.prepare(request, jobs.settings.limits)
    else:
        prepared = await asyncio.to_thread(uploads.prepare, request, jobs.settings.limits)
    live = [s for s in earlier if s is not None and not s.deleted]
    created: set[str] = set()
    stored: dict[str, UploadRef] = {}
    queued: list[JobStatus] = []
    try:
        if live:
            shared = Placement.of(live[0]).uploads  # the images the first call stored
        elif prepared.uploads and missing:
            jobs.connected()
            stored = shared = await store_uploads(
                jobs.uploads, plan, prepared.uploads, timeout_s=jobs.settings.nats_timeout_s * 6
            )
        else:
            shared = {}
        for member in plan.members(prepared.request, shared):
            queued.append(
                await jobs.submit(
                    member.request,
                    owner=owner,
                    key=key,
                    job_id=member.job_id,
                    idempotency_key=idempotency_key,
                    digest=digest,
                    placement=member.placement,
                    created=created,
                )
            )
    except BaseException as exc:
        if idempotency_key and isinstance(exc, BROKER_DOWN):
            raise  # kept for the retry with the same key, which publishes what is still queued
        await _undo(jobs, plan, created, stored, owner)
        raise
    if plan.group_id:
        log.info("group %s queued: %s", plan.group_id, plan.describe(), extra={"job_id": plan.job_ids[0]})
    return queued


async def _earlier_records(jobs: JobService, plan: GroupPlan) -> list[JobStatus | None]:
    """The records an earlier call with the same Idempotency-Key left, one per job (None: not queued)."""
    jobs.connected()
    return [await jobstore.read_status(jobs.status_kv, job_id) for job_id in plan.job_ids]


async def _other_shape(jobs: JobService, plan: GroupPlan) -> list[JobStatus | None]:
    """The record the same Idempotency-Key left for a request of the other shape (one image where this
    one is a group, or the group's first job where this is one image), whose ids differ from this plan's."""
    first_id = plan.group_id or plan.job_ids[0]
    other = plan.group_id if plan.group_id else group_job_ids(first_id, 1)[0]
    return [await jobstore.read_status(jobs.status_kv, other)]


async def _undo(jobs: JobService, plan: GroupPlan, created: set[str], stored: dict[str, UploadRef], owner: str | None) -> None:
    """Takes back what this call queued and stored, and nothing else: the jobs whose records it wrote
    (deleting them releases their images) and the images it stored."""
    try:
        for job_id in plan.job_ids:
            if job_id in created:
                await jobs.delete(job_id, owner=owner)
        await uploads.delete(jobs.uploads, [ref.name for ref in stored.values()])
    except Exception as exc:  # best effort: what is left expires with the buckets' TTL
        log.warning(
            "request %s: taking back a partly queued request failed: %s", plan.upload_prefix, exc,
            extra={"job_id": plan.job_ids[0]},
        )


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
