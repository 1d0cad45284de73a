"""Names of every subject, stream, bucket and consumer: the contract others code against."""

from __future__ import annotations

import hashlib
import re
from enum import Enum

JOBS_STREAM = "IMAGEGEN_JOBS"
EVENTS_STREAM = "IMAGEGEN_EVENTS"
DLQ_STREAM = "IMAGEGEN_DLQ"
AUDIT_STREAM = "IMAGEGEN_AUDIT"
WEBHOOKS_STREAM = "IMAGEGEN_WEBHOOKS"  # webhook calls to make, each taken by one gateway

JOBS_SUBJECT_PREFIX = "imagegen.jobs"
EVENTS_SUBJECT_PREFIX = "imagegen.events"
DLQ_SUBJECT = "imagegen.dlq"
AUDIT_SUBJECT = "imagegen.audit"
CANCEL_SUBJECT = "imagegen.control.cancel"
WEBHOOKS_SUBJECT_PREFIX = "imagegen.webhooks"  # .<job_id>.<start|completed>
WEBHOOK_SENDERS = "imagegen-webhook-senders"  # the gateways' shared consumer of IMAGEGEN_WEBHOOKS

STATUS_BUCKET = "imagegen-jobs"
WORKERS_BUCKET = "imagegen-workers"
CONFIG_BUCKET = "imagegen-config"
RATE_BUCKET = "imagegen-ratelimits"
QUOTA_BUCKET = "imagegen-quota"  # per key: the ids of its jobs not seen to end (gateway.state.quota)
IMAGES_BUCKET = "imagegen-images"
CACHE_BUCKET = "imagegen-cache"  # object store: result cache, object name = cache key
UPLOADS_BUCKET = "imagegen-uploads"  # init and mask images a job reads, by object name
COMFY_BUCKET = "imagegen-comfy-prompts"  # ComfyUI prompts, by prompt id: their jobs and nodes (gateway/apis/comfy/record.py)

MSG_ID_HEADER = "Nats-Msg-Id"


class Tier(str, Enum):
    """Priority tiers, highest first. Workers always take a higher tier first."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"

    @property
    def subject(self) -> str:
        return f"{JOBS_SUBJECT_PREFIX}.{self.value}"

    @property
    def consumer(self) -> str:
        return f"imagegen-workers-{self.value}"

    @property
    def rank(self) -> int:
        return TIERS.index(self)


TIERS: tuple[Tier, ...] = (Tier.HIGH, Tier.NORMAL, Tier.LOW)


def events_subject(job_id: str) -> str:
    return f"{EVENTS_SUBJECT_PREFIX}.{job_id}"


def webhooks_subject(job_id: str, moment: str) -> str:
    return f"{WEBHOOKS_SUBJECT_PREFIX}.{job_id}.{moment}"


def model_lane(model: str) -> str:
    """A model's token in job subjects and consumer names: readable, and told apart by a hash of the
    whole name (hub ids hold '/' and '.', which subjects and consumer names cannot)."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", model).strip("_")[:40]
    return f"{slug}-{hashlib.sha256(model.encode()).hexdigest()[:8]}"


def jobs_subject(tier: Tier, model: str | None = None) -> str:
    """Where a job of this tier is published: the tier's subject, or with a model named, that model's
    lane of it (`imagegen.jobs.<tier>.<lane>`), which only workers serving the model read."""
    return tier.subject if model is None else f"{tier.subject}.{model_lane(model)}"


def jobs_consumer(tier: Tier, model: str | None = None) -> str:
    """The durable consumer of `jobs_subject(tier, model)`."""
    return tier.consumer if model is None else f"{tier.consumer}-{model_lane(model)}"
