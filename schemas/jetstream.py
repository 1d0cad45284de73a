"""The JetStream objects imagegen uses, created or brought up to date by whoever starts first.

Gateways and workers both call `ensure_topology`; it is idempotent, so any number of them can start
in any order against one server or a cluster (`replicas` > 1 replicates every stream).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import APIError, BadRequestError, NotFoundError

from schemas import names
from schemas.settings_fields import setting

log = logging.getLogger("imagegen.jetstream")


@dataclass(frozen=True, kw_only=True)
class Topology:
    replicas: int = setting(1, help="JetStream replicas of every stream, 3 on a cluster", group="operations")
    job_ttl_s: float = setting(24 * 3600, help="seconds status records and images are kept", group="operations")
    events_ttl_s: float = 3600  # events replayable this long
    duplicate_window_s: float = 600  # idempotent submit window (Nats-Msg-Id)
    ack_wait_s: float = setting(30.0, help="seconds a silent worker keeps a job before it is redelivered; the same on every process", group="operations")
    max_deliver: int = setting(5, help="tries of a job before it is dead-lettered; the same on every process", group="operations")
    worker_ttl_s: float = 15.0  # a worker that stops heartbeating disappears after this
    audit_ttl_s: float = 30 * 24 * 3600
    # Every bucket's most bytes: a write past it is refused (schemas.storage.StoreFull). On one server the
    # sum is reserved from its JetStream storage (75% of the free disk by default), so keep it below that.
    images_max_bytes: int = setting(2 << 30, help="most bytes of images kept; a job whose image does not fit fails", group="operations")  # object store imagegen-images
    uploads_max_bytes: int = setting(1 << 30, help="most bytes of uploaded init and mask images kept; past it uploads get 507", group="operations")  # object store imagegen-uploads
    cache_max_bytes: int = setting(1 << 30, help="most bytes of the result cache", group="operations")  # object store imagegen-cache
    status_max_bytes: int = setting(512 << 20, help="most bytes of job records, and of ComfyUI prompts; past it submits get 507", group="operations")  # KV imagegen-jobs and imagegen-comfy-prompts
    kv_max_bytes: int = setting(64 << 20, help="most bytes of each small KV bucket: rate limits, quotas, workers, config", group="operations")


MAX_BYTES_FLAG = {  # the flag that sets each bucket's max_bytes, for the messages of a full one
    names.IMAGES_BUCKET: "--images-max-bytes",
    names.UPLOADS_BUCKET: "--uploads-max-bytes",
    names.CACHE_BUCKET: "--cache-max-bytes",
    names.STATUS_BUCKET: "--status-max-bytes",
    names.COMFY_BUCKET: "--status-max-bytes",
}

WEBHOOK_ACK_WAIT_S = 60.0  # longer than one call may take (gateway.http.webhooks.CALL_TIMEOUT_S)
WEBHOOK_MAX_DELIVER = 20


def work_queue_config(t: Topology, name: str, subjects: list[str]) -> StreamConfig:
    """A stream each of whose messages one consumer takes once, deduplicated by Nats-Msg-Id."""
    return StreamConfig(
        name=name,
        subjects=subjects,
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        duplicate_window=t.duplicate_window_s,
        max_age=t.job_ttl_s,
        num_replicas=t.replicas,
        discard=DiscardPolicy.OLD,
    )


def job_stream_config(t: Topology) -> StreamConfig:
    lanes = [subject for tier in names.TIERS for subject in (tier.subject, f"{tier.subject}.*")]  # .<model lane>
    return work_queue_config(t, names.JOBS_STREAM, lanes)


def consumer_config(t: Topology, tier: names.Tier, model: str | None = None) -> ConsumerConfig:
    """The workers' consumer of a tier's jobs that name no model, or with `model`, of that model's lane."""
    return ConsumerConfig(
        durable_name=names.jobs_consumer(tier, model),
        filter_subject=names.jobs_subject(tier, model),
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=t.ack_wait_s,
        # One delivery more than the tries: a job whose worker died on its last try comes back once more,
        # and the worker that gets it dead-letters it instead of leaving it `running` for ever.
        max_deliver=t.max_deliver + 1,
        max_ack_pending=-1,
        max_waiting=4096,
        num_replicas=t.replicas,
    )


async def ensure_model_lanes(js: JetStreamContext, t: Topology, model: str) -> None:
    """The consumers of a model's lanes, one per tier: a worker serving the model creates them."""
    for tier in names.TIERS:
        await js.add_consumer(names.JOBS_STREAM, consumer_config(t, tier, model))


def webhooks_stream_config(t: Topology) -> StreamConfig:
    """Webhook calls to make: every gateway that sees a job start or end publishes the call with the
    same Nats-Msg-Id, so the stream holds it once; the shared consumer hands it to one gateway."""
    return work_queue_config(t, names.WEBHOOKS_STREAM, [f"{names.WEBHOOKS_SUBJECT_PREFIX}.>"])


def webhook_senders_config(t: Topology) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=names.WEBHOOK_SENDERS,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=WEBHOOK_ACK_WAIT_S,  # a gateway that stopped mid-call: another one makes it after this
        max_deliver=WEBHOOK_MAX_DELIVER,  # a backstop: the gateways give a call up after their own tries
        max_ack_pending=-1,
        max_waiting=4096,
        num_replicas=t.replicas,
    )


async def _ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    try:
        await js.stream_info(config.name)
    except NotFoundError:
        try:
            await js.add_stream(config)
            return
        except BadRequestError:  # created meanwhile by another process
            pass
    await js.update_stream(config)


