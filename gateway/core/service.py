"""What the gateway does with jobs, over JetStream: submit, read, cancel, fetch, delete.

Handlers in `gateway.apis` (`mflux.py`, `native.py`, ...) are thin translations onto these calls.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time
from typing import Awaitable, Callable

from nats.aio.client import Client as NATS
from nats.js.errors import KeyDeletedError, KeyNotFoundError

from gateway.state import quota
from gateway.http import ratelimit
from gateway.http.auth import ApiKey
from gateway.core.admission import check_controlnets
from gateway.core.records import JobRecords
from gateway.core.problems import BROKER_DOWN, BrokerAway, Forbidden, IdempotencyKeyReused
from gateway.state.cache import ResultCache
from gateway.state.direct_get import DirectReader
from gateway.state.event_hub import EventHub
from gateway.state.forecast import EtaCache
from gateway.state.fresh_images import FreshImages
from gateway.state.model_views import ModelViews
from gateway.state.object_read import ObjectReader
from gateway.state.queue_view import QueueView
from gateway.state.stream_leader import StreamLeaders
from gateway.settings import GatewaySettings
from gateway.http.webhooks import WebhookOutbox
from schemas import jobstore, names, storage, uploads
from schemas.codec import encode
from schemas.connect import BROKER_ERRORS, connect
from schemas.enqueue import enqueue, publish_job
from schemas.events import JobEvent
from schemas.follow import final_event
from schemas.jetstream import MAX_BYTES_FLAG, ensure_topology
from schemas.job import JobEnvelope, Placement
from schemas.plan import uses_refiner
from schemas.request import GenerateRequest, RequestInvalid
from schemas.status import JobState, JobStatus

log = logging.getLogger("imagegen.gateway")
audit_log = logging.getLogger("imagegen.audit")


def idempotent_job_id(owner: str | None, idempotency_key: str) -> str:
    """The same (key, Idempotency-Key) always names the same job, so a retried submit finds it."""
    digest = hashlib.sha256(f"{owner or ''}\n{idempotency_key}".encode()).digest()
    return base64.urlsafe_b64encode(digest[:16]).decode().rstrip("=")


def request_digest(request: GenerateRequest) -> str:
    """A fingerprint of a request as validated (defaults filled in, so two bodies that ask the same
    match): the record of a job queued under an Idempotency-Key keeps it, and a repeat of the key with
    another request is refused (IdempotencyKeyReused)."""
    fields = json.dumps(request.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(fields.encode()).hexdigest()



def check_same_request(existing: JobStatus, digest: str | None, idempotency_key: str | None) -> None:
    """IdempotencyKeyReused when `existing` was queued under the key for another request than `digest`
    (a record without a fingerprint, written before they were kept, passes)."""
    if idempotency_key and digest and existing.request_digest and existing.request_digest != digest:
        raise IdempotencyKeyReused(idempotency_key)


def redacted(request: dict, redact: bool) -> dict:
    if not redact:
        return request
    out = dict(request)
    for name in ("prompt", "negative_prompt"):
        if out.get(name):
            out[name] = "sha256:" + hashlib.sha256(out[name].encode()).hexdigest()[:16]
    return out


DEFAULT_MODEL_KEY = "default_model"


class JobService(JobRecords):
    """The protocol-neutral job service: its connections and mirrors, admission and submit (here), and
    what is done with jobs once queued (`JobRecords`)."""

    def __init__(self, settings: GatewaySettings):
        self.settings = settings
        self.start_hooks: list[Callable[[JobService], Awaitable[None]]] = []  # run at the end of start()
        self.view = QueueView(worker_ttl_s=settings.topology.worker_ttl_s)
        self.etas = EtaCache(self.view)
        self.model_views = ModelViews(self.view, self.etas)  # positions and ETAs among one model's jobs
        self.cache = ResultCache(
            ttl_s=settings.cache_ttl_s, scope=settings.cache_scope, replicas=settings.topology.replicas,
            max_bytes=settings.topology.cache_max_bytes,
        )
        self.submit_listeners: list[Callable[[JobStatus], None]] = []  # called once per job a submit created
        self.fresh = FreshImages(self._read_image)  # images of jobs queued here, read as they are done
        self.view.listeners.append(self.fresh.on_change)
        self.final_waiters: dict[str, set[asyncio.Future[None]]] = {}  # job id -> callers waiting for its end
        self.view.listeners.append(self._wake_final_waiters)
        self.outbox = WebhookOutbox(window_s=settings.topology.duplicate_window_s)
        self.view.listeners.append(self.outbox.on_change)
        self.nc: NATS | None = None
        self.default_model: str | None = None

    async def start(self) -> None:
        self.nc = await connect(self.settings.nats_url, name="imagegen-gateway", on_reconnect=self.view.rewatch)
        self.js = self.nc.jetstream(timeout=self.settings.nats_timeout_s)
        await ensure_topology(self.js, self.settings.topology)
        self.status_kv = await self.js.key_value(names.STATUS_BUCKET)
        # A submit's own writes (its record, its job) wait `submit_timeout_s`: unanswered, the cluster
        # is electing a leader, and the caller gets 503 now rather than after `nats_timeout_s`.
        self.submit_js = self.nc.jetstream(timeout=self.settings.submit_timeout_s)
        self.submit_kv = await self.submit_js.key_value(names.STATUS_BUCKET)
        self.leaders = StreamLeaders(self.nc)
        await self.leaders.start()
        self.workers_kv = await self.js.key_value(names.WORKERS_BUCKET)
        self.config_kv = await self.js.key_value(names.CONFIG_BUCKET)
        self.rate_kv = await self.js.key_value(names.RATE_BUCKET)
        self.quota_kv = await self.js.key_value(names.QUOTA_BUCKET)
        self.submit_quota_kv = await self.submit_js.key_value(names.QUOTA_BUCKET)  # a submit's places, short timeout
        self.images = await self.js.object_store(names.IMAGES_BUCKET)
        self.uploads = await self.js.object_store(names.UPLOADS_BUCKET)
        self.outbox.start(self.js)
        self.view.start(self.status_kv, self.workers_kv)
        await asyncio.wait_for(self.view.ready.wait(), timeout=30)
        self.direct = DirectReader(self.nc, timeout_s=self.settings.nats_timeout_s)
        await self.direct.start()
        self.image_reader = ObjectReader(self.js, self.direct, self.images, names.IMAGES_BUCKET)
        self.upload_reader = ObjectReader(self.js, self.direct, self.uploads, names.UPLOADS_BUCKET)
        await self.cache.start(self.js, view=self.view, direct=self.direct, read_image=self._image_bytes)
        self.events = EventHub(self.js, self.direct)
        await self.events.start()
        for hook in self.start_hooks:  # what an API keeps beside the jobs (ComfyUI's prompt records)
            await hook(self)
        self._sweeper = asyncio.create_task(self._sweep())

    async def close(self) -> None:
        sweeper = getattr(self, "_sweeper", None)
        if sweeper is not None:
            sweeper.cancel()
        if getattr(self, "leaders", None) is not None:
            await self.leaders.close()
        await self.cache.close()
        for reader in (getattr(self, "events", None), getattr(self, "direct", None)):  # as far as start got
            if reader is not None:
                await reader.close()
        self.fresh.close()
        await self.view.stop()
        await self.outbox.close()
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.drain()

    def connected(self) -> None:
        """Raises BrokerAway while the NATS connection is down, so a write fails now instead of
        waiting `nats_timeout_s` for an answer that cannot come."""
        if self.nc is None or not self.nc.is_connected:
            raise BrokerAway("not connected to NATS")

    # -- models ---------------------------------------------------------------------------------

    def served_models(self) -> dict[str, list]:
        models: dict[str, list] = {}
        for worker in self.view.live_workers():
            models.setdefault(worker.model, []).append(worker)
        return models

    def loaded_loras(self, model: str | None, served: dict[str, list] | None = None) -> set[str] | None:
        """The LoRA adapters the live workers of `model` (of any model for None) loaded; None when no
        worker runs, or one does not say (a release before workers published them). `served`: the
        served models when the caller has them already."""
        served = self.served_models() if served is None else served
        workers = [w for ws in served.values() for w in ws if model in (None, w.model)]
        if not workers or any(w.loras is None for w in workers):
            return None
        return {name for w in workers for name in w.loras}

    async def current_model(self) -> str | None:
        try:
            entry = await self.config_kv.get(DEFAULT_MODEL_KEY)
            chosen = entry.value.decode() if entry.value else None
        except (KeyNotFoundError, KeyDeletedError):
            chosen = None
        served = self.served_models()
        if chosen in served or (chosen and not served):
            return chosen
        return max(served, key=lambda m: len(served[m])) if served else None

    async def load_model(self, model: str) -> None:
        served = self.served_models()
        if model not in served:
            known = ", ".join(sorted(served)) or "none (no worker is running)"
            raise RequestInvalid([{"field": "model", "message": f"unknown model {model!r}; served: {known}"}])
        await self.config_kv.put(DEFAULT_MODEL_KEY, model.encode())

    # -- jobs -----------------------------------------------------------------------------------

    async def submit(
        self,
        request: GenerateRequest,
        *,
        owner: str | None = None,
        job_id: str | None = None,
        key: ApiKey | None = None,
        idempotency_key: str | None = None,
        digest: str | None = None,
        placement: Placement | None = None,
        created: set[str] | None = None,
    ) -> JobStatus:
        """Queues one job. `placement`: its stored uploads and group. With `idempotency_key` the job
        (`job_id`, else the key's own id) may exist already: it is then answered as it is, before any
        check of the caller's key, and published again if still queued. `created` gets the job's id
        when this call wrote its record (or may have: its write went unanswered). `digest`: the request's
        fingerprint (request_digest) kept in the record with an Idempotency-Key; a repeat of the key with
        another is IdempotencyKeyReused."""
        self.connected()
        self.leaders.check()  # an election under way: refused before anything is written
        placement = placement or Placement()
        if idempotency_key:
            job_id = job_id or idempotent_job_id(owner, idempotency_key)
            if (existing := await self._repeated(request, job_id, owner, idempotency_key, digest)) is not None:
                return existing
        self.check_allowed(request, key)
        if key is not None:
            await self._check_key(request, key)
        served = self.served_models()
        if request.model is None:
            current = await self.current_model() if len(served) > 1 else None  # one model: no KV read
            if current is not None:
                request = request.model_copy(update={"model": current})
        elif served and request.model not in served:
            raise RequestInvalid(
                [{"field": "model", "message": f"unknown model {request.model!r}; served: {', '.join(sorted(served))}"}]
            )
        if uses_refiner(request) and served and not any(
            w.has_refiner for ws in served.values() for w in ws if request.model in (None, w.model)
        ):
            field = "stages" if request.stages else "use_refiner"
            raise RequestInvalid([{"field": field, "message": "no running worker has a refiner loaded"}])
        check_controlnets(request, served)
        if request.loras and (loaded := self.loaded_loras(request.model, served)) is not None:
            if missing := sorted(name for name in request.loras if name not in loaded):
                on = f"the workers of {request.model}" if request.model else "the running workers"
                have = ", ".join(sorted(loaded)) or "none"
                raise RequestInvalid([{"field": "loras", "message": f"{on} have no adapter {missing[0]!r}; they have: {have}"}])
        key_of_result = None
        if self.cache.wants(request):
            model = request.model or await self._model_for(served)
            key_of_result = await self.cache.key(
                request, model=model, owner=owner, placement=placement, uploads=self.uploads
            )
        if key_of_result is not None:
            hit = await self._from_cache(
                request, key_of_result, job_id=job_id, owner=owner, placement=placement,
                idempotency_key=idempotency_key, digest=digest, created=created,
            )
            if hit is not None:
                return hit
        return await self._queue(
            request, job_id=job_id, owner=owner, placement=placement, key_of_result=key_of_result,
            idempotency_key=idempotency_key, digest=digest, created=created,
        )

    async def _queue(
        self, request: GenerateRequest, *, job_id: str | None, owner: str | None, placement: Placement,
        key_of_result: str | None, idempotency_key: str | None, digest: str | None, created: set[str] | None,
    ) -> JobStatus:
        """Queues the admitted request (`schemas.enqueue`: its record, its `queued` event, its message);
        the job the id named already when it had a record (an idempotent repeat). The queue view, which
        holds the record already, takes its revision as soon as it is written (before the KV watch brings
        it back, which then costs no decoding). A fresh id goes out without waiting for its record's ack;
        an Idempotency-Key's id only once its record is new."""
        envelope = JobEnvelope.for_request(
            request, job_id=job_id, owner=owner, default_timeout_s=self.settings.default_timeout_s, placement=placement
        )
        status = envelope.queued_status()
        status.cache_key = key_of_result
        status.request_digest = digest if idempotency_key else None
        # In the queue view before it is sent (its position and ETA count it; the record's revision
        # follows with the broker's ack), and watched for its end before it can end.
        self.view.apply(status, 0)
        queued = JobEvent(type="queued", job_id=status.job_id, position=self.position(status), eta_s=self.eta(status))
        if key_of_result is not None:
            self.cache.watch(status.job_id, key_of_result)
        self.fresh.want(status.job_id)
        try:
            revision = await enqueue(
                self.nc, self.submit_js, self.submit_kv, envelope, subject=self.subject_of(envelope), status=status,
                queued=queued, fresh_id=not idempotency_key, created=created, on_stored=self.view.confirm,
            )
        except BaseException as exc:
            self._not_queued(status.job_id)
            if isinstance(exc, BROKER_ERRORS):
                self.leaders.lost(exc)
            raise
        if revision is None:  # the job id had a record already (or had one a moment ago)
            existing = await jobstore.read_status(self.status_kv, envelope.job_id)
            if existing is not None:
                self._not_queued(status.job_id)
                check_same_request(existing, digest, idempotency_key)
                await self._publish_again_if_queued(existing, envelope)
                return existing
            await self._publish_again_if_queued(status, envelope)
        await self._audit(status, "submitted")
        self._created(status)
        log.info(
            "job %s queued tier=%s %dx%d key=%s", status.job_id, status.tier.value, request.width, request.height, owner,
            extra={"job_id": status.job_id},
        )
        return status

    async def _repeated(
        self, request: GenerateRequest, job_id: str, owner: str | None, idempotency_key: str, digest: str | None
    ) -> JobStatus | None:
        """The job an Idempotency-Key named before, answered as it is (and published again if still
        queued); None when there is none yet. IdempotencyKeyReused for another request under the key."""
        existing = await jobstore.read_status(self.submit_kv, job_id)
        if existing is not None:
            check_same_request(existing, digest, idempotency_key)
            await self._publish_again_if_queued(existing, JobEnvelope.for_request(
                request, job_id=job_id, owner=owner, placement=Placement.of(existing)
            ))
        return existing

    async def _from_cache(
        self, request: GenerateRequest, key_of_result: str, *, job_id: str | None, owner: str | None,
        placement: Placement, idempotency_key: str | None, digest: str | None, created: set[str] | None,
    ) -> JobStatus | None:
        """The job answered from the result cache (a new job, done at once, or an idempotent repeat of
        one); None on a miss."""
        hit = await self.cache.answer(
            request, key_of_result, job_id=job_id, owner=owner, status_kv=self.submit_kv, images=self.images,
            placement=placement, request_digest=digest if idempotency_key else None,
        )
        if hit is None:
            return None
        status, revision = hit
        if revision:  # a new job, not an idempotent repeat of one
            if created is not None:
                created.add(status.job_id)
            self.view.apply(status, revision)
            await self._event(final_event(status))
            await self._audit(status, "cached")
            self._created(status)
        else:
            check_same_request(status, digest, idempotency_key)
            await self._publish_again_if_queued(status, JobEnvelope.for_request(
                request, job_id=status.job_id, owner=owner, default_timeout_s=self.settings.default_timeout_s,
                placement=placement,
            ))
        return status

    def _not_queued(self, job_id: str) -> None:
        """Takes back what `submit` noted of a job before sending it, when it was not queued after all:
        the view's entry unless a record of the job came in since, and the watches for its end."""
        if not self.view.stored(job_id):
            self.view.forget(job_id)
        self.cache.unwatch(job_id)
        self.fresh.drop(job_id)

    def _created(self, status: JobStatus) -> None:
        for listener in self.submit_listeners:
            listener(status)

    def subject_of(self, envelope: JobEnvelope) -> str:
        """Where a job goes: its model's lane while the live workers serve several models, else its
        tier's own subject, which every worker reads (and the autoscaler watches); a worker of another
        model that starts later and takes a job naming one moves it to that model's lane."""
        return envelope.subject if self.model_views.several() else envelope.tier.subject

    async def _publish_again_if_queued(self, existing: JobStatus, envelope: JobEnvelope) -> None:
        """A repeated submit (same Idempotency-Key) of a job still queued: its first try may have stopped
        between writing the record and publishing the job (the broker or the gateway went away), so the
        job goes out again; the stream drops it as a duplicate (Nats-Msg-Id) if that try did publish."""
        if existing.state is not JobState.QUEUED:
            return
        envelope = envelope.model_copy(
            update={"seed": existing.seed, "submitted_at": existing.submitted_at, "deadline": existing.deadline}
        )
        try:
            await publish_job(self.submit_js, envelope, self.subject_of(envelope))
        except BROKER_ERRORS as exc:
            self.leaders.lost(exc)
            raise
        log.info("job %s submitted again while queued; published again", existing.job_id, extra={"job_id": existing.job_id})

    async def _model_for(self, served: dict[str, list]) -> str | None:
        """The model a request naming none is made with: the only one served, else the current one."""
        return next(iter(served)) if len(served) == 1 else await self.current_model()

    def _check_blocklist(self, request: GenerateRequest) -> None:
        text = request.prompt.lower()
        for term in self.settings.blocklist:
            if term and term.lower() in text:
                raise RequestInvalid([{"field": "prompt", "message": f"contains the blocked term {term!r}"}])

    def check_allowed(self, request: GenerateRequest, key: ApiKey | None) -> None:
        """What refuses a request before any work, taking nothing from the key's budgets: a blocked
        prompt, a tier the key may not use, more images (`n`) than the key may ever have unfinished."""
        self._check_blocklist(request)
        if key is None:
            return
        tier = request.effective_tier
        if tier not in key.tiers:
            allowed = ", ".join(t.value for t in key.tiers)
            field = "priority" if request.tier is None else "tier"
            raise Forbidden(f"{field}: key {key.name!r} may not use the {tier.value} tier; allowed: {allowed}", field)
        if request.n > key.max_concurrent:
            raise Forbidden(f"n={request.n} exceeds key {key.name!r} max_concurrent={key.max_concurrent}", "n")

    async def reserve_quota(self, key: ApiKey, job_ids: list[str]) -> None:
        """Places for these jobs in the key's quota of unfinished jobs, shared by every gateway
        (`gateway.state.quota`); RateLimited when they would take the key over it."""
        self.connected()
        self.leaders.check()  # an election under way: refused before anything is reserved
        try:
            await quota.reserve(
                self.submit_quota_kv, self.submit_kv, key.name, job_ids, limit=key.max_concurrent, seen=self.view.jobs.get
            )
        except BROKER_DOWN as exc:
            self.leaders.lost(exc)
            raise

    async def store_upload(self, name: str, data: bytes) -> None:
        """Puts an uploaded image into `imagegen-uploads`; StoreFull, naming its limit, when it has no room."""
        self.connected()
        await storage.check_room(self.js, f"OBJ_{names.UPLOADS_BUCKET}", names.UPLOADS_BUCKET, len(data), flag=MAX_BYTES_FLAG[names.UPLOADS_BUCKET])
        await uploads.put_checked(self.uploads, name, data)

    async def release_quota(self, key: ApiKey, job_ids: list[str]) -> None:
        await quota.release(self.quota_kv, key.name, job_ids)

    async def _check_key(self, request: GenerateRequest, key: ApiKey) -> None:
        """The key's rate; its quota of unfinished jobs was reserved before (`reserve_quota`)."""
        await ratelimit.take(self.rate_kv, key.name, per_minute=key.rate_per_minute)

    async def _audit(self, status: JobStatus, what: str) -> None:
        record = {
            "event": what,
            "job_id": status.job_id,
            "key": status.owner,
            "tier": status.tier.value,
            "ts": time.time(),
            "request": redacted(status.request, self.settings.redact_prompts),
        }
        line = json.dumps(record)
        await self.nc.publish(names.AUDIT_SUBJECT, line.encode())
        if self.settings.audit_log:  # the record is on NATS either way
            audit_log.info(line, extra={"job_id": status.job_id})

    async def _event(self, event: JobEvent) -> None:
        await self.nc.publish(names.events_subject(event.job_id), encode(event))

