"""One middleware turns every failure into a JSON answer: 4xx naming the problem, 503 with
Retry-After while NATS is unreachable, and a logged 500 only for a real bug; and the JSON reader. A request
too malformed to reach a handler (a bad request line or header) is answered 400 by aiohttp and logged as one
WARNING line by ServerLog, not as an ERROR with a traceback."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gateway.http.accept import NotAcceptable
from gateway.http.body import OFF_LOOP_BYTES, BodyTooLarge, BodyTooSlow, EncodingRefused
from gateway.core.problems import Problem, classify
from schemas.request import RequestInvalid

log = logging.getLogger("imagegen.gateway.http")

MAX_LISTED_ERRORS = 20  # a body of 100,000 unknown fields gets an answer of a readable size
MAX_ERROR_CHARS = 300  # an 8 MB model name is not echoed back whole


def clipped(text: str) -> str:
    return text if len(text) <= MAX_ERROR_CHARS else f"{text[:MAX_ERROR_CHARS]}... ({len(text)} characters)"


def invalid(exc: RequestInvalid) -> web.Response:
    first = exc.errors[0] if exc.errors else {"field": "body", "message": "invalid"}
    listed = [{**e, "field": clipped(e["field"]), "message": clipped(e["message"])} for e in exc.errors[:MAX_LISTED_ERRORS]]
    text = str(RequestInvalid(listed))
    if len(listed) < len(exc.errors):
        text += f"; and {len(exc.errors) - len(listed)} more"
    return web.json_response({"error": text, "field": clipped(first["field"]), "errors": listed}, status=400)


def lone_surrogate(data: Any) -> str | None:
    """The first string in decoded JSON that holds half of a UTF-16 surrogate pair (from an escape such
    as \\ud800), which no UTF-8 text, and so no message or record downstream, can carry."""
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.object[exc.start : exc.end].encode("unicode_escape").decode("ascii")
    except RecursionError:  # as deep as json.loads allows, deeper than dumps does: nothing to say
        pass
    return None


def decode_json(raw: bytes) -> Any:
    """The bytes as JSON, or a RequestInvalid that says what is wrong with them."""
    if not raw.strip():
        raise RequestInvalid([{"field": "body", "message": "empty body; send a JSON object"}])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestInvalid([{"field": "body", "message": f"not UTF-8 at byte {exc.start}"}]) from None
    try:
        data = json.loads(text)
    except RecursionError:
        raise RequestInvalid([{"field": "body", "message": "JSON nested too deeply"}]) from None
    except json.JSONDecodeError as exc:
        raise RequestInvalid([{"field": "body", "message": f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"}]) from None
    except ValueError:  # the one other refusal of json.loads: an integer of more than 4300 digits
        raise RequestInvalid([{"field": "body", "message": "not JSON: a number with more than 4300 digits"}]) from None
    if "\\u" in text and (half := lone_surrogate(data)) is not None:
        raise RequestInvalid([{"field": "body", "message": f"not valid Unicode: a lone surrogate {half}"}])
    return data


async def read_json(request: web.Request) -> Any:
    """The request body as JSON, or a RequestInvalid that says what is wrong with it: the body as the
    body middleware read it (within its caps), a large one parsed in a thread."""
    raw = await request.read()
    if len(raw) > OFF_LOOP_BYTES:
        return await asyncio.to_thread(decode_json, raw)
    return decode_json(raw)


@web.middleware
async def errors_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except RequestInvalid as exc:
        return invalid(exc)
    except NotAcceptable as exc:
        return web.json_response({"error": str(exc), "field": "Accept"}, status=406)
    except web.HTTPRequestEntityTooLarge as exc:
        return web.json_response({"error": f"body too large: {exc.text}", "field": "body"}, status=413)
    except BodyTooLarge as exc:
        return web.json_response({"error": f"body too large: {exc}", "field": "body"}, status=413)
    except BodyTooSlow as exc:
        return web.json_response({"error": f"request timeout: {exc}", "field": "body"}, status=408)
    except EncodingRefused as exc:
        return web.json_response({"error": str(exc), "field": "Content-Encoding"}, status=415)
    except web.HTTPException as exc:
        if exc.content_type == "application/json":
            raise
        return web.json_response({"error": exc.reason}, status=exc.status, headers={
            k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")
        })
    except HttpProcessingError as exc:  # a body part's headers aiohttp refused, read by a handler
        return web.json_response({"error": f"malformed request: {clipped(' '.join(str(exc.message).split()))}", "field": "body"}, status=400)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        if (problem := classify(exc)) is not None:
            return rendered(problem, f"{request.method} {request.path}", exc)
        log.exception("%s %s failed", request.method, request.path)
        return web.json_response({"error": "internal error"}, status=500)


def rendered(problem: Problem, what: str, exc: BaseException) -> web.Response:
    """A neutral Problem in the native shape: {"error", "field"?}, Retry-After when it advises one."""
    if problem.status == 503:
        log.warning("%s: broker unavailable: %s", what, exc)
    body = {"error": problem.message} if problem.field is None else {"error": problem.message, "field": problem.field}
    headers = None if problem.retry_after_s is None else {"Retry-After": str(problem.retry_after_s)}
    return web.json_response(body, status=problem.status, headers=headers)


def one_line(exc: HttpProcessingError) -> str:
    """aiohttp's parser message (the reason, the offending line, a caret under it) on one line."""
    lines = (line.strip() for line in str(exc.message).splitlines())
    return clipped(" ".join(line for line in lines if line and set(line) != {"^"}))


class ServerLog(logging.LoggerAdapter):
    """aiohttp's server logger, less the traceback of a malformed request: aiohttp answers it 400 and
    logs it with logger.exception; this makes that one WARNING line naming the client and the problem.
    Any other exception is logged as aiohttp logs it."""

    def __init__(self, logger: logging.Logger | None = None):
        super().__init__(logger or logging.getLogger("aiohttp.server"), {})

    def exception(self, msg, *args, exc_info=True, **kwargs) -> None:
        if isinstance(exc_info, HttpProcessingError):
            self.logger.warning("malformed request from %s: %s", args[0] if args else "?", one_line(exc_info))
            return
        self.logger.exception(msg, *args, exc_info=exc_info, **kwargs)
