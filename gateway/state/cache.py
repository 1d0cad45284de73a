"""The result cache: a request identical to an earlier one, with a seed (or one that asks for it), is
answered with the stored image at once, without a GPU. Which requests are identical, and whose
answers may be shared, is `gateway.state.cache_key`'s business.

Entries live in the object store `imagegen-cache`: object name = key, a copy of the image, with the
original job's seed, type, size and NSFW flag in its description. The bucket's TTL is the cache TTL,
so entries expire by themselves; an entry about to expire by the bucket's own TTL (which the gateway
started last set), or whose image cannot be read, is a miss.
A hit becomes the caller's own job, `done` at once with `cached: true`: its image is copied under its
own job id, so it has its caller as owner, lives as long as any job and is deleted alone; nothing is
published on the job stream. On a miss, the gateway that took the request stores the image once its
job is done; any gateway deleting a done job stores it first if it is missing, so a client that
deletes what it fetched (mflux's `delete=true`) still leaves the entry behind. A gateway that stops
finishes the stores it has begun or still owes, for at most `close_timeout_s`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, Awaitable, Callable

from nats.js import JetStreamContext
from nats.js.api import ObjectMeta
from nats.js.errors import NotFoundError, ObjectNotFoundError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from gateway.state.cache_key import SCOPES, cache_key, wants_cache
from gateway.state.direct_get import DirectReader
from gateway.state.object_read import ObjectReader
from gateway.state.queue_view import QueueView
from schemas import jobstore, names
from schemas.connect import BROKER_ERRORS
from schemas.jetstream import ensure_result_cache
from schemas.job import new_job_id
from schemas.request import GenerateRequest
from schemas.status import ImageRef, JobState, JobStatus

log = logging.getLogger("imagegen.gateway.state.cache")

GONE = (ObjectNotFoundError, NotFoundError)
UPLOAD_FIELDS = ("init_image", "mask_image", "control_image")
BUCKET_TTL_REFRESH_S = 60.0  # how long the bucket's TTL, as read, is taken as current
BUCKET_TTL_RECHECK_S = 1.0  # an entry that looks expired re-reads the TTL at most this often


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

    def expiring(self, ttl_s: float) -> bool:
        """True when the bucket (entries living `ttl_s`; 0: for ever) drops this entry within moments:
        its chunks may be gone before its description."""
        return ttl_s > 0 and time.time() - self.stored_at > ttl_s - min(5.0, ttl_s * 0.05)

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


def placement_fields(placement: Any) -> dict[str, Any]:
    """A job's placement (group, uploads) by field name, as a dict or a model gives it."""
    return dict(placement) if placement is not None else {}


