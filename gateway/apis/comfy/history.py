"""ComfyUI's `GET /history` and `GET /history/{prompt_id}`: the caller's finished prompts, their outputs,
and the times their jobs started and ended."""

from __future__ import annotations

from aiohttp import web

from gateway.apis.comfy.errors import failure
from gateway.apis.comfy.node_classes import SOCKET_OUTPUT
from gateway.apis.comfy.outcome import ending, finished, job_records, output_images
from gateway.apis.comfy.record import ComfyPrompt, visible
from gateway.apis.comfy.routing import comfy_route
from gateway.core.caller import SERVICE, owner_of
from gateway.core.service import JobService
from schemas.status import JobStatus

routes = web.RouteTableDef()

MAX_HISTORY = 10_000  # entries /history gives without max_items, as ComfyUI keeps at most


def history_entry(prompt: ComfyPrompt, records: list[JobStatus | None]) -> dict:
    kind, data = ending(prompt, records)
    starts = [r.started_at for r in records if r is not None and r.started_at is not None]
    started = {"prompt_id": prompt.prompt_id, "timestamp": int(min(starts, default=prompt.submitted_at) * 1000)}
    return {
        "prompt": prompt.queue_entry(),
        "outputs": output_images(prompt, records) if kind == "execution_success" else {},
        "status": {
            "status_str": "success" if kind == "execution_success" else "error",
            "completed": kind == "execution_success",
            "messages": [["execution_start", started], ["execution_cached", {**started, "nodes": []}], [kind, data]],
        },
        "meta": {node: {"node_id": node, "display_node": node, "parent_node": None, "real_node_id": node}
                 for node, kind in prompt.outputs.items() if kind != SOCKET_OUTPUT},
    }


@comfy_route(routes, "GET", "/history/{prompt_id}")
async def history_of(request: web.Request) -> web.Response:
    """The prompt once every job of it has ended; {} before, and for a prompt unknown here."""
    jobs: JobService = request.app[SERVICE]
    owner = owner_of(request)
    prompt = jobs.comfy.get(request.match_info["prompt_id"], owner)
    if not visible(prompt, owner):
        return web.json_response({})
    records = await job_records(jobs, prompt, owner)
    if not finished(records):
        return web.json_response({})
    return web.json_response({prompt.prompt_id: history_entry(prompt, records)})


@comfy_route(routes, "GET", "/history")
async def history(request: web.Request) -> web.Response:
    """The caller's finished prompts, oldest first; the newest `max_items` when given."""
    jobs: JobService = request.app[SERVICE]
    owner = owner_of(request)
    raw = request.query.get("max_items")
    try:
        most = int(raw) if raw is not None else None
        if most is not None and most < 1:
            raise ValueError
    except ValueError:
        return failure(400, "invalid_query", "max_items must be a whole number of at least 1", repr(raw))
    entries: list[tuple[str, dict]] = []
    most = min(most or MAX_HISTORY, MAX_HISTORY)
    for prompt in reversed(list(jobs.comfy.by_key.values())):
        if len(entries) >= most:
            break
        if not visible(prompt, owner):
            continue
        records = await job_records(jobs, prompt, owner)
        if finished(records):
            entries.append((prompt.prompt_id, history_entry(prompt, records)))
    return web.json_response(dict(reversed(entries)))
