"""Full buckets: every KV bucket and object store has a `max_bytes` (`schemas.jetstream.Topology`), and
the server refuses a write past it ("maximum bytes exceeded", answered as a 503 like a broker that is
away). `StoreFull` tells the two apart, naming the bucket and its limit, so that a client gets 507 and
a job fails with the reason instead of being retried; `check_room` refuses before writing, when the
stream's own figures already say the bytes do not fit (no half-written object left behind).
"""

from __future__ import annotations

from typing import Any

from nats.js.errors import APIError

STORE_FAILED = 10077  # JetStream's "store failed" error code; its text says why


class StoreFull(Exception):
    """A bucket has no room for a write: `bucket`, its `max_bytes`, the message for the client."""

    def __init__(self, bucket: str, max_bytes: int | None, flag: str | None = None):
        limit = f"its limit of {max_bytes} bytes" if max_bytes and max_bytes > 0 else "its limit"
        set_by = f" ({flag})" if flag else ""
        super().__init__(f"storage full: {bucket} has reached {limit}{set_by}; retry after older entries expire")
        self.bucket, self.max_bytes = bucket, max_bytes


def is_full(exc: BaseException) -> bool:
    return isinstance(exc, APIError) and exc.err_code == STORE_FAILED and "maximum bytes" in (exc.description or "")


async def stream_room(js: Any, stream: str) -> tuple[int, int]:
    """(bytes stored, max_bytes; -1 for none) of a bucket's stream."""
    info = await js.stream_info(stream)
    return info.state.bytes or 0, info.config.max_bytes or -1


async def check_room(js: Any, stream: str, bucket: str, size: int, *, flag: str | None = None) -> None:
    """StoreFull when `size` more bytes would take the bucket past its max_bytes."""
    used, limit = await stream_room(js, stream)
    if limit > 0 and used + size > limit:
        raise StoreFull(bucket, limit, flag)


def full_message(exc: BaseException) -> str | None:
    """The client's message when `exc` says a bucket is full, else None (a broker away, say)."""
    if isinstance(exc, StoreFull):
        return str(exc)
    if is_full(exc):
        return f"storage full: {exc.description}; retry after older entries expire"
    return None
