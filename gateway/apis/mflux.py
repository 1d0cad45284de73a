"""mflux-server's HTTP API, unchanged, under /api (see its server.py): generate, status, image,
cancel, tasks, clear, ls, ps, load."""

from __future__ import annotations

import base64

from aiohttp import web

from gateway.http.body import takes_images
from gateway.http.http_errors import read_json
from gateway.core.caller import SERVICE, caller, owner_of
from gateway.core.service import JobService
from gateway.core.submission import submit_request
from gateway.http.views.mflux import LoadRequest, MfluxGenerateResponse, MfluxPs, MfluxStatusResponse, MfluxTask, ModelInfo
from schemas.request import RequestInvalid, parse_request
from schemas.status import JobState, JobStatus

routes = web.RouteTableDef()


def _jobs(request: web.Request) -> JobService:
    return request.app[SERVICE]


def task_id_param(request: web.Request) -> str:
    task_id = request.query.get("task_id", "").strip()
    if not task_id:
        raise RequestInvalid([{"field": "task_id", "message": "query parameter is required"}])
    return task_id


def bool_param(request: web.Request, name: str, default: bool) -> bool:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise RequestInvalid([{"field": name, "message": f"must be true or false, got {raw!r}"}])


def mflux_status(jobs: JobService, status: JobStatus) -> MfluxStatusResponse:
    if status.state is JobState.DONE:
        return MfluxStatusResponse(status="done", cached=status.cached or None, nsfw=status.nsfw or None)
    if status.state.final:
        return MfluxStatusResponse(status="error", error=status.error or status.state.value)
    return MfluxStatusResponse(
        status="waiting", pos=jobs.position(status) or 0, wait_remaining=round(jobs.eta(status) or 0.0, 2)
    )


def mflux_task(status: JobStatus) -> MfluxTask:
    r = status.request
    return MfluxTask(
        task_id=status.job_id,
        status=status.state.value,
        prompt=r.get("prompt", ""),
        seed=status.seed,
        width=r.get("width", 1024),
        height=r.get("height", 1024),
        steps=r.get("steps"),
        guidance=r.get("guidance"),
        format=r.get("format", "JPEG"),
        quality=r.get("quality", 85),
        priority=status.tier.value == "high",
        start_time=status.started_at,
        compute_time=status.compute_time,
        end_time=status.finished_at,
    )


@routes.post("/api/generate")
@takes_images
async def generate(request: web.Request) -> web.Response:
    jobs = _jobs(request)
    body = parse_request(await read_json(request), limits=jobs.settings.limits)
    queued = await submit_request(jobs, body, **caller(request))
    status = queued[0]
    answer = MfluxGenerateResponse(
        task_id=status.job_id,
        task_length=jobs.task_length(status),
        expected_time_seconds=round(jobs.eta(status) or 0.0, 2),
        cached=status.cached or None,
        task_ids=[s.job_id for s in queued] if len(queued) > 1 else None,
        group_id=status.group_id,
    )
    return web.json_response(answer.model_dump(exclude_none=True))


@routes.get("/api/status")
async def status(request: web.Request) -> web.Response:
    jobs = _jobs(request)
    job = await jobs.get(task_id_param(request), owner=owner_of(request))
    return web.json_response(mflux_status(jobs, job).model_dump(exclude_none=True))


@routes.get("/api/image")
async def image(request: web.Request) -> web.Response:
    jobs = _jobs(request)
    task_id = task_id_param(request)
    as_base64 = bool_param(request, "base64", False)
    delete = bool_param(request, "delete", True)
    job, data = await jobs.image(task_id, owner=owner_of(request))
    if delete:
        await jobs.delete(task_id, owner=owner_of(request))
    if as_base64:
        return web.Response(text=base64.b64encode(data).decode("ascii"), content_type="text/plain")
    return web.Response(body=data, content_type=job.image.content_type)


@routes.get("/api/cancel")
async def cancel(request: web.Request) -> web.Response:
    job = await _jobs(request).cancel(task_id_param(request), owner=owner_of(request))
    return web.json_response({"task_id": job.job_id, "status": job.state.value, "cancel_requested": job.cancel_requested})


@routes.get("/api/tasks")
async def tasks(request: web.Request) -> web.Response:
    listed = [mflux_task(s).model_dump() for s in _jobs(request).list(owner=owner_of(request))]
    return web.json_response(listed)


@routes.get("/api/clear")
async def clear(request: web.Request) -> web.Response:
    removed = await _jobs(request).clear(owner=owner_of(request))
    return web.json_response({"cleared": removed})


@routes.get("/api/ls")
async def ls(request: web.Request) -> web.Response:
    models = {
        name: ModelInfo(
            steps=workers[0].default_steps,
            guidance=workers[0].default_guidance,
            refiner=any(w.has_refiner for w in workers),
            workers=len(workers),
        ).model_dump()
        for name, workers in _jobs(request).served_models().items()
    }
    return web.json_response(models)


@routes.get("/api/ps")
async def ps(request: web.Request) -> web.Response:
    jobs = _jobs(request)
    model = await jobs.current_model()
    workers = jobs.served_models().get(model or "", [])
    answer = MfluxPs(
        model=model,
        default_steps=workers[0].default_steps if workers else None,
        default_guidance=workers[0].default_guidance if workers else None,
        workers=len(workers),
    )
    return web.json_response(answer.model_dump())


@routes.post("/api/load")
async def load(request: web.Request) -> web.Response:
    body = await read_json(request)
    if not isinstance(body, dict) or not isinstance(body.get("model"), str) or not body["model"].strip():
        return web.json_response({"error": "model: a model name is required", "field": "model"}, status=400)
    wanted = LoadRequest(model=body["model"].strip())
    try:
        await _jobs(request).load_model(wanted.model)
    except RequestInvalid as exc:
        return web.json_response({"error": str(exc), "field": "model"}, status=400)
    return web.json_response({"model": wanted.model, "status": "loaded"})
