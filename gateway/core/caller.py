"""Who calls: the app key of the job service, the caller's owner, key and Idempotency-Key, and the tier an
API without tiers queues at."""

from __future__ import annotations

from aiohttp import web

from gateway.core.service import JobService
from gateway.http.auth import API_KEY, OWNER, ApiKey
from schemas.names import Tier

SERVICE = web.AppKey("jobs", JobService)


def owner_of(request: web.Request) -> str | None:
    return request.get(OWNER)


def caller(request: web.Request) -> dict:
    """Who submits: the key's name (owner), the key itself, and an Idempotency-Key if sent."""
    return {
        "owner": request.get(OWNER),
        "key": request.get(API_KEY),
        "idempotency_key": request.headers.get("Idempotency-Key"),
    }


def tier_for(key: ApiKey | None) -> Tier | None:
    """The normal tier, or for an API key without it the first it may use: OpenAI's API has no tiers."""
    if key is None or Tier.NORMAL in key.tiers:
        return None
    return next((t for t in (Tier.LOW, Tier.HIGH) if t in key.tiers), None)