class ResultCache:
    """Looks up and stores results. `hits` and `misses` count the cacheable requests this gateway
    answered from the cache or sent to a worker; `stored` the images it put in the cache. `scope`:
    `key` keeps each API key's entries to itself, `global` shares them (see gateway.state.cache_key)."""

    def __init__(
        self,
        *,
        ttl_s: float,
        scope: str = "key",
        replicas: int = 1,
        max_bytes: int = -1,
        read_timeout_s: float = 30.0,
        close_timeout_s: float = 10.0,
        lookup_timeout_s: float = 0.25,
    ):
        if scope not in SCOPES:
            raise ValueError(f"--cache-scope must be one of {', '.join(SCOPES)}, got {scope!r}")
        self.ttl_s = ttl_s
        self.scope = scope
        self.replicas = replicas
        self.max_bytes = max_bytes
        self.read_timeout_s = read_timeout_s
        self.close_timeout_s = close_timeout_s
        self.lookup_timeout_s = lookup_timeout_s  # an entry's description unread this long: a miss (no leader)
        self.hits = 0
        self.misses = 0
        self.stored = 0
        self.pending: dict[str, str] = {}  # job id -> key, for unfinished jobs this gateway sent to a worker
        self.store: ObjectStore | None = None
        self._js: JetStreamContext | None = None
        self._reader: ObjectReader | None = None
        self._read_image: Callable[[ImageRef], Awaitable[bytes]] | None = None
        self._status_kv: KeyValue | None = None
        self._bucket_ttl_s = ttl_s
        self._bucket_ttl_read_at = float("-inf")
        self._done: dict[str, tuple[JobStatus, str]] = {}  # job id -> (record, key): done, image not stored yet
        self._storing: dict[str, asyncio.Future] = {}  # key -> the store under way
        self._wake = asyncio.Event()
        self._recorder: asyncio.Task | None = None

    @property
    def enabled(self) -> bool:
        return self.ttl_s > 0

    async def start(
        self,
        js: JetStreamContext,
        *,
        view: QueueView,
        direct: DirectReader,
        read_image: Callable[[ImageRef], Awaitable[bytes]],
    ) -> None:
        """`read_image`: a finished job's image bytes, as the gateway reads them."""
        if not self.enabled:
            log.info("result cache off")
            return
        await ensure_result_cache(js, ttl_s=self.ttl_s, replicas=self.replicas, max_bytes=self.max_bytes)
        self._js = js
        self.store = await js.object_store(names.CACHE_BUCKET)
        self._reader = ObjectReader(js, direct, self.store, names.CACHE_BUCKET)
        self._status_kv = await js.key_value(names.STATUS_BUCKET)
        self._read_image = read_image
        await self._bucket_ttl(fresh=True)
        view.listeners.append(self._on_change)
        self._recorder = asyncio.create_task(self._record_finished())

    async def close(self) -> None:
        """Stops the recorder, then finishes the stores under way and those of done jobs it had not
        reached yet, within `close_timeout_s`; what is left then is cancelled (those images miss)."""
        if self._recorder is None:
            return
        self._recorder.cancel()
        await asyncio.gather(self._recorder, return_exceptions=True)
        self._recorder = None
        owed, self._done = self._done, {}
        work = [asyncio.ensure_future(self._store_done(job_id, status, key)) for job_id, (status, key) in owed.items()]
        work += list(self._storing.values())
        if not work:
            return
        _, unfinished = await asyncio.wait(work, timeout=self.close_timeout_s)
        if unfinished:
            log.warning("result cache: %d images not stored within %.0fs of closing", len(unfinished), self.close_timeout_s)
            for future in [*unfinished, *self._storing.values()]:
                future.cancel()
            await asyncio.gather(*unfinished, return_exceptions=True)

    def wants(self, request: GenerateRequest) -> bool:
        return self.store is not None and wants_cache(request)

    async def key(
        self,
        request: GenerateRequest,
        *,
        model: str | None,
        owner: str | None = None,
        placement: Any = None,
        uploads: ObjectStore | None = None,
    ) -> str | None:
        """The request's key for `owner`'s request (its own entries with the scope `key`). Images it
        brings as stored uploads (`placement`) count by the digest the object store keeps of their
        bytes; None (not cached) when one cannot be read."""
        inputs: dict[str, str] = {}
        placed = placement_fields(placement)
        for name in UPLOAD_FIELDS:
            ref = placed.get(name)
            if ref is None:
                continue
            try:
                info = await uploads.get_info(ref.name)
            except (*GONE, AttributeError):
                return None
            if not info.digest:
                return None
            inputs[name] = info.digest
        return cache_key(request, model=model, owner=owner if self.scope == "key" else None, inputs=inputs)

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
        placement: Any = None,
        request_digest: str | None = None,
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
        placed = {k: v for k, v in placement_fields(placement).items() if k in JobStatus.model_fields}
        status = status.model_copy(update={**placed, "request_digest": request_digest})
        await asyncio.wait_for(images.put(status.job_id, data), timeout=self.read_timeout_s)
        revision = await jobstore.create_status(status_kv, status)
        if revision is None:  # the same idempotent request, made meanwhile
            existing = await jobstore.read_status(status_kv, status.job_id)
            return (existing or status), 0
        self.hits += 1
        log.info(
            "job %s answered from the result cache (key %s, made by job %s)", status.job_id, key[:12], entry.job_id,
            extra={"job_id": status.job_id},
        )
        return status, revision

    async def _read(self, key: str) -> tuple[CachedImage, bytes] | None:
        try:
            info = await asyncio.wait_for(self.store.get_info(key), self.lookup_timeout_s)
        except GONE:
            return None
        except (asyncio.TimeoutError, *BROKER_ERRORS) as exc:  # the cache's stream has no leader (an election): a miss
            log.debug("result cache entry %s unread: %s; a miss", key[:12], exc)
            return None
        entry = CachedImage.parse(info.description)
        if entry is None:
            return None
        if entry.expiring(await self._bucket_ttl()) and entry.expiring(await self._bucket_ttl(fresh=True)):
            return None
        try:
            data = await asyncio.wait_for(self._reader.read(info), timeout=self.read_timeout_s)
        except GONE:
            return None
        except asyncio.TimeoutError:
            log.warning(
                "result cache entry %s (made by job %s) unreadable within %.0fs; a miss", key[:12], entry.job_id,
                self.read_timeout_s, extra={"job_id": entry.job_id},
            )
            return None
        if not data or len(data) != info.size:
            return None
        return entry, data

    async def _bucket_ttl(self, *, fresh: bool = False) -> float:
        """The TTL the cache bucket has now (0: none): whichever gateway started last set it, so it is
        read again after BUCKET_TTL_REFRESH_S, or sooner (`fresh`) to confirm that an entry expires."""
        since = time.monotonic() - self._bucket_ttl_read_at
        if since > BUCKET_TTL_REFRESH_S or (fresh and since > BUCKET_TTL_RECHECK_S):
            self._bucket_ttl_read_at = time.monotonic()
            try:
                info = await asyncio.wait_for(self._js.stream_info(f"OBJ_{names.CACHE_BUCKET}"), self.read_timeout_s)
                self._bucket_ttl_s = float(info.config.max_age or 0)
            except Exception as exc:  # broker away: the last known TTL holds
                log.debug("result cache TTL not read: %s", exc)
        return self._bucket_ttl_s

    # -- storing --------------------------------------------------------------------------------

    def watch(self, job_id: str, key: str) -> None:
        """Stores the job's image under `key` once the job is done."""
        self.pending[job_id] = key

    def unwatch(self, job_id: str) -> None:
        """Takes back `watch`: the job was not queued."""
        self.pending.pop(job_id, None)

    def _on_change(self, old: JobStatus | None, status: JobStatus) -> None:
        """Called by the queue view for every record it takes: finished pending jobs, no scan, no poll."""
        if status.state.final and status.job_id in self.pending:
            key = self.pending.pop(status.job_id)
            if status.state is JobState.DONE and status.image is not None:
                self._done[status.job_id] = (status, key)
                self._wake.set()

    async def keep(self, status: JobStatus) -> None:
        """Called before a job's image is deleted: a done job's image is stored first if its entry is
        missing. `status` may trail the store (the view learns of `done` a moment late): a job not
        final in it is read again."""
        self._done.pop(status.job_id, None)
        pending_key = self.pending.pop(status.job_id, None)
        if self.store is None or status.cached:
            return
        try:
            if not status.state.final:
                status = await jobstore.read_status(self._status_kv, status.job_id) or status
            key = pending_key or status.cache_key
            if key is None or status.cached or status.state is not JobState.DONE or status.image is None:
                return
            await self._store_once(status, key)
        except Exception as exc:  # the delete goes on; the cache only misses this image
            log.warning("job %s image not stored in the result cache: %s", status.job_id, exc, extra={"job_id": status.job_id})

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
            data = await asyncio.wait_for(self._read_image(status.image), timeout=self.read_timeout_s)
        except GONE:
            log.info("job %s image deleted before the result cache could store it", status.job_id, extra={"job_id": status.job_id})
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
        log.info("job %s image stored in the result cache (key %s)", status.job_id, key[:12], extra={"job_id": status.job_id})

    async def _store_done(self, job_id: str, status: JobStatus, key: str) -> None:
        try:
            await self._store_once(status, key)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # broker away or slow: this image is not cached, nothing else
            log.warning("job %s image not stored in the result cache: %s", job_id, exc, extra={"job_id": job_id})

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
