"""ComfyUI's `POST /prompt`: a graph read (`gateway.apis.comfy.graph_reader`) into requests, their uploaded
images read in, queued as `batch_size` jobs in one group (seeds seed, seed+1, ...) like any other request,
and the prompt's record kept where every gateway sees it."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid
from dataclasses import replace

from aiohttp import web

from gateway.apis.comfy.errors import failure, from_problem
from gateway.apis.comfy.graph import ReadGraph, field_problem
from gateway.apis.comfy.graph_errors import GraphInvalid
from gateway.apis.comfy.graph_reader import read_graph
from gateway.apis.comfy.record import PROMPT_ID, ComfyPrompt
from gateway.apis.comfy.routing import comfy_route
from gateway.apis.comfy.uploads import transparency_mask, uploaded
from gateway.core.caller import SERVICE, caller, owner_of, tier_for
from gateway.core.problems import BROKER_DOWN, Forbidden, IdempotencyKeyReused, classify
from gateway.core.service import JobService
from gateway.core.submission import submit_request
from gateway.http.http_errors import read_json
from gateway.http.ratelimit import RateLimited
from schemas.request import GenerateRequest, RequestInvalid, parse_request
from schemas.storage import StoreFull

log = logging.getLogger("imagegen.gateway.comfy")
routes = web.RouteTableDef()


@comfy_route(routes, "POST", "/prompt")
async def queue_prompt(request: web.Request) -> web.Response:
    jobs: JobService = request.app[SERVICE]
    try:
        body = await read_json(request)
    except RequestInvalid as exc:
        return failure(400, "invalid_prompt", "Cannot read the request", str(exc))
    if not isinstance(body, dict) or "prompt" not in body:
        return failure(400, "no_prompt", "No prompt provided", 'send {"prompt": {node_id: {"class_type": ..., "inputs": {...}}}}')
    unknown = sorted(set(body) - {"prompt", "client_id", "prompt_id", "extra_data", "front"})
    if unknown:
        return failure(400, "invalid_prompt", f"{unknown[0]!r} is not taken here", "the fields are prompt, client_id, prompt_id, extra_data")
    if body.get("front") not in (None, False):
        return failure(400, "invalid_prompt", "front: only false here", "the queue's order is its tiers': queue with an API key of the high tier")
    prompt_id = body.get("prompt_id") or str(uuid.uuid4())
    client_id = body.get("client_id")
    extra = body.get("extra_data") or {}
    if not isinstance(prompt_id, str) or not PROMPT_ID.match(prompt_id):
        return failure(400, "invalid_prompt", "prompt_id must be 1-64 letters, digits, '-' or '_'", repr(prompt_id))
    if (client_id is not None and not isinstance(client_id, str)) or not isinstance(extra, dict):
        return failure(400, "invalid_prompt", "client_id must be a string and extra_data an object")
    owner = owner_of(request)
    try:
        read = read_graph(body["prompt"], served_models=sorted(jobs.served_models()))
        who = {"owner": owner, "key": caller(request)["key"]}
        bases = [await request_of(jobs, part, owner, who["key"]) for part in (read, *read.others)]  # all checked first
        queued, output_jobs = [], {}
        for i, (part, base) in enumerate(zip((read, *read.others), bases)):
            try:
                made = await submit_request(jobs, base, idempotency_key=f"comfy:{prompt_id}" + (f":{i}" if i else ""), **who)
            except RequestInvalid as exc:
                problem = (exc.errors or [{"field": "body", "message": str(exc)}])[0]
                raise field_problem(part, problem["field"], problem["message"]) from None
            queued += made
            if read.others:
                output_jobs.update({node: [status.job_id for status in made] for node in part.outputs})
    except GraphInvalid as exc:
        return web.json_response(exc.body(), status=400)
    except IdempotencyKeyReused:
        return failure(400, "invalid_prompt", "prompt_id was sent before with another prompt: send another, or none", prompt_id)
    except (Forbidden, RateLimited, StoreFull, *BROKER_DOWN) as exc:
        return from_problem(classify(exc), f"comfy prompt {prompt_id}", exc)
    record = ComfyPrompt(
        prompt_id=prompt_id, number=int(time.time() * 1000), client_id=client_id, owner=owner,
        job_ids=[status.job_id for status in queued], sampler_node=read.sampler, decode_node=read.decode,
        outputs=read.all_outputs, output_jobs=output_jobs, graph=body["prompt"], extra_data=extra,
    )
    try:
        kept = await jobs.comfy.add(record)
    except BROKER_DOWN as exc:
        problem = classify(exc)
        if problem.status == 503:  # its jobs are queued: the same prompt_id finds them and keeps the record
            problem = replace(problem, message=f"{problem.message} with the same prompt_id")
        return from_problem(problem, f"comfy prompt {prompt_id}: its record not kept", exc)
    log.info("comfy prompt %s: jobs %s", prompt_id, ",".join(kept.job_ids))
    return web.json_response({"prompt_id": prompt_id, "number": kept.number, "node_errors": {}})


async def request_of(jobs: JobService, read: ReadGraph, owner: str | None, key) -> GenerateRequest:
    """The checked request a read graph (one VAEDecode's image) asks for, its uploaded images read in."""
    try:
        fields = dict(read.fields)
        if read.image_name is not None:
            fields["init_image"] = base64.b64encode(await uploaded(jobs, owner, read.image_name)).decode("ascii")
        if read.mask_name is not None:
            picture = await uploaded(jobs, owner, read.mask_name, field="mask_image")
            fields["mask_image"] = await asyncio.to_thread(transparency_mask, picture, jobs.settings.limits)
        if read.control_name is not None:
            control = base64.b64encode(await uploaded(jobs, owner, read.control_name, field="controlnet")).decode("ascii")
            fields["stages"] = [{**st, "controlnet": {**st["controlnet"], "image": control}} if "controlnet" in st else st
                                for st in fields["stages"]]
        base = parse_request(fields, limits=jobs.settings.limits)
    except RequestInvalid as exc:
        problem = (exc.errors or [{"field": "body", "message": str(exc)}])[0]
        raise field_problem(read, problem["field"], problem["message"]) from None
    if (tier := tier_for(key)) is not None:
        base = base.model_copy(update={"tier": tier})
    return base
