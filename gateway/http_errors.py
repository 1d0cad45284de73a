"""One middleware turns every failure into a JSON answer: 4xx naming the problem, 503 with
Retry-After while NATS is unreachable, and a logged 500 only for a real bug."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from aiohttp import web

from gateway.jobs import BrokerAway, Forbidden, NotReady, UnknownJob
from gateway.ratelimit import RateLimited
from schemas.connect import BROKER_ERRORS
from schemas.request import RequestInvalid

log = logging.getLogger("imagegen.gateway.http")

BROKER_DOWN = (BrokerAway, *BROKER_ERRORS)


def invalid(exc: RequestInvalid) -> web.Response:
    first = exc.errors[0] if exc.errors else {"field": "body", "message": "invalid"}
    return web.json_response({"error": str(exc), "field": first["field"], "errors": exc.errors}, status=400)


async def read_json(request: web.Request) -> Any:
    """The request body as JSON, or a RequestInvalid that says what is wrong with it."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise
    if not raw.strip():
        raise RequestInvalid([{"field": "body", "message": "empty body; send a JSON object"}])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestInvalid([{"field": "body", "message": f"not UTF-8 at byte {exc.start}"}]) from None
    try:
        return json.loads(text)
    except RecursionError:
        raise RequestInvalid([{"field": "body", "message": "JSON nested too deeply"}]) from None
    except json.JSONDecodeError as exc:
        raise RequestInvalid([{"field": "body", "message": f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"}]) from None


@web.middleware
async def errors_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except RequestInvalid as exc:
        return invalid(exc)
    except UnknownJob as exc:
        return web.json_response({"error": f"unknown task_id {exc.args[0]!r}"}, status=404)
    except Forbidden as exc:
        return web.json_response({"error": str(exc), "field": exc.field}, status=403)
    except RateLimited as exc:
        return web.json_response({"error": str(exc)}, status=429, headers={"Retry-After": str(exc.retry_after_s)})
    except NotReady as exc:
        return web.json_response({"error": str(exc)}, status=404)
    except web.HTTPRequestEntityTooLarge as exc:
        return web.json_response({"error": f"body too large: {exc.text}", "field": "body"}, status=413)
    except web.HTTPException as exc:
        if exc.content_type == "application/json":
            raise
        return web.json_response({"error": exc.reason}, status=exc.status, headers={
            k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")
        })
    except BROKER_DOWN as exc:
        log.warning("%s %s: broker unavailable: %s", request.method, request.path, exc)
        return web.json_response(
            {"error": "the job broker (NATS) is unavailable; retry shortly"}, status=503, headers={"Retry-After": "2"}
        )
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return web.json_response({"error": "internal error"}, status=500)
