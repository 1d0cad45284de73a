"""The result cache's key: which requests make the same image, and whose answers may be shared.

The key is a hash of the request fields that decide the image: prompt, negative prompt, seed, size,
steps, guidance, scheduler, refiner settings, LoRAs, model, format, quality, image count and the image
inputs by the digest the object store keeps of their bytes. Fields that decide only how a job is
handled (priority, tier, timeout, cache) are left out, so is quality for PNG, the refiner split without
the refiner and strength without an init image. The model counts by its name only: a model whose
weights change behind the same name keeps answering with images of the old weights until the entries
expire (or the cache bucket is purged).

With the scope `key` (the default) the API key that asks is part of the key, so one key never learns
from the cache what another asked for; with `global` every key shares the cache. With auth off there
is no key and both scopes are the same.
"""

from __future__ import annotations

import hashlib
import json

from schemas.request import GenerateRequest

KEY_VERSION = "imagegen-cache-v1"
HANDLING_FIELDS = frozenset({"priority", "tier", "timeout_s", "cache", "webhook", "webhook_events_filter"})
"""Request fields that change how a job is handled, never its image: not part of the key."""
SCOPES = ("key", "global")


def wants_cache(request: GenerateRequest) -> bool:
    """`cache: true` always, `cache: false` never; otherwise only a request with a seed."""
    return request.cache if request.cache is not None else request.seed is not None


def cache_key(
    request: GenerateRequest,
    *,
    model: str | None,
    owner: str | None = None,
    inputs: dict[str, str] | None = None,
) -> str:
    """The hex SHA-256 naming every request that makes this image. `model` is the model that serves it,
    `owner` the API key whose entries these are (None: shared by all), `inputs` the digests of the
    images the request brings as stored uploads, by field (the request itself carries none by now)."""
    fields = request.model_dump(mode="json", exclude=set(HANDLING_FIELDS), exclude_none=True)
    fields["model"] = model
    for name, digest in (inputs or {}).items():
        fields[name] = "sha256:" + digest
    if owner is not None:
        fields["owner"] = owner
    if fields.get("format") == "PNG":
        fields.pop("quality", None)
    if not fields.get("use_refiner"):
        fields.pop("refiner_split", None)
    if fields.get("init_image") is None:
        fields.pop("strength", None)
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{KEY_VERSION}\n{text}".encode()).hexdigest()
