"""One request onto the queue, for every API of the gateway: its init and mask images checked and stored
in object store `imagegen-uploads`, then its `n` images as n jobs with seeds seed, seed+1, ... grouped
under one group id (job ids `<group_id>-0`, `<group_id>-1`, ...), all sharing the stored images
(`schemas.group`).

What refuses a request without looking at its images comes first: a blocked prompt, a tier or an `n`
the caller's key may not use, a quota with no room for n more jobs (`gateway.state.quota` reserves their
places for every gateway at once; a call that queues nothing gives them back). A group is queued whole or not at
all: when job k cannot be queued (a rate limit, say), the jobs this call queued before it are deleted
again, with the images it stored, and the error goes to the caller; except when the broker went away
under a request with an Idempotency-Key: its records stay, so that the retry (after the 503) finds them.
Without a key, what a 503'd call wrote is taken back after the answer (the broker may take a while
to answer again): a record whose write went unanswered may be stored, and is then kept as a deleted
record (404 everywhere, gone with the job TTL), so that a worker given its job, if that was stored
too, ends it instead of running it.

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

from gateway.http.auth import ApiKey
from gateway.core.problems import BROKER_DOWN, UnknownJob
from gateway.core.service import JobService, check_same_request, idempotent_job_id, request_digest
from gateway.http.webhooks import check_destination
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
    reserved: list[str] = []  # this call's places in the key's quota, given back if it queues nothing
    if key is not None and missing:
        reserved = [job_id for job_id, status in zip(plan.job_ids, earlier or [None] * missing) if status is None]
        await jobs.reserve_quota(key, reserved)
    try:
        if request.init_image is None and control_image_text(request) is None:  # nothing to decode: no thread
            prepared = uploads.prepare(request, jobs.settings.limits)
        else:
            prepared = await asyncio.to_thread(uploads.prepare, request, jobs.settings.limits)
    except BaseException:
        if reserved:
            await jobs.release_quota(key, reserved)
        raise
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
        if isinstance(exc, BROKER_DOWN):
            jobs.leaders.lost(exc)  # submits are refused at once until the job streams answer
            # With a key, kept for the retry with the same key, which publishes what is still queued;
            # without, taken back once the broker answers: the 503 goes out now.
            if not idempotency_key and (created or stored or reserved):
                _later(_undo(jobs, plan, created, stored, owner, key=key, reserved=reserved, tries=UNDO_TRIES))
            raise
        await _undo(jobs, plan, created, stored, owner, key=key, reserved=reserved)
        raise
    if plan.group_id:
        log.info("group %s queued: %s", plan.group_id, plan.describe(), extra={"job_id": plan.job_ids[0]})
    return queued


async def _earlier_records(jobs: JobService, plan: GroupPlan) -> list[JobStatus | None]:
    """The records an earlier call with the same Idempotency-Key left, one per job (None: not queued)."""
    jobs.connected()
    jobs.leaders.check()
    try:
        return [await jobstore.read_status(jobs.submit_kv, job_id) for job_id in plan.job_ids]
    except BROKER_DOWN as exc:
        jobs.leaders.lost(exc)
        raise


async def _other_shape(jobs: JobService, plan: GroupPlan) -> list[JobStatus | None]:
    """The record the same Idempotency-Key left for a request of the other shape (one image where this
    one is a group, or the group's first job where this is one image), whose ids differ from this plan's."""
    first_id = plan.group_id or plan.job_ids[0]
    other = plan.group_id if plan.group_id else group_job_ids(first_id, 1)[0]
    try:
        return [await jobstore.read_status(jobs.submit_kv, other)]
    except BROKER_DOWN as exc:
        jobs.leaders.lost(exc)
        raise


UNDO_TRIES = 60  # a second apart: the taking back after a 503 outlasts an election or a broker restart
_taking_back: set[asyncio.Task] = set()


def _later(undo) -> None:
    task = asyncio.ensure_future(undo)
    _taking_back.add(task)
    task.add_done_callback(_taking_back.discard)


async def _undo(
    jobs: JobService, plan: GroupPlan, created: set[str], stored: dict[str, UploadRef], owner: str | None,
    *, key: ApiKey | None = None, reserved: list[str] = (), tries: int = 1,
) -> None:
    """Takes back what this call queued and stored, and nothing else: the jobs whose records it wrote
    (deleting them releases their images), the images it stored, and its places in the key's quota;
    `tries` times, a second apart, while the broker does not answer."""
    left = [job_id for job_id in plan.job_ids if job_id in created]
    for attempt in range(1, tries + 1):
        try:
            while left:
                try:
                    await jobs.delete(left[0], owner=owner)
                except UnknownJob:  # its write never landed
                    pass
                left.pop(0)
            await uploads.delete(jobs.uploads, [ref.name for ref in stored.values()])
            if key is not None and reserved:
                await jobs.release_quota(key, reserved)
            return
        except Exception as exc:  # best effort: what is left expires with the buckets' TTL
            if attempt < tries and isinstance(exc, BROKER_DOWN):
                await asyncio.sleep(1.0)
                continue
            log.warning(
                "request %s: taking back a partly queued request failed: %s", plan.upload_prefix, exc,
                extra={"job_id": plan.job_ids[0]},
            )
            return


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
