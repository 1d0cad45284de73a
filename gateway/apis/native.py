"""The native API under /v1: jobs with their full status, events over SSE and WebSocket."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections import Counter
from urllib.parse import urlencode

from aiohttp import WSMsgType, web

from gateway.http.accept import answers_image
from gateway.http.auth import socket_key
from gateway.state.event_feed import event_json, follow
from gateway.http.body import takes_images
from gateway.http.http_errors import read_json
from gateway.core.records import listing_key
from gateway.core.service import JobService
from gateway.core.problems import NotReady, UnknownJob
from gateway.core.caller import SERVICE, caller, owner_of
from gateway.core.submission import group_jobs, submit_request
from schemas.version import __version__
from gateway.http.views.native import GroupView, JobView, LimitsView, WorkersView
from schemas.job import group_job_ids
from schemas.request import RequestInvalid, field_named_by, parse_request
from schemas.status import JobState, JobStatus

log = logging.getLogger("imagegen.gateway.native")
routes = web.RouteTableDef()
MAX_WAIT_S = 60.0  # the longest a submit or a status read waits for a job's end
DEFAULT_PAGE = 100  # jobs a listing answers when it sets no limit
MAX_PAGE = 1000
MAX_FOLLOWED = 1000  # unfinished jobs one WebSocket may follow at once (read when a follow comes: tests lower it)


def job_view(jobs: JobService, status: JobStatus) -> JobView:
    base = f"/v1/jobs/{status.job_id}"
    return JobView(
        job_id=status.job_id,
        state=status.state.value,
        tier=status.tier.value,
        position=jobs.position(status),
        eta_s=jobs.eta(status),
        step=status.step,
        total_steps=status.total_steps,
        seed=status.seed,
        request=status.request,
        submitted_at=status.submitted_at,
        started_at=status.started_at,
        finished_at=status.finished_at,
        worker=status.worker,
        attempt=status.attempt,
        error=status.error,
        cached=status.cached,
        nsfw=status.nsfw,
        image_url=f"{base}/image" if status.state is JobState.DONE else None,
        events_url=f"{base}/events",
        websocket_url=f"{base}/ws",
        init_image=status.init_image,
        mask_image=status.mask_image,
        control_image=status.control_image,
        group_id=status.group_id,
        group_index=status.group_index,
        job_ids=group_job_ids(status.group_id, status.group_size) if status.group_id else None,
        group_url=f"/v1/groups/{status.group_id}" if status.group_id else None,
    )


def group_view(jobs: JobService, group_id: str, members: list[JobStatus]) -> GroupView:
    size = members[0].group_size
    return GroupView(
        group_id=group_id,
        size=size,
        job_ids=group_job_ids(group_id, size),
        states=dict(Counter(s.state.value for s in members)),
        finished=all(s.state.final for s in members),
        jobs=[job_view(jobs, s) for s in members],
    )


def wait_seconds(request: web.Request) -> float:
    """How long the caller will wait for the job's end: `?wait=N`, or on a submit `Prefer: wait=N`
    (RFC 7240, as Replicate's API takes it), at most MAX_WAIT_S; 0 when neither is given."""
    given = request.query.get("wait")
    field = "wait"
    if given is None and request.method == "POST":
        for preference in request.headers.get("Prefer", "").split(","):
            name, _, value = preference.strip().partition("=")
            if name.strip().lower() == "wait":
                given, field = value.strip() or str(MAX_WAIT_S), "Prefer"
    if given is None:
        return 0.0
    try:
        seconds = float(given)
    except ValueError:
        seconds = float("nan")
    if not 0 <= seconds <= MAX_WAIT_S:  # also NaN
        message = f"wait: seconds to wait for the job's end, 0 to {MAX_WAIT_S:g}; got {given[:40]!r}"
        raise RequestInvalid([{"field": field, "message": message}])
    return seconds


@routes.post("/v1/jobs")
@takes_images
async def submit(request: web.Request) -> web.Response:
    """202 with the queued job; with a wait, 201 once the job (every job of a group) has ended within
    it, else 202 with the job as it is then. With a wait and an Accept header that ranks the image's
    type above JSON, the 201 carries the image itself (gateway.http.accept)."""
    jobs = request.app[SERVICE]
    wait_s = wait_seconds(request)
    body = parse_request(await read_json(request), limits=jobs.settings.limits)
    image_answer = answers_image(request.headers.get("Accept"), content_type=body.content_type, images=body.n, waits=wait_s > 0)
    queued = await submit_request(jobs, body, **caller(request))
    status = queued[0]
    if wait_s > 0:
        owner = owner_of(request)
        waited = await asyncio.gather(*(jobs.wait_final(s.job_id, owner=owner, wait_s=wait_s) for s in queued))
        status = waited[0]
        if image_answer and status.state.final:
            return await image_response(jobs, status, owner=owner)
        if all(s.state.final for s in waited):
            return web.json_response(job_view(jobs, status).model_dump(), status=201)
    return web.json_response(job_view(jobs, status).model_dump(), status=202)


async def image_response(jobs: JobService, status: JobStatus, *, owner: str | None) -> web.Response:
    """201 with the ended job's image; when it ended without one, its record as JSON with 400 (it failed
    on a field of the request) or 502 (it failed otherwise, was cancelled or expired)."""
    headers = {"Location": f"/v1/jobs/{status.job_id}", "X-Job-Id": status.job_id}
    if status.state is JobState.DONE:
        status, data = await jobs.image(status.job_id, owner=owner)
        headers["X-Seed"] = str(status.seed)
        return web.Response(body=data, status=201, content_type=status.image.content_type, headers=headers)
    failed_on_request = status.state is JobState.FAILED and field_named_by(status.error) is not None
    return web.json_response(job_view(jobs, status).model_dump(), status=400 if failed_on_request else 502, headers=headers)


@routes.get("/v1/groups/{group_id}")
async def get_group(request: web.Request) -> web.Response:
    jobs = request.app[SERVICE]
    group_id = request.match_info["group_id"]
    try:
        members = await group_jobs(jobs, group_id, owner=owner_of(request))
    except UnknownJob:
        return web.json_response({"error": f"unknown group_id {group_id!r}"}, status=404)
    return web.json_response(group_view(jobs, group_id, members).model_dump())


@routes.get("/v1/limits")
async def limits(request: web.Request) -> web.Response:
    """The limits requests are checked against, so that a client (the web UI) need not guess them."""
    settings = request.app[SERVICE].settings.limits
    return web.json_response(LimitsView(**{name: getattr(settings, name) for name in LimitsView.model_fields}).model_dump())


@routes.get("/v1/workers")
async def workers(request: web.Request) -> web.Response:
    """The live workers: model, device, state, speed, fairness, release. A running job's id is shown
    only where the caller may see that job."""
    jobs = request.app[SERVICE]
    owner = owner_of(request)
    shown = []
    for worker in sorted(jobs.view.live_workers(), key=lambda w: w.worker_id):
        running = jobs.view.jobs.get(worker.job_id or "")
        if worker.job_id and owner is not None and (running is None or running.owner != owner):
            worker = worker.model_copy(update={"job_id": None})
        shown.append(worker)
    return web.json_response(WorkersView(workers=shown, gateway_version=__version__).model_dump())


@routes.get("/v1/jobs")
async def list_jobs(request: web.Request) -> web.Response:
    """The caller's jobs, newest first, a page at a time: `?state=queued,running`, `?limit=N` (1 to
    MAX_PAGE, default DEFAULT_PAGE), and `?before=CURSOR` from the `Link: <...>; rel="next"` header
    of the page before, which is there while more jobs follow."""
    jobs = request.app[SERVICE]
    states, limit, before = list_query(request)
    found = jobs.page(owner=owner_of(request), states=states, before=before, limit=limit + 1)
    headers = {}
    if len(found) > limit:
        found = found[:limit]
        submitted_at, job_id = listing_key(found[-1])
        query = {**request.query, "before": f"{submitted_at!r}_{job_id}"}
        headers["Link"] = f'</v1/jobs?{urlencode(query)}>; rel="next"'
    return web.json_response([job_view(jobs, s).model_dump() for s in found], headers=headers)


def list_query(request: web.Request) -> tuple[frozenset[JobState] | None, int, tuple[float, str] | None]:
    """The states, page size and cursor a listing asks for; RequestInvalid naming a bad one."""
    problems = []
    states = None
    if "state" in request.query:
        names = [n.strip() for n in request.query["state"].split(",") if n.strip()]
        unknown = [n for n in names if n not in JobState._value2member_map_]
        if unknown or not names:
            known = ", ".join(s.value for s in JobState)
            problems.append({"field": "state", "message": f"states to list, comma-separated, of {known}; got {request.query['state'][:80]!r}"})
        else:
            states = frozenset(JobState(n) for n in names)
    limit = DEFAULT_PAGE
    if "limit" in request.query:
        given = request.query["limit"]
        limit = int(given) if given.isascii() and given.isdigit() and len(given) <= 6 else 0
        if not 1 <= limit <= MAX_PAGE:
            problems.append({"field": "limit", "message": f"jobs per page, 1 to {MAX_PAGE}; got {given[:40]!r}"})
    before = None
    if "before" in request.query:
        at, _, job_id = request.query["before"].partition("_")
        try:
            before = (float(at), job_id)
        except ValueError:
            pass
        if before is None or not job_id or not math.isfinite(before[0]):
            before = None
            problems.append({"field": "before", "message": "a cursor from the Link header of the page before"})
    if problems:
        raise RequestInvalid(problems)
    return states, limit, before


@routes.get("/v1/jobs/{job_id}")
async def get_job(request: web.Request) -> web.Response:
    jobs = request.app[SERVICE]
    wait_s = wait_seconds(request)
    status = await jobs.wait_final(request.match_info["job_id"], owner=owner_of(request), wait_s=wait_s)
    return web.json_response(job_view(jobs, status).model_dump())


@routes.get("/v1/jobs/{job_id}/image")
async def get_image(request: web.Request) -> web.Response:
    jobs = request.app[SERVICE]
    status, data = await jobs.image(request.match_info["job_id"], owner=owner_of(request))
    return web.Response(body=data, content_type=status.image.content_type)


@routes.post("/v1/jobs/{job_id}/cancel")
async def cancel_job(request: web.Request) -> web.Response:
    jobs = request.app[SERVICE]
    status = await jobs.cancel(request.match_info["job_id"], owner=owner_of(request))
    return web.json_response(job_view(jobs, status).model_dump())


@routes.delete("/v1/jobs/{job_id}")
async def delete_job(request: web.Request) -> web.Response:
    """An unfinished job is cancelled, as POST .../cancel does (its record stays, to be read and
    deleted later); a finished one (done, failed, cancelled, expired) is removed with its image, as
    mflux-server's `delete=true` removes a task: answered as it was with `deleted: true`, then 404."""
    jobs = request.app[SERVICE]
    job_id, owner = request.match_info["job_id"], owner_of(request)
    status = await jobs.get(job_id, owner=owner)
    if not status.state.final:
        status = await jobs.cancel(job_id, owner=owner)
        return web.json_response(job_view(jobs, status).model_dump())
    view = job_view(jobs, status).model_copy(update={"deleted": True, "image_url": None})
    await jobs.delete(job_id, owner=owner)
    log.info("job %s deleted (%s)", job_id, status.state.value, extra={"job_id": job_id})
    return web.json_response(view.model_dump())


@routes.get("/v1/jobs/{job_id}/events")
async def sse(request: web.Request) -> web.StreamResponse:
    jobs = request.app[SERVICE]
    job_id = request.match_info["job_id"]
    feed = follow(jobs, job_id, owner=owner_of(request))
    first = await anext(feed, None)  # unknown jobs fail here, before the stream starts: a clean 404
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    event = first
    while event is not None:
        payload = json.dumps(event_json(event))
        await response.write(f"event: {event.type}\ndata: {payload}\n\n".encode())
        event = await anext(feed, None)
    await response.write_eof()
    return response


@routes.get("/v1/jobs/{job_id}/ws")
async def job_socket(request: web.Request) -> web.WebSocketResponse:
    return await _socket(request, [request.match_info["job_id"]])


@routes.get("/v1/ws")
async def socket(request: web.Request) -> web.WebSocketResponse:
    return await _socket(request, [])


async def _socket(request: web.Request, job_ids: list[str]) -> web.WebSocketResponse:
    """Sends the events of every followed job as JSON. The client may send
    {"follow": [ids]} to follow more jobs and {"cancel": id} to cancel one. With auth on and no key
    header, the first message must be {"key": KEY} (see gateway.http.auth.socket_key). A job is followed
    until its final event (or its error): then it no longer counts against MAX_FOLLOWED, and following
    it again replays its events; an id followed already, or named twice, counts once."""
    jobs = request.app[SERVICE]
    ws = web.WebSocketResponse(heartbeat=20)
    await ws.prepare(request)
    if not await socket_key(request, ws):
        return ws
    owner = owner_of(request)
    followers: dict[str, asyncio.Task] = {}
    lock = asyncio.Lock()

    async def pump(job_id: str) -> None:
        try:
            async for event in follow(jobs, job_id, owner=owner):
                async with lock:
                    await ws.send_json(event_json(event))
        except UnknownJob:
            async with lock:
                await ws.send_json({"type": "error", "job_id": job_id, "error": f"unknown job {job_id!r}"})
        except (ConnectionResetError, asyncio.CancelledError):
            pass

    def start(job_id: str) -> None:
        if job_id not in followers:
            task = followers[job_id] = asyncio.create_task(pump(job_id))
            task.add_done_callback(lambda _: followers.pop(job_id, None) if followers.get(job_id) is task else None)

    for job_id in job_ids:
        start(job_id)
    try:
        async for message in ws:
            if message.type is not WSMsgType.TEXT:
                continue
            try:
                command = json.loads(message.data)
            except (ValueError, RecursionError):  # not JSON, a 5000-digit number, nested too deeply
                command = None
            if not isinstance(command, dict):
                await ws.send_json({"type": "error", "error": "messages must be JSON objects"})
                continue
            follow_ids = command.get("follow", [])
            follow_ids = [follow_ids] if isinstance(follow_ids, str) else follow_ids
            new_ids = set(map(str, follow_ids)) - followers.keys() if isinstance(follow_ids, list) else set()
            if not isinstance(follow_ids, list) or len(followers) + len(new_ids) > MAX_FOLLOWED:
                error = f"follow: a job id or a list of job ids, at most {MAX_FOLLOWED} unfinished jobs per socket"
                await ws.send_json({"type": "error", "error": error})
                continue
            for job_id in dict.fromkeys(map(str, follow_ids)):
                start(job_id)
            if "cancel" in command:
                try:
                    await jobs.cancel(str(command["cancel"]), owner=owner)
                except (UnknownJob, NotReady):
                    await ws.send_json({"type": "error", "job_id": command["cancel"], "error": "unknown job"})
    finally:
        for task in list(followers.values()):
            task.cancel()
    return ws
