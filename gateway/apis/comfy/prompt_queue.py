"""ComfyUI's queue: `GET /prompt` (how many jobs the pool has queued or running), `GET /queue` (the caller's
running and pending prompts), `POST /queue` (delete, clear) and `POST /interrupt`."""

from __future__ import annotations

from aiohttp import web

from gateway.apis.comfy.errors import failure, from_problem
from gateway.apis.comfy.record import ComfyPrompt, visible
from gateway.apis.comfy.routing import comfy_route
from gateway.core.caller import SERVICE, owner_of
from gateway.core.problems import BROKER_DOWN, classify
from gateway.core.records import UNFINISHED
from gateway.core.service import JobService
from gateway.http.http_errors import read_json
from schemas.request import RequestInvalid
from schemas.status import JobState

routes = web.RouteTableDef()

MAX_QUEUE_LISTED = 1000


def queue_remaining(jobs: JobService) -> int:
    """ComfyUI's `queue_remaining`: the jobs queued or running on the pool, every caller's."""
    return sum(len(queue) for queue in jobs.view.queued.values()) + len(jobs.view.running)


@comfy_route(routes, "GET", "/prompt")
async def queue_size(request: web.Request) -> web.Response:
    return web.json_response({"exec_info": {"queue_remaining": queue_remaining(request.app[SERVICE])}})


def unfinished_prompts(jobs: JobService, owner: str | None) -> tuple[list[ComfyPrompt], list[ComfyPrompt]]:
    """(running, pending): the caller's prompts with a job running, and those with jobs queued only."""
    running: dict[str, ComfyPrompt] = {}
    pending: dict[str, ComfyPrompt] = {}
    for status in jobs.page(owner=owner, states=UNFINISHED, limit=MAX_QUEUE_LISTED):
        prompt = jobs.comfy.of_job(status.job_id)
        if prompt is None:
            continue
        if status.state is JobState.RUNNING:
            running[prompt.prompt_id] = prompt
            pending.pop(prompt.prompt_id, None)
        elif prompt.prompt_id not in running:
            pending[prompt.prompt_id] = prompt
    return sorted(running.values(), key=lambda p: p.number), sorted(pending.values(), key=lambda p: p.number)


@comfy_route(routes, "GET", "/queue")
async def queue(request: web.Request) -> web.Response:
    running, pending = unfinished_prompts(request.app[SERVICE], owner_of(request))
    return web.json_response({"queue_running": [p.queue_entry() for p in running], "queue_pending": [p.queue_entry() for p in pending]})


async def cancelled(jobs: JobService, prompts: list[ComfyPrompt], owner: str | None) -> web.Response:
    """Cancels the prompts' jobs (a running one stops at its next step) and answers for it."""
    try:
        await jobs.cancel_each([job_id for prompt in prompts for job_id in prompt.job_ids], owner=owner)
    except BROKER_DOWN as exc:
        return from_problem(classify(exc), "comfy cancel", exc)
    return web.json_response({})


@comfy_route(routes, "POST", "/queue")
async def change_queue(request: web.Request) -> web.Response:
    """`{"delete": [prompt ids]}` drops those prompts (a running one stops at its next step); `{"clear": true}`
    drops every pending prompt of the caller."""
    jobs: JobService = request.app[SERVICE]
    owner = owner_of(request)
    try:
        body = await read_json(request)
    except RequestInvalid as exc:
        return failure(400, "invalid_request", "Cannot read the request", str(exc))
    if not isinstance(body, dict) or not isinstance(body.get("delete", []), list) or not isinstance(body.get("clear", False), bool):
        return failure(400, "invalid_request", 'send {"delete": [prompt_id, ...]} or {"clear": true}')
    doomed = [p for prompt_id in body.get("delete", []) if visible(p := jobs.comfy.get(str(prompt_id), owner), owner)]
    if body.get("clear"):
        doomed += unfinished_prompts(jobs, owner)[1]
    return await cancelled(jobs, doomed, owner)


@comfy_route(routes, "POST", "/interrupt")
async def interrupt(request: web.Request) -> web.Response:
    """Stops the caller's running prompt (or the one named by `{"prompt_id": ...}`): its jobs end cancelled."""
    jobs: JobService = request.app[SERVICE]
    owner = owner_of(request)
    body: object = {}
    if request.can_read_body:
        try:
            body = await read_json(request)
        except RequestInvalid as exc:
            return failure(400, "invalid_request", "Cannot read the request", str(exc))
    named = body.get("prompt_id") if isinstance(body, dict) else None
    if named:
        prompt = jobs.comfy.get(str(named), owner)
        return await cancelled(jobs, [prompt] if visible(prompt, owner) else [], owner)
    return await cancelled(jobs, unfinished_prompts(jobs, owner)[0], owner)
