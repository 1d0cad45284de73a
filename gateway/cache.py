"""The result cache: a request identical to an earlier one, with a seed (or one that asks for it), is
answered with the stored image at once, without a GPU.

The key is a hash of the request fields that decide the image: prompt, negative prompt, seed, size,
steps, guidance, scheduler, refiner settings, LoRAs, model, format, quality, image count and the image
inputs by content hash. Fields that decide only how a job is handled (priority, tier, timeout, cache)
are left out, so is quality for PNG and the refiner split without the refiner.

Entries live in the object store `imagegen-cache`: object name = key, a copy of the image, with the
original job's seed, type, size and NSFW flag in its description. The bucket's TTL is the cache TTL,
so entries expire by themselves; an entry about to expire, or whose image cannot be read, is a miss.
A hit becomes the caller's own job, `done` at once with `cached: true`: its image is copied under its
own job id, so it has its caller as owner, lives as long as any job and is deleted alone; nothing is
published on the job stream. On a miss, the gateway that took the request stores the image once its
job is done; any gateway deleting a done job stores it first if it is missing, so a client that
deletes what it fetched (mflux's `delete=true`) still leaves the entry behind.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass

from nats.js import JetStreamContext
from nats.js.api import ObjectMeta
from nats.js.errors import NotFoundError, ObjectNotFoundError
from nats.js.object_store import ObjectStore

from gateway.queue_view import QueueView
from schemas import jobstore, names
from schemas.jetstream import ensure_result_cache
from schemas.job import new_job_id
from schemas.request import GenerateRequest
from schemas.status import ImageRef, JobState, JobStatus

log = logging.getLogger("imagegen.gateway.cache")

KEY_VERSION = "imagegen-cache-v1"
HANDLING_FIELDS = frozenset({"priority", "tier", "timeout_s", "cache"})
"""Request fields that change how a job is handled, never its image: not part of the key."""
GONE = (ObjectNotFoundError, NotFoundError)


def wants_cache(request: GenerateRequest) -> bool:
    """`cache: true` always, `cache: false` never; otherwise only a request with a seed."""
    return request.cache if request.cache is not None else request.seed is not None


def content_hash(text: str) -> str:
    """The SHA-256 of an image sent as base64 or a data URL, over its decoded bytes."""
    payload = text.split(",", 1)[1] if text.startswith("data:") and "," in text else text
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        data = text.encode()
    return hashlib.sha256(data).hexdigest()


def cache_key(request: GenerateRequest, *, model: str | None, inputs: dict[str, str] | None = None) -> str:
    """The hex SHA-256 naming every request that makes this image; `model` is the model that serves it,
    `inputs` the content hashes of images the request brings as stored uploads, by field."""
    fields = request.model_dump(mode="json", exclude=set(HANDLING_FIELDS), exclude_none=True)
    fields["model"] = model
    for name, digest in (inputs or {}).items():
        fields[name] = "sha256:" + digest
    if fields.get("format") == "PNG":
        fields.pop("quality", None)
    if not fields.get("use_refiner"):
        fields.pop("refiner_split", None)
    if fields.get("init_image") is None:
        fields.pop("strength", None)
    for name, value in list(fields.items()):
        if name.endswith("_image") and isinstance(value, str):
            fields[name] = "sha256:" + content_hash(value)
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{KEY_VERSION}\n{text}".encode()).hexdigest()


@dataclass(frozen=True, kw_only=True)
class CachedImage:
    """What an entry says about its image, kept as JSON in the object's description."""

    job_id: str
    seed: int
    content_type: str
    width: int
    height: int
    nsfw: bool = False
    stored_at: float = 0.0

    @classmethod
    def parse(cls, description: str | None) -> "CachedImage | None":
        try:
            return cls(**json.loads(description or ""))
        except (ValueError, TypeError):
            return None

    def job_status(self, job_id: str, *, request: GenerateRequest, owner: str | None, size: int) -> JobStatus:
        """A new job of this caller, done at once with this image."""
        now = time.time()
        image = ImageRef(name=job_id, content_type=self.content_type, size=size, width=self.width, height=self.height)
        return JobStatus(
            job_id=job_id,
            state=JobState.DONE,
            tier=request.effective_tier,
            request=request.model_dump(mode="json", exclude_none=True),
            seed=self.seed,
            owner=owner,
            submitted_at=now,
            started_at=now,
            finished_at=now,
            image=image,
            cached=True,
            nsfw=self.nsfw,
        )


