"""Reading a request body within bounds, before any handler sees it.

One middleware reads the body of every POST, PUT, PATCH and DELETE that has one: it refuses a
Content-Length over the route's cap before reading a byte, inflates gzip or deflate itself in steps of
256 KiB (yielding to the event loop between steps) and stops at the cap, and gives the whole body a
deadline. A route whose body may carry images inline (marked with `takes_images`) may take
`GatewaySettings.body_limit_bytes`; every other route `max_json_bytes`. It counts a JSON body's keys and
items (its ',' and ':') chunk by chunk as they arrive and stops at `max_json_items`, so a body of a
million keys is refused before it is parsed (seconds) or validated (more seconds). After refusing a
bomb, a body of keys or a body too slow it closes the connection instead of reading the rest. A small
plain body that arrived whole with its headers (most JSON requests) is taken at once, with the same
checks and no deadline to keep. The JSON reader parses a body over `OFF_LOOP_BYTES` in a thread.
"""

from __future__ import annotations

import asyncio
import zlib
from dataclasses import dataclass

from aiohttp import web
from aiohttp.streams import StreamReader

from schemas.request import RequestInvalid

INFLATE_STEP_BYTES = 256 * 1024  # the most one call of the inflater makes before the loop runs again
OFF_LOOP_BYTES = 64 * 1024  # JSON bodies larger than this are parsed in a thread
COUNT_STEP_BYTES = 64 * 1024  # ',' and ':' are counted this many bytes at a time
ARRIVED_BYTES = 64 * 1024  # a plain body up to this size that has arrived whole is taken at once
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass(frozen=True, kw_only=True)
class BodyLimits:
    """The bounds of a request body (from GatewaySettings)."""

    max_bytes: int  # a route that takes no image
    max_image_bytes: int  # a route marked with takes_images
    max_json_items: int
    timeout_s: float


class BodyTooLarge(Exception):
    """413: the body (as sent, or once inflated) is over the route's cap; the text says which."""


class BodyTooSlow(Exception):
    """408: the body did not arrive within the deadline."""


class EncodingRefused(Exception):
    """415: a Content-Encoding other than gzip, deflate or identity."""


def takes_images(handler):
    """Marks a route whose JSON body may carry images inline: its cap is max_image_bytes."""
    handler.takes_images = True
    return handler


def route_cap(request: web.Request, limits: BodyLimits) -> int:
    handler = getattr(request.match_info, "handler", None)
    return limits.max_image_bytes if getattr(handler, "takes_images", False) else limits.max_bytes


def inflater(encoding: str, first: bytes):
    """A zlib inflater for gzip or deflate (`first`: the body's first bytes); deflate is taken with or without its
    zlib header (as aiohttp takes it), since some clients send the raw stream."""
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    return zlib.decompressobj(zlib.MAX_WBITS if first[0] & 0x0F == 8 else -zlib.MAX_WBITS)


def unreadable(encoding: str, detail: str) -> RequestInvalid:
    return RequestInvalid([{"field": "body", "message": f"unreadable body: {detail} (Content-Encoding {encoding})"}])


class Body:
    """The body as it is read: its chunks, its size, and its count of ',' and ':' (JSON's keys and
    items, strings included) when `max_items` is set, each checked as each chunk arrives."""

    def __init__(self, *, cap: int, max_items: int | None):
        self.cap, self.max_items = cap, max_items
        self.chunks: list[bytes] = []
        self.size = self.items = 0

    def add(self, chunk: bytes, too_large: str) -> None:
        self.chunks.append(chunk)
        self.size += len(chunk)
        if self.size > self.cap:
            raise BodyTooLarge(too_large)
        if self.max_items is not None:
            for start in range(0, len(chunk), COUNT_STEP_BYTES):  # a chunk may be megabytes: stop at the first slice over
                end = start + COUNT_STEP_BYTES
                self.items += chunk.count(b",", start, end) + chunk.count(b":", start, end)
                if self.items > self.max_items:
                    raise too_many_items(self.max_items)

    def data(self) -> bytes:
        return b"".join(self.chunks)


def too_many_items(max_items: int) -> RequestInvalid:
    return RequestInvalid([{
        "field": "body",
        "message": f"too many keys and items: over {max_items} ',' and ':' in the JSON (a key or an item each)",
    }])


