"""Per-key rate limits that hold across every gateway: a counter per key and minute in KV
`imagegen-ratelimits`, incremented by compare-and-set, so two gateways share one budget."""

from __future__ import annotations

import time

from nats.js.errors import KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue


class RateLimited(Exception):
    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


async def take(kv: KeyValue, name: str, *, per_minute: int, now: float | None = None, tries: int = 50) -> None:
    """Counts one request of `name` in this minute; raises RateLimited when the budget is spent."""
    now = time.time() if now is None else now
    window = int(now // 60)
    key = f"{name.encode().hex()}.{window}"
    retry_after = max(1, int((window + 1) * 60 - now) + 1)
    for _ in range(tries):
        try:
            entry = await kv.get(key)
            count, revision = int(entry.value or b"0"), entry.revision
        except (KeyNotFoundError, KeyDeletedError):
            count, revision = 0, None
        if count >= per_minute:
            raise RateLimited(f"rate limit of {per_minute} requests per minute reached for key {name!r}", retry_after)
        try:
            if revision is None:
                await kv.create(key, b"1")
            else:
                await kv.update(key, str(count + 1).encode(), last=revision)
            return
        except KeyWrongLastSequenceError:
            continue
    raise RateLimited(f"rate limit counter for key {name!r} is too contended; retry", 1)