class ResultCache:
    """Looks up and stores results. `hits` and `misses` count the cacheable requests this gateway
    answered from the cache or sent to a worker; `stored` the images it put in the cache."""

    def __init__(self, *, ttl_s: float, replicas: int = 1, read_timeout_s: float = 30.0):
        self.ttl_s = ttl_s
        self.replicas = replicas
        self.read_timeout_s = read_timeout_s
        self.hits = 0
        self.misses = 0
        self.stored = 0
        self.pending: dict[str, str] = {}  # job id -> key, for unfinished jobs this gateway sent to a worker
        self.store: ObjectStore | None = None
        self._images: ObjectStore | None = None
        self._done: dict[str, tuple[JobStatus, str]] = {}  # job id -> (record, key): done, image not stored yet
        self._storing: dict[str, asyncio.Future] = {}  # key -> the store under way
        self._wake = asyncio.Event()
        self._recorder: asyncio.Task | None = None

    @property
    def enabled(self) -> bool:
        return self.ttl_s > 0

    async def start(self, js: JetStreamContext, *, view: QueueView, images: ObjectStore) -> None:
        if not self.enabled:
            log.info("result cache off")
            return
        await ensure_result_cache(js, ttl_s=self.ttl_s, replicas=self.replicas)
        self.store = await js.object_store(names.CACHE_BUCKET)
        self._images = images
        self._follow(view)
        self._recorder = asyncio.create_task(self._record_finished())

    async def close(self) -> None:
        if self._recorder is not None:
            self._recorder.cancel()
            await asyncio.gather(self._recorder, return_exceptions=True)

    def wants(self, request: GenerateRequest) -> bool:
        return self.store is not None and wants_cache(request)

    async def key(
        self,
        request: GenerateRequest,
        *,
        model: str | None,
        placement: dict | None = None,
        uploads: ObjectStore | None = None,
    ) -> str | None:
        """The request's key. Images it brings as stored uploads (`placement`) count by the digest the
        object store keeps of their bytes; None (not cached) when one cannot be read."""
        inputs: dict[str, str] = {}
        for name, ref in (placement or {}).items():
            if not name.endswith("_image") or ref is None:
                continue
            try:
                info = await uploads.get_info(ref.name)
            except (*GONE, AttributeError):
                return None
            if not info.digest:
                return None
            inputs[name] = info.digest
        return cache_key(request, model=model, inputs=inputs)

    # -- answering ------------------------------------------------------------------------------

    async def answer(
        self,
        request: GenerateRequest,
        key: str,
        *,
        job_id: str | None,
        owner: str | None,
        status_kv,
        images: ObjectStore,
        placement: dict | None = None,
    ) -> tuple[JobStatus, int] | None:
        """On a hit, a new job of this caller, done, with its own copy of the image, and its record's
        revision; the existing job (revision 0) when `job_id` names one already; None on a miss.
        `placement` (group, uploads) goes into the new record as it would for a queued job."""
        if job_id is not None:
            existing = await jobstore.read_status(status_kv, job_id)
            if existing is not None:
                return existing, 0
        await self._store_finished(key)
        found = await self._read(key)
        if found is None:
            self.misses += 1
            return None
        entry, data = found
        status = entry.job_status(job_id or new_job_id(), request=request, owner=owner, size=len(data))
        status = status.model_copy(update={k: v for k, v in (placement or {}).items() if k in JobStatus.model_fields})
        await asyncio.wait_for(images.put(status.job_id, data), timeout=self.read_timeout_s)
        revision = await jobstore.create_status(status_kv, status)
        if revision is None:  # the same idempotent request, made meanwhile
            existing = await jobstore.read_status(status_kv, status.job_id)
            return (existing or status), 0
        self.hits += 1
        log.info("job %s answered from the result cache (key %s, made by job %s)", status.job_id, key[:12], entry.job_id)
        return status, revision

    async def _read(self, key: str) -> tuple[CachedImage, bytes] | None:
        try:
            info = await self.store.get_info(key)
        except GONE:
            return None
        entry = CachedImage.parse(info.description)
        if entry is None or time.time() - entry.stored_at > self.ttl_s - min(5.0, self.ttl_s * 0.05):
            return None  # unreadable, or about to expire (its chunks may be gone before its description)
        try:
            data = (await asyncio.wait_for(self.store.get(key), timeout=self.read_timeout_s)).data
        except GONE:
            return None
        except asyncio.TimeoutError:
            log.warning("result cache entry %s unreadable within %.0fs; a miss", key[:12], self.read_timeout_s)
            return None
        if not data or len(data) != info.size:
            return None
        return entry, data

    # -- storing --------------------------------------------------------------------------------

    def watch(self, job_id: str, key: str) -> None:
        """Stores the job's image under `key` once the job is done."""
        self.pending[job_id] = key

    def _follow(self, view: QueueView) -> None:
        """Learns of finished pending jobs from every record the queue view takes: no scan, no poll."""
        apply = view.apply

        def apply_and_note(status: JobStatus, revision: int) -> None:
            apply(status, revision)
            if status.state.final and status.job_id in self.pending:
                key = self.pending.pop(status.job_id)
                if status.state is JobState.DONE and status.image is not None:
                    self._done[status.job_id] = (status, key)
                    self._wake.set()

        view.apply = apply_and_note

    async def keep(self, status: JobStatus) -> None:
        """Called before a job's image is deleted: a done job's image is stored first if its entry is missing."""
        self._done.pop(status.job_id, None)
        key = self.pending.pop(status.job_id, None) or status.cache_key
        if self.store is None or key is None or status.cached or status.state is not JobState.DONE or status.image is None:
            return
        try:
            await self._store_once(status, key)
        except Exception as exc:  # the delete goes on; the cache only misses this image
            log.warning("job %s image not stored in the result cache: %s", status.job_id, exc)

    async def _store_once(self, status: JobStatus, key: str) -> None:
        """`_store`, or waits for the store of this key already under way."""
        storing = self._storing.get(key)
        if storing is None:
            storing = self._storing[key] = asyncio.ensure_future(self._store(status, key))
            storing.add_done_callback(lambda _: self._storing.pop(key, None))
        await asyncio.shield(storing)

    async def _store(self, status: JobStatus, key: str) -> None:
        try:
            await self.store.get_info(key)
            return  # stored already: by another gateway, or from an identical job
        except GONE:
            pass
        try:
            data = (await asyncio.wait_for(self._images.get(status.image.name), timeout=self.read_timeout_s)).data
        except GONE:
            log.info("job %s image deleted before the result cache could store it", status.job_id)
            return
        entry = CachedImage(
            job_id=status.job_id,
            seed=status.seed,
            content_type=status.image.content_type,
            width=status.image.width,
            height=status.image.height,
            nsfw=status.nsfw,
            stored_at=time.time(),
        )
        await self.store.put(key, data, meta=ObjectMeta(name=key, description=json.dumps(asdict(entry))))
        self.stored += 1
        log.info("job %s image stored in the result cache (key %s)", status.job_id, key[:12])

    async def _store_done(self, job_id: str, status: JobStatus, key: str) -> None:
        try:
            await self._store_once(status, key)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # broker away or slow: this image is not cached, nothing else
            log.warning("job %s image not stored in the result cache: %s", job_id, exc)

    async def _store_finished(self, key: str) -> None:
        """Stores now a done job of this key the recorder has not stored yet (or waits for the store
        under way), so that a repeat sent the moment its first answer is done finds it."""
        for job_id, (status, done_key) in list(self._done.items()):
            if done_key == key and self._done.pop(job_id, None) is not None:
                await self._store_done(job_id, status, key)
        storing = self._storing.get(key)
        if storing is not None:
            await asyncio.wait([storing])

    async def _record_finished(self) -> None:
        """Stores the images of this gateway's jobs as they are done."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._done:
                job_id = next(iter(self._done))
                status, key = self._done.pop(job_id)
                await self._store_done(job_id, status, key)
