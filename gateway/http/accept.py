"""Whether a submit is answered with the image itself: content negotiation on its Accept header.

`POST /v1/jobs` with a wait and `Accept: image/png` (or `image/*`, or the job's own type ranked above
`application/json`) answers 201 with the finished image's bytes, so one request gives the image, as
the one-process tutorial server does. The media ranges are read as RFC 9110 says: the most specific
range that matches a type gives its quality; a missing header accepts anything; JSON wins a tie.
"""

from __future__ import annotations

import math

JSON = "application/json"


class NotAcceptable(Exception):
    """No answer this submit can give is one the Accept header takes; the text says why."""


def media_ranges(header: str) -> list[tuple[str, float]]:
    """(range, q) for each media range of an Accept header, lower-cased; a q that does not parse is 0."""
    ranges = []
    for item in header.split(","):
        name, *params = (part.strip() for part in item.split(";"))
        if not name:
            continue
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
                q = min(max(q, 0.0), 1.0) if math.isfinite(q) else 0.0
        ranges.append((name.lower(), q))
    return ranges


def quality(ranges: list[tuple[str, float]], media_type: str) -> float:
    """How much the ranges want `media_type`: the q of its most specific matching range, else 0."""
    kind = media_type.split("/", 1)[0] + "/*"
    best: tuple[int, float] = (-1, 0.0)
    for name, q in ranges:
        rank = 2 if name == media_type else 1 if name == kind else 0 if name == "*/*" else -1
        if rank > best[0]:
            best = (rank, q)
    return best[1]


def answers_image(accept: str | None, *, content_type: str, images: int, waits: bool) -> bool:
    """True when the submit's answer is to be the image of type `content_type`; False for JSON.
    Raises NotAcceptable when the header takes neither the image nor JSON, naming what would do."""
    if not accept or not accept.strip():
        return False
    ranges = media_ranges(accept)
    json_q = quality(ranges, JSON)
    image_q = quality(ranges, content_type)
    if image_q > json_q and waits and images == 1:
        return True
    if json_q > 0:
        return False
    if image_q == 0:
        raise NotAcceptable(
            f"Accept {accept[:100]!r} takes neither application/json nor {content_type}, the type this job makes"
            " (set format to the type you accept)"
        )
    if images != 1:
        raise NotAcceptable(f"an answer of type {content_type} holds one image and this request makes {images}; accept application/json")
    raise NotAcceptable(f"an answer of type {content_type} needs the submit to wait for the image: send Prefer: wait (or ?wait=N)")
