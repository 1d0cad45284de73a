"""ComfyUI's error shape, `{"error": {"type", "message", "details", "extra_info"}, "node_errors"}`, and a
neutral Problem (`gateway.core.problems.classify`) rendered in it."""

from __future__ import annotations

import logging

from aiohttp import web

from gateway.core.problems import Problem

log = logging.getLogger("imagegen.gateway.comfy")

COMFY_KIND = {403: "forbidden", 429: "rate_limited", 503: "unavailable", 507: "storage_full"}


def failure(status: int, kind: str, message: str, details: str = "") -> web.Response:
    return web.json_response(
        {"error": {"type": kind, "message": message, "details": details, "extra_info": {}}, "node_errors": {}}, status=status
    )


def from_problem(problem: Problem, what: str, exc: BaseException) -> web.Response:
    """A neutral Problem in ComfyUI's error shape, with Retry-After when it advises one."""
    if problem.status == 503:
        log.warning("%s: broker unavailable: %s", what, exc)
    response = failure(problem.status, COMFY_KIND.get(problem.status, problem.code), problem.message)
    if problem.retry_after_s is not None:
        response.headers["Retry-After"] = str(problem.retry_after_s)
    return response
