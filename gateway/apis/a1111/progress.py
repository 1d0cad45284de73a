"""AUTOMATIC1111's `GET /sdapi/v1/progress` (with a live preview), `POST /sdapi/v1/interrupt` and
`POST /sdapi/v1/skip`, for the caller's newest unfinished request.

interrupt cancels that request (the job in hand stops at its next step, the queued ones are dropped) and
skip only its job in hand; the waiting txt2img or img2img call then answers with the images made, as
A1111 does."""

from __future__ import annotations

import base64
import time

from aiohttp import web

from gateway.apis.a1111.failures import answered
from gateway.core.caller import SERVICE, owner_of
from gateway.core.problems import UnknownJob
from gateway.core.records import UNFINISHED
from gateway.core.service import JobService
from gateway.core.submission import group_jobs
from gateway.state.event_hub import decoded_event
from schemas.status import JobState, JobStatus

routes = web.RouteTableDef()


async def newest_request(jobs: JobService, owner: str | None) -> list[JobStatus]:
    """The jobs of the caller's newest request with a job still unfinished (with API keys, the key's own;
    without, anyone's, as A1111 serves one user), in their order; empty when there is none."""
    newest = jobs.page(owner=owner, states=UNFINISHED, limit=1)
    if not newest:
        return []
    if not newest[0].group_id:
        return newest
    try:
        return await group_jobs(jobs, newest[0].group_id, owner=owner)
    except UnknownJob:  # deleted meanwhile
        return newest


def in_hand(members: list[JobStatus]) -> JobStatus:
    """The request's job being made, or next to be: its first unfinished one."""
    return next((m for m in members if not m.state.final), members[-1])


async def latest_preview(jobs: JobService, job_id: str) -> str | None:
    """The newest preview its worker sent for the job, as base64 JPEG; None before the first."""
    stored = await jobs.events.stored(job_id) or []
    for _, data in reversed(stored):
        event = decoded_event(data)
        if event is not None and event.type == "preview" and event.preview:
            return base64.b64encode(event.preview).decode("ascii")
    return None


@routes.get("/sdapi/v1/progress")
async def progress(request: web.Request) -> web.Response:
    """The progress of the caller's newest unfinished request: its jobs' steps done over their steps, the
    seconds still expected, the job in hand, and that job's newest preview as `current_image` (unless
    `skip_current_image=true`)."""
    jobs = request.app[SERVICE]
    members = await newest_request(jobs, owner_of(request))
    state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
             "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
    if not members:
        return web.json_response({"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None})
    done = sum(1.0 if m.state.final else (m.step / m.total_steps if m.total_steps else 0.0) for m in members)
    current = in_hand(members)
    etas = [eta for m in members if (eta := jobs.eta(m)) is not None]
    state |= {
        "interrupted": current.cancel_requested,
        "job": current.job_id,
        "job_count": len(members),
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(members[0].submitted_at)),
        "job_no": members.index(current),
        "sampling_step": current.step,
        "sampling_steps": current.total_steps or 0,
    }
    if current.state is JobState.QUEUED:
        textinfo = f"queued, {jobs.position(current)} ahead"
    else:
        textinfo = f"step {current.step} of {current.total_steps or '?'}"
    skip_image = request.query.get("skip_current_image", "false").lower() in ("true", "1")
    image = None if skip_image or current.state is not JobState.RUNNING else await latest_preview(jobs, current.job_id)
    return web.json_response({
        "progress": round(done / len(members), 4),
        "eta_relative": round(max(etas, default=0.0), 3),
        "state": state,
        "current_image": image,
        "textinfo": textinfo,
    })


async def run_interrupt(request: web.Request) -> web.Response:
    jobs = request.app[SERVICE]
    owner = owner_of(request)
    members = await newest_request(jobs, owner)
    await jobs.cancel_each([m.job_id for m in members if not m.state.final], owner=owner)
    return web.json_response({})


async def run_skip(request: web.Request) -> web.Response:
    jobs = request.app[SERVICE]
    owner = owner_of(request)
    members = await newest_request(jobs, owner)
    if members:
        await jobs.cancel_each([in_hand(members).job_id], owner=owner)
    return web.json_response(None)


@routes.post("/sdapi/v1/interrupt")
async def interrupt(request: web.Request) -> web.Response:
    """Stops the caller's newest unfinished request: its job in hand stops at its next step and its queued
    jobs are dropped; its txt2img or img2img call answers with the images made before."""
    return await answered(run_interrupt, request)


@routes.post("/sdapi/v1/skip")
async def skip(request: web.Request) -> web.Response:
    """Drops the job in hand of the caller's newest unfinished request; the request goes on with the next."""
    return await answered(run_skip, request)
