"""Errors in FastAPI's shape, as AUTOMATIC1111's API gives them: 422
`{"detail": [{"loc": ["body", field], "msg", "type"}]}` for a bad field, `{"detail": message}` otherwise
(403/429 for the API key's limits, 502 when a job failed on a worker, 503 while NATS is away, 504 after
the wait); `answered()` gives every failure of a handler in that shape."""

from __future__ import annotations

import logging

from aiohttp import web

from gateway.core.problems import Problem, classify
from schemas.request import RequestInvalid

log = logging.getLogger("imagegen.gateway.a1111")

# This service's request fields, by the A1111 field they come from.
A1111_FIELD = {"guidance": "cfg_scale", "n": "batch_size", "scheduler": "sampler_name", "model": "override_settings",
               "use_refiner": "refiner_checkpoint", "refiner_split": "refiner_switch_at", "format": "body",
               "init_image": "init_images", "strength": "denoising_strength", "mask_image": "mask",
               "loras": "prompt", "eta": "eta", "hires": "enable_hr", "controlnet": "alwayson_scripts"}


class A1111Failure(Exception):
    """An answer in FastAPI's error shape, as A1111's API gives them."""

    def __init__(self, status: int, message: str, *, field: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers

    def response(self) -> web.Response:
        if self.status == 422:
            loc = ["body"] if self.field in (None, "body") else ["body", self.field]
            detail: object = [{"loc": loc, "msg": self.message, "type": "value_error"}]
        else:
            detail = self.message
        return web.json_response({"detail": detail}, status=self.status, headers=self.headers)


def invalid(field: str | None, message: str) -> A1111Failure:
    return A1111Failure(422, f"{field}: {message}" if field and field != "body" else message, field=field)


def from_request_invalid(exc: RequestInvalid) -> A1111Failure:
    """A request this service refused, under the A1111 names of its fields."""
    errors = exc.errors or [{"field": "body", "message": str(exc)}]
    named = [(A1111_FIELD.get(e["field"], e["field"]), e["message"]) for e in errors]
    return A1111Failure(422, "; ".join(f"{field}: {message}" for field, message in named), field=named[0][0])


async def answered(run, request: web.Request) -> web.Response:
    """`run(request)`, with every failure in FastAPI's shape."""
    try:
        return await run(request)
    except A1111Failure as exc:
        return exc.response()
    except RequestInvalid as exc:
        return from_request_invalid(exc).response()
    except web.HTTPRequestEntityTooLarge as exc:
        return A1111Failure(413, f"body too large: {exc.text}").response()
    except Exception as exc:
        if (problem := classify(exc)) is None:
            raise
        return from_problem(problem, exc).response()


def from_problem(problem: Problem, exc: BaseException) -> A1111Failure:
    """A neutral Problem in FastAPI's shape: a job that failed over a field of its request is a 422
    naming the A1111 field; the rest keep their status, with Retry-After when advised."""
    if problem.status == 503:
        log.warning("sdapi request: broker unavailable: %s", exc)
    if problem.status == 400 and problem.field is not None:
        return invalid(A1111_FIELD.get(problem.field, problem.field), problem.message)
    headers = None if problem.retry_after_s is None else {"Retry-After": str(problem.retry_after_s)}
    return A1111Failure(problem.status, problem.message, headers=headers)
