"""Reading a multipart or urlencoded form body, for every API that takes one: whatever is wrong with
the body (a NUL or other bad byte in a part's headers, a broken boundary, an unknown encoding or
charset, a truncated body) is a RequestInvalid naming it, never an exception from deep in aiohttp."""

from __future__ import annotations

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import MultiDictProxy

from schemas.request import RequestInvalid

MAX_DETAIL_CHARS = 200


def unreadable(exc: BaseException) -> RequestInvalid:
    detail = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    detail = " ".join(str(detail).split())[:MAX_DETAIL_CHARS]
    return RequestInvalid([{"field": "body", "message": f"not a readable form: {detail}"}])


async def read_form(request: web.Request) -> MultiDictProxy:
    """The form's fields (files as web.FileField); RequestInvalid when the body is not a readable
    form. A body over the size limit still raises web.HTTPRequestEntityTooLarge (413)."""
    try:
        return await request.post()
    except web.HTTPRequestEntityTooLarge:
        raise
    except web.HTTPException as exc:  # aiohttp's own refusals of a form, too many fields say
        raise unreadable(Exception(exc.text or exc.reason)) from None
    except web.RequestPayloadError as exc:  # a Content-Encoding that does not decode, a broken chunk
        raise unreadable(exc.__cause__ or exc) from None
    except (HttpProcessingError, ValueError, LookupError, RuntimeError, TypeError, AssertionError) as exc:
        # HttpProcessingError: a part's headers (a NUL in filename="x.png\0.txt", too many headers);
        # ValueError / UnicodeDecodeError: the boundary, a field's charset; LookupError: an unknown
        # codec; RuntimeError: an unknown Content-Transfer-Encoding; TypeError: a part aiohttp cannot decode
        raise unreadable(exc) from None