async def inflate_into(body: Body, inflate, chunk: bytes, encoding: str) -> None:
    """Adds what `chunk` inflates to, one step at a time, stopping as soon as the body passes its cap."""
    data = chunk
    while data and not inflate.eof:
        try:
            out = inflate.decompress(data, INFLATE_STEP_BYTES)
        except zlib.error as exc:
            raise unreadable(encoding, f"not {encoding} data ({exc})") from None
        body.add(out, f"inflates past {body.cap} bytes, the cap of this route (Content-Encoding {encoding})")
        data = inflate.unconsumed_tail
        if data:
            await asyncio.sleep(0)  # a bomb inflates in steps, with the event loop running between them


async def read_body(request: web.Request, *, cap: int, timeout_s: float, max_items: int | None = None) -> bytes:
    """The body, inflated, of at most `cap` bytes (and `max_items` ',' and ':' when set), read within
    `timeout_s` seconds."""
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    inflated_by_aiohttp = request.content.total_compressed_bytes is not None
    if inflated_by_aiohttp:
        encoding = ""
    length = request.content_length
    if length is not None and length > cap:
        raise BodyTooLarge(f"Content-Length {length} is over {cap} bytes, the cap of this route")
    if encoding not in ("", "identity", "gzip", "x-gzip", "deflate"):
        raise EncodingRefused(f"Content-Encoding {encoding[:40]!r} is not taken; send gzip, deflate or none")
    body = Body(cap=cap, max_items=max_items)
    inflate = None
    arrived = (  # a small plain body read whole with its headers: nothing to wait for, no deadline to keep
        encoding in ("", "identity") and not inflated_by_aiohttp and length is not None and length <= ARRIVED_BYTES
        and request.content.is_eof()
    )
    try:
        if arrived:
            body.add(request.content.read_nowait(), f"over {cap} bytes, the cap of this route")
            return body.data()
        async with asyncio.timeout(timeout_s):
            while chunk := await request.content.readany():
                if inflate is None and encoding not in ("", "identity"):
                    inflate = inflater(encoding, chunk)
                if inflate is not None:
                    try:
                        await inflate_into(body, inflate, chunk, encoding)
                    except BodyTooLarge:
                        drop_rest(request)  # a bomb: its rest is not worth reading
                        raise
                else:
                    body.add(chunk, f"over {cap} bytes, the cap of this route")
    except TimeoutError:
        drop_rest(request)
        raise BodyTooSlow(f"the body did not arrive within {timeout_s:g} s") from None
    except RequestInvalid:  # too many keys and items
        drop_rest(request)
        raise
    except web.RequestPayloadError as exc:  # a broken chunk, a body cut short
        detail = getattr(exc.__cause__, "message", None) or " ".join(str(exc).split())
        raise RequestInvalid([{"field": "body", "message": f"unreadable body: {detail}"}]) from None
    if inflate is not None and not inflate.eof:
        raise unreadable(encoding, f"the {encoding} data ends early")
    return body.data()


def drop_rest(request: web.Request) -> None:
    """After the answer, close the connection at once instead of reading and dropping the rest of the
    body for up to the lingering time (aiohttp's default for a body left unread): kept for an honest
    body over the size cap, whose client may still be sending, not for a bomb, a body of a million
    keys or one that crawls. (aiohttp has no public switch for one connection.)"""
    if hasattr(request.protocol, "_lingering_time"):
        request.protocol._lingering_time = 0.0


def keep(request: web.Request, data: bytes) -> None:
    """Hands the body read to the handler: `read()` answers it, and `post()`/`multipart()` read it from
    a fresh stream (aiohttp offers no public way to put a body back)."""
    request._read_bytes = data
    stream = StreamReader(request.protocol, max(len(data), 2**16), loop=asyncio.get_running_loop())
    if data:
        stream.feed_data(data)
    stream.feed_eof()
    request._payload = stream


def body_middleware(limits: BodyLimits):
    @web.middleware
    async def bounded_body(request: web.Request, handler):
        if request.method in BODY_METHODS and request.body_exists:
            counted = None if request.content_type.startswith("multipart/") else limits.max_json_items
            keep(request, await read_body(request, cap=route_cap(request, limits), timeout_s=limits.timeout_s, max_items=counted))
        return await handler(request)

    return bounded_body