async def ensure_topology(js: JetStreamContext, t: Topology = Topology()) -> None:
    await _ensure_stream(js, job_stream_config(t))
    for tier in names.TIERS:
        await js.add_consumer(names.JOBS_STREAM, consumer_config(t, tier))
    for name, subject, max_age in (  # kept for a while whatever is read: events, dead letters, audit
        (names.EVENTS_STREAM, f"{names.EVENTS_SUBJECT_PREFIX}.>", t.events_ttl_s),
        (names.DLQ_STREAM, names.DLQ_SUBJECT, 7 * 24 * 3600),
        (names.AUDIT_STREAM, names.AUDIT_SUBJECT, t.audit_ttl_s),
    ):
        await _ensure_stream(
            js,
            StreamConfig(
                name=name,
                subjects=[subject],
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                max_age=max_age,
                num_replicas=t.replicas,
                allow_direct=True,  # a follower reads a job's stored events with one batched Direct Get
            ),
        )
    await _ensure_stream(js, webhooks_stream_config(t))
    await js.add_consumer(names.WEBHOOKS_STREAM, webhook_senders_config(t))
    # direct=True: a KV read is one Direct Get answered with the raw value (nats.go's default), half
    # the time of the JSON API read; every compare-and-set write is still checked by the stream leader.
    small = dict(history=1, replicas=t.replicas, direct=True, max_bytes=t.kv_max_bytes)
    for config in (
        KeyValueConfig(bucket=names.RATE_BUCKET, ttl=180, **small),
        KeyValueConfig(bucket=names.QUOTA_BUCKET, ttl=t.job_ttl_s, **small),
        KeyValueConfig(bucket=names.STATUS_BUCKET, ttl=t.job_ttl_s, **(small | {"max_bytes": t.status_max_bytes})),
        KeyValueConfig(bucket=names.WORKERS_BUCKET, ttl=t.worker_ttl_s, **small),
        KeyValueConfig(bucket=names.CONFIG_BUCKET, **small),
        KeyValueConfig(bucket=names.COMFY_BUCKET, ttl=t.job_ttl_s, **(small | {"max_bytes": t.status_max_bytes})),
    ):
        try:
            await _refused_for_storage(js.create_key_value(config), config.bucket, config.max_bytes)
        except BadRequestError:  # exists with other settings: the first process's stand, but for max_bytes
            log.warning("bucket %s exists with other settings; keeping them", config.bucket)
            await _set_max_bytes(js, f"KV_{config.bucket}", config.max_bytes)
    for bucket, max_bytes in ((names.IMAGES_BUCKET, t.images_max_bytes), (names.UPLOADS_BUCKET, t.uploads_max_bytes)):
        try:  # uploads live as long as their job's record
            await _refused_for_storage(js.create_object_store(
                bucket, config=ObjectStoreConfig(ttl=t.job_ttl_s, replicas=t.replicas, max_bytes=max_bytes)
            ), bucket, max_bytes)
        except BadRequestError:
            log.warning("object store %s exists with other settings; keeping them", bucket)
            await _set_max_bytes(js, f"OBJ_{bucket}", max_bytes)


INSUFFICIENT_STORAGE = 10047  # JetStream: the streams' max_bytes add up to more than the server's storage


async def _refused_for_storage(making, bucket: str, max_bytes: int):
    """Makes a bucket; when the server has no storage to reserve for its max_bytes, says which flags to lower."""
    try:
        return await making
    except APIError as exc:
        if exc.err_code != INSUFFICIENT_STORAGE:
            raise
        raise RuntimeError(
            f"bucket {bucket} could not be made with max_bytes={max_bytes}: {exc.description}. On one nats-server the "
            "buckets' sizes are reserved from its JetStream storage (max_file_store, by default 75% of the free "
            "disk): lower the --*-max-bytes flags (see docs/safety.md), or give the server more storage"
        ) from None


async def _set_max_bytes(js: JetStreamContext, stream: str, max_bytes: int) -> None:
    """Gives an existing bucket this max_bytes (a bucket made before it had one, or by another setting)."""
    config = (await js.stream_info(stream)).config
    if (config.max_bytes or -1) != max_bytes:
        log.info("%s max_bytes %s -> %d", stream, config.max_bytes, max_bytes)
        config.max_bytes = max_bytes
        await js.update_stream(config)


async def ensure_result_cache(js: JetStreamContext, *, ttl_s: float, replicas: int = 1, max_bytes: int = -1) -> None:
    """Creates the result cache's object store with entries living `ttl_s`, or sets an existing one's
    TTL and max_bytes to these: the gateway started last decides (give every gateway the same --cache-ttl)."""
    try:
        await js.create_object_store(
            names.CACHE_BUCKET, config=ObjectStoreConfig(ttl=ttl_s, replicas=replicas, max_bytes=max_bytes)
        )
        return
    except BadRequestError:  # exists with another TTL
        pass
    config = (await js.stream_info(f"OBJ_{names.CACHE_BUCKET}")).config
    if abs((config.max_age or 0) - ttl_s) > 0.001 or (config.max_bytes or -1) != max_bytes:
        log.info("result cache TTL %.0fs -> %.0fs, max_bytes %s -> %d", config.max_age or 0, ttl_s, config.max_bytes, max_bytes)
        config.max_age = ttl_s
        config.max_bytes = max_bytes
        config.duplicate_window = min(config.duplicate_window or ttl_s, ttl_s)
        await js.update_stream(config)
