"""The bytes each API key keeps in uploaded images (ComfyUI's `POST /upload/image`), across every
gateway: KV `imagegen-quota`, key `uploads.<key name in hex>`, holds the key's uploads by object name
with their size and time, changed only by compare-and-set. An upload that would take the key past its
budget (`--upload-bytes-per-key`) is refused before it is stored; an upload under a name the key has
already replaces that one's bytes; entries older than the uploads' lifetime (the object store's TTL,
the job TTL) no longer count.
"""

from __future__ import annotations

import json
import time

from nats.js.errors import KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue


class UploadBudgetSpent(Exception):
    """The key's uploads would take more bytes than its budget; the text names the limit."""


def _key(name: str) -> str:
    return f"uploads.{name.encode().hex() or '00'}"


async def take(
    kv: KeyValue, name: str, object_name: str, size: int, *, limit_bytes: int, lifetime_s: float,
    now: float | None = None, tries: int = 100,
) -> None:
    """Counts `size` bytes stored under `object_name` for key `name`, or raises UploadBudgetSpent."""
    key = _key(name)
    for _ in range(tries):
        at = time.time() if now is None else now
        try:
            entry = await kv.get(key)
            held, revision = json.loads(entry.value or b"{}"), entry.revision
        except (KeyNotFoundError, KeyDeletedError):
            held, revision = {}, None
        except ValueError:
            held, revision = {}, entry.revision
        kept = {n: v for n, v in held.items() if n != object_name and isinstance(v, list) and at - v[1] < lifetime_s}
        used = sum(v[0] for v in kept.values())
        if used + size > limit_bytes:
            raise UploadBudgetSpent(
                f"key {name!r} keeps {used} bytes of uploads; {size} more would pass its limit of {limit_bytes} bytes "
                f"(--upload-bytes-per-key); uploads are kept {lifetime_s:.0f}s"
            )
        kept[object_name] = [size, at]
        value = json.dumps(kept, separators=(",", ":")).encode()
        try:
            if revision is None:
                await kv.create(key, value)
            else:
                await kv.update(key, value, last=revision)
            return
        except KeyWrongLastSequenceError:
            continue
    raise UploadBudgetSpent(f"the upload budget of key {name!r} is too contended; retry")
