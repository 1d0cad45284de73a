"""ComfyUI's server API on the gateway, for the tools and scripts that queue ComfyUI prompts: `POST /prompt`
(a text-to-image or image-to-image graph, read by `gateway.apis.comfy.graph`), `POST /upload/image` (the
images LoadImage names), `GET /history`, `GET /view`, `GET /queue`,
`POST /queue` (delete, clear), `POST /interrupt`, the WebSocket `/ws?clientId=...` with ComfyUI's
messages (status, execution_start, executing, progress, binary previews when asked for, executed, execution_success,
execution_error, execution_interrupted), `GET /object_info` for the nodes it runs, `/system_stats`,
`/embeddings` and `/models`. Every route is served under `/api` too, as ComfyUI serves them.

A prompt becomes `batch_size` jobs in one group (seeds seed, seed+1, ...), queued like any other
request; its record (`gateway.apis.comfy.record`) goes to a KV bucket that every gateway watches, so a client may
queue through one gateway and follow on another's socket. An image is `<job id>.png` for `/view`.
A `SaveImageWebsocket` node (ComfyUI's own, from its custom_nodes) sends its images to the prompt's
`client_id` socket as binary PNG frames in ComfyUI's framing while it executes, and lists none in
/history. Live previews go out as binary JPEG frames only when the prompt's `extra_data.preview_method`
asks for them, or the gateway runs with `--comfy-previews` (ComfyUI's default preview method is none).
/history's messages carry the times the prompt's jobs started and ended.
With API keys on, a caller sees and stops only its key's prompts.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import platform
import re
import struct
import time
import uuid
from contextlib import aclosing
from typing import Any

from aiohttp import WSMsgType, web
from nats.js.errors import NotFoundError, ObjectNotFoundError
from PIL import ImageOps

from gateway.http.body import takes_images
from gateway.apis.comfy.prompts import ComfyPrompts
from gateway.apis.comfy.graph import (LATENT_METHODS, PIXEL_METHODS, SAMPLERS, SCHEDULERS, SOCKET_OUTPUT, GraphInvalid, ReadGraph,
                                      field_problem, read_graph)
from gateway.http.forms import read_form
from gateway.http.http_errors import read_json
from gateway.core.problems import BROKER_DOWN, Forbidden, IdempotencyKeyReused, NotReady, Problem, UnknownJob, classify
from gateway.core.records import UNFINISHED
from gateway.core.service import JobService
from gateway.core.caller import SERVICE, caller, owner_of
from gateway.core.caller import tier_for
from gateway.http import ratelimit
from gateway.state import upload_budget
from gateway.http.ratelimit import RateLimited
from gateway.core.submission import submit_request
from schemas.version import __version__
from gateway.apis.comfy.record import PROMPT_ID, ComfyPrompt
from schemas.events import JobEvent
from schemas.request import MAX_SEED, GenerateRequest, RequestInvalid, parse_request
from schemas.status import JobState, JobStatus
from schemas.storage import StoreFull
from schemas.uploads import read_image, transparency

log = logging.getLogger("imagegen.gateway.comfy")
routes = web.RouteTableDef()

PREVIEW_IMAGE, JPEG, PNG = 1, 1, 2  # ComfyUI's binary frame: event type, then image format, each a big-endian uint32
PREVIEW_METHODS_ON = ("auto", "latent2rgb", "taesd")  # extra_data.preview_method values that turn previews on
PREVIEW_METHODS_OFF = ("none",)  # ... and off; absent or "default": the server's setting (--comfy-previews)
MAX_QUEUE_LISTED = 1000
MAX_HISTORY = 10_000  # entries /history gives without max_items, as ComfyUI keeps at most
UPLOAD_PREFIX = "comfy-input"
UPLOAD_NAME = re.compile(r"^[A-Za-z0-9 ._()-]{1,128}$")
MAX_NAME_TRIES = 100  # "name (1).png", "name (2).png", ... for an upload whose name is kept already
MAX_SUBFOLDER_DEPTH = 8
INPUT_ANNOTATION = " [input]"  # LoadImage's "name [input]": the input folder, as ComfyUI reads it


def comfy_routes(path: str):
    """Registers a handler at `path` and at `/api` + `path`, as ComfyUI serves each route."""
    def register(method: str):
        def wrap(handler):
            routes.route(method, path)(handler)
            routes.route(method, "/api" + path)(handler)
            return handler
        return wrap
    return register


def failure(status: int, kind: str, message: str, details: str = "") -> web.Response:
    return web.json_response(
        {"error": {"type": kind, "message": message, "details": details, "extra_info": {}}, "node_errors": {}}, status=status
    )


def attach(jobs: JobService) -> None:
    """Keeps ComfyUI's prompt records beside `jobs`: `jobs.comfy`, watched from its KV bucket once the
    service starts."""
    jobs.comfy = ComfyPrompts(ttl_s=jobs.settings.topology.job_ttl_s)

    async def start(service: JobService) -> None:
        await service.comfy.start(service.js, service.view)

    jobs.start_hooks.append(start)


COMFY_KIND = {403: "forbidden", 429: "rate_limited", 503: "unavailable", 507: "storage_full"}


def from_problem(problem: Problem, what: str, exc: BaseException) -> web.Response:
    """A neutral Problem in ComfyUI's error shape, with Retry-After when it advises one."""
    if problem.status == 503:
        log.warning("%s: broker unavailable: %s", what, exc)
    response = failure(problem.status, COMFY_KIND.get(problem.status, problem.code), problem.message)
    if problem.retry_after_s is not None:
        response.headers["Retry-After"] = str(problem.retry_after_s)
    return response


def image_name(job_id: str) -> str:
    return f"{job_id}.png"


def visible(prompt: ComfyPrompt | None, owner: str | None) -> bool:
    return prompt is not None and (owner is None or prompt.owner == owner)


# -- queueing ---------------------------------------------------------------------------------


@comfy_routes("/prompt")("POST")
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
        log.warning("comfy prompt %s: its record not kept: %s", prompt_id, exc)
        return failure(503, "unavailable", "the job broker (NATS) is unavailable; retry shortly with the same prompt_id")
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


# -- input images -------------------------------------------------------------------------------


def upload_object(owner: str | None, name: str) -> str:
    """Where an uploaded image lies in `imagegen-uploads`: under the caller's key, so names never clash.
    `name` may begin with subfolders (`subfolder_problem` has checked them)."""
    return f"{UPLOAD_PREFIX}/{owner or '-'}/{name}"


def subfolder_problem(subfolder: str) -> str | None:
    """Why `subfolder` cannot hold uploads (None when it can): folder names as file names are, split by
    '/', with no '..' or '.', no absolute path, no backslash and no NUL, so that no name leaves the
    caller's own uploads."""
    if "\x00" in subfolder:
        return "must not contain NUL"
    if "\\" in subfolder:
        return "must use '/' between folders, not backslashes"
    if subfolder.startswith("/"):
        return "must be relative to the input folder, not an absolute path"
    parts = subfolder.split("/")
    if any(part in ("..", ".") for part in parts):
        return "must not contain '..' or '.'"
    if len(parts) > MAX_SUBFOLDER_DEPTH:
        return f"at most {MAX_SUBFOLDER_DEPTH} folders deep"
    if not all(UPLOAD_NAME.match(part) for part in parts):
        return "folder names are 1-128 letters, digits, spaces, '.', '-', '_', '(' or ')', split by '/'"
    return None


def input_path(value: str) -> str | None:
    """The upload a LoadImage `image` names, as ComfyUI resolves it ("name", "subfolder/name",
    "name [input]"); None when it names nothing uploads may hold."""
    path = value.removesuffix(INPUT_ANNOTATION)
    subfolder, _, name = path.rpartition("/")
    if not UPLOAD_NAME.match(name) or name in (".", "..") or (subfolder and subfolder_problem(subfolder) is not None) or path.startswith("/"):
        return None
    return path


async def uploaded(jobs: JobService, owner: str | None, value: str, *, field: str = "init_image") -> bytes:
    """The bytes of an image the caller uploaded; RequestInvalid on `field` when there is none."""
    name = input_path(value)
    if name is None:
        raise RequestInvalid([{"field": field, "message": f"{value!r} is not an uploaded image's name (POST /upload/image answers it)"}])
    try:
        reader = jobs.upload_reader
        return await reader.read(await reader.info(upload_object(owner, name)))
    except (ObjectNotFoundError, NotFoundError):
        raise RequestInvalid([{"field": field, "message": f"no image {value!r} was uploaded (POST /upload/image), or it has expired"}]) from None


def transparency_mask(data: bytes, limits) -> str:
    """ComfyUI's LoadImage mask as this service's mask_image: white where the picture is transparent
    (base64 PNG). In a thread: decoding and encoding take milliseconds to tens of them."""
    alpha = transparency(read_image("mask_image", data, limits))
    if alpha is None:
        raise RequestInvalid([{"field": "mask_image", "message": "the image has no transparency (it is opaque all over): "
                                                                 "LoadImage's mask is its transparent part, so there is nothing to inpaint"}])
    buffer = io.BytesIO()
    ImageOps.invert(alpha).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@comfy_routes("/upload/image")("POST")
@takes_images
async def upload_image(request: web.Request) -> web.Response:
    """ComfyUI's upload for LoadImage: a multipart form with `image` (the file), `subfolder` (kept, as
    ComfyUI keeps it), `type` (input) and `overwrite`; answers the name and subfolder to load it by.
    Kept as long as job records."""
    jobs: JobService = request.app[SERVICE]
    owner = owner_of(request)
    try:
        form = await read_form(request)
    except RequestInvalid as exc:
        return failure(400, "invalid_request", "send a multipart form with the file as `image`", str(exc))
    upload = form.get("image")
    if not isinstance(upload, web.FileField):
        return failure(400, "invalid_request", "send a multipart form with the file as `image`")
    if form.get("type", "input") != "input":
        return failure(400, "invalid_request", "only input images are kept here (type input)", str(form.get("type")))
    subfolder = str(form.get("subfolder") or "").rstrip("/")
    if subfolder and (why := subfolder_problem(subfolder)) is not None:
        return failure(400, "invalid_request", f"subfolder {why}", subfolder)
    name = upload.filename.replace("\\", "/").rsplit("/", 1)[-1]
    if not UPLOAD_NAME.match(name) or name in (".", ".."):
        return failure(400, "invalid_request", "the file name must be 1-128 letters, digits, spaces, '.', '-', '_', '(' or ')'", name)
    data = upload.file.read()
    try:
        await asyncio.to_thread(read_image, "image", data, jobs.settings.limits)  # a picture within the limits, or a refusal now
    except RequestInvalid as exc:
        return failure(400, "invalid_request", "not an image this server takes", str(exc))
    overwrite = str(form.get("overwrite", "false")).lower() in ("true", "1")
    key = caller(request)["key"]
    try:
        if key is not None:  # an upload counts against the key's rate, as a submit does
            await ratelimit.take(jobs.rate_kv, key.name, per_minute=key.rate_per_minute)
        stem, dot, suffix = name.rpartition(".")
        folder = f"{subfolder}/" if subfolder else ""
        for n in range(1, MAX_NAME_TRIES + 1):
            if overwrite or not await exists(jobs, upload_object(owner, folder + name)):
                break
            name = f"{stem} ({n}){dot}{suffix}" if dot else f"{suffix} ({n})"
        else:
            return failure(409, "conflict", f"{MAX_NAME_TRIES} images of that name are kept; send another name, or overwrite")
        if key is not None:
            await upload_budget.take(
                jobs.quota_kv, key.name, upload_object(owner, folder + name), len(data),
                limit_bytes=jobs.settings.upload_bytes_per_key, lifetime_s=jobs.settings.topology.job_ttl_s,
            )
        await jobs.store_upload(upload_object(owner, folder + name), data)
    except upload_budget.UploadBudgetSpent as exc:
        return failure(413, "upload_limit", str(exc))
    except (RateLimited, StoreFull, *BROKER_DOWN) as exc:
        return from_problem(classify(exc), "comfy upload", exc)
    return web.json_response({"name": name, "subfolder": subfolder, "type": "input"})


async def exists(jobs: JobService, name: str) -> bool:
    try:
        await jobs.upload_reader.info(name)
    except (ObjectNotFoundError, NotFoundError):
        return False
    return True


def queue_remaining(jobs: JobService) -> int:
    """ComfyUI's `queue_remaining`: the jobs queued or running on the pool, every caller's."""
    return sum(len(queue) for queue in jobs.view.queued.values()) + len(jobs.view.running)


@comfy_routes("/prompt")("GET")
async def queue_size(request: web.Request) -> web.Response:
    return web.json_response({"exec_info": {"queue_remaining": queue_remaining(request.app[SERVICE])}})


# -- what became of it --------------------------------------------------------------------------


async def job_records(jobs: JobService, prompt: ComfyPrompt, owner: str | None) -> list[JobStatus | None]:
    """The prompt's job records, in order (None for one gone: deleted, or past its TTL)."""
    records: list[JobStatus | None] = []
    for job_id in prompt.job_ids:
        try:
            records.append(await jobs.get(job_id, owner=owner))
        except UnknownJob:
            records.append(None)
    return records


def output_images(prompt: ComfyPrompt, records: list[JobStatus | None]) -> dict[str, dict]:
    """Each output node's images, as ComfyUI's `executed` and history give them. A SaveImageWebsocket
    node has none there: its images went to the socket, as in ComfyUI."""
    return {
        node: {"images": [{"filename": image_name(r.job_id), "subfolder": "", "type": "output" if kind == "SaveImage" else "temp"}
                          for r in shown_by(prompt, node, records) if r is not None and r.state is JobState.DONE]}
        for node, kind in sorted(prompt.outputs.items()) if kind != SOCKET_OUTPUT
    }


def shown_by(prompt: ComfyPrompt, node: str, records: list[JobStatus | None]) -> list[JobStatus | None]:
    """The records of the jobs whose images output `node` shows: all, unless outputs show different VAEDecodes."""
    if not prompt.output_jobs:
        return records
    wanted = set(prompt.output_jobs.get(node, ()))
    return [r for r in records if r is not None and r.job_id in wanted]


def ended_at(prompt: ComfyPrompt, records: list[JobStatus | None]) -> float:
    """When the prompt ended: its last job's end (the prompt's queueing when no record tells)."""
    ends = [r.finished_at for r in records if r is not None and r.finished_at is not None]
    return max(ends, default=prompt.submitted_at)


def ending(prompt: ComfyPrompt, records: list[JobStatus | None], stopped_by: JobEvent | None = None) -> tuple[str, dict]:
    """ComfyUI's last message for a prompt that has ended (when `stopped_by`, by that job's end):
    execution_success, execution_error or execution_interrupted."""
    stamp = {"prompt_id": prompt.prompt_id, "timestamp": int(ended_at(prompt, records) * 1000)}
    if stopped_by is None and all(r is not None and r.state is JobState.DONE for r in records):
        return "execution_success", stamp
    where = {"node_id": prompt.sampler_node, "node_type": "KSampler", "executed": []}
    if stopped_by is not None:
        state, reason = stopped_by.type, stopped_by.reason or stopped_by.type
    else:
        stopped = next((r for r in records if r is None or r.state.final and r.state is not JobState.DONE), None)
        state = stopped.state.value if stopped is not None else "gone"
        reason = (stopped.error or state) if stopped is not None else "a job's record is gone (deleted, or past its TTL)"
    if state == JobState.CANCELLED.value:
        return "execution_interrupted", {**stamp, **where}
    return "execution_error", {
        **stamp, **where, "exception_message": reason, "exception_type": f"imagegen.{state}",
        "traceback": [], "current_inputs": {}, "current_outputs": {},
    }


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


def finished(records: list[JobStatus | None]) -> bool:
    return all(r is None or r.state.final for r in records)


@comfy_routes("/history/{prompt_id}")("GET")
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


@comfy_routes("/history")("GET")
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


@comfy_routes("/view")("GET")
async def view(request: web.Request) -> web.Response:
    """An image by the file name /history and `executed` give (`<job id>.png`), or with `type=input`
    an upload by its name and subfolder, as ComfyUI's page shows a LoadImage's picture."""
    jobs: JobService = request.app[SERVICE]
    filename = request.query.get("filename", "")
    if request.query.get("type") == "input":
        return await view_upload(jobs, owner_of(request), request.query.get("subfolder", ""), filename)
    if request.query.get("subfolder") or not filename.endswith(".png"):
        return failure(404, "not_found", "no such image here: images are <job id>.png, with no subfolder", filename)
    try:
        status, data = await jobs.image(filename[: -len(".png")], owner=owner_of(request))
    except (UnknownJob, NotReady) as exc:
        return failure(404, "not_found", f"no such image here: {exc}", filename)
    except BROKER_DOWN:
        return failure(503, "unavailable", "the job broker (NATS) is unavailable; retry shortly")
    return web.Response(body=data, content_type=status.image.content_type)


async def view_upload(jobs: JobService, owner: str | None, subfolder: str, filename: str) -> web.Response:
    """An upload of the caller's, by subfolder and name, with the content type its bytes say."""
    path = input_path(f"{subfolder.rstrip('/')}/{filename}" if subfolder else filename)
    if path is None:
        return failure(404, "not_found", "no such upload here: not an uploaded image's name", f"{subfolder}/{filename}")
    try:
        data = await uploaded(jobs, owner, path)
    except RequestInvalid as exc:
        return failure(404, "not_found", str(exc), path)
    except BROKER_DOWN:
        return failure(503, "unavailable", "the job broker (NATS) is unavailable; retry shortly")
    kind = {b"\x89PNG": "image/png", b"\xff\xd8\xff": "image/jpeg", b"RIFF": "image/webp"}
    content_type = next((t for magic, t in kind.items() if data.startswith(magic)), "application/octet-stream")
    return web.Response(body=data, content_type=content_type)


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


@comfy_routes("/queue")("GET")
async def queue(request: web.Request) -> web.Response:
    running, pending = unfinished_prompts(request.app[SERVICE], owner_of(request))
    return web.json_response({"queue_running": [p.queue_entry() for p in running], "queue_pending": [p.queue_entry() for p in pending]})


async def cancelled(jobs: JobService, prompts: list[ComfyPrompt], owner: str | None) -> web.Response:
    """Cancels the prompts' jobs (a running one stops at its next step) and answers for it."""
    try:
        await jobs.cancel_each([job_id for prompt in prompts for job_id in prompt.job_ids], owner=owner)
    except BROKER_DOWN:
        return failure(503, "unavailable", "the job broker (NATS) is unavailable; retry shortly")
    return web.json_response({})


@comfy_routes("/queue")("POST")
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


@comfy_routes("/interrupt")("POST")
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


# -- the socket -------------------------------------------------------------------------------


class Socket:
    """One `/ws` client: its messages go out one at a time."""

    def __init__(self, ws: web.WebSocketResponse, jobs: JobService, owner: str | None):
        self.ws, self.jobs, self.owner = ws, jobs, owner
        self.lock = asyncio.Lock()
        self.previews = jobs.settings.comfy_previews

    async def send(self, kind: str, data: dict) -> None:
        async with self.lock:
            await self.ws.send_json({"type": kind, "data": data})

    async def send_image(self, data: bytes, image_format: int) -> None:
        """A binary frame in ComfyUI's framing: PREVIEW_IMAGE, the format (JPEG 1, PNG 2), the image."""
        async with self.lock:
            await self.ws.send_bytes(struct.pack(">II", PREVIEW_IMAGE, image_format) + data)

    def previews_for(self, prompt: ComfyPrompt) -> bool:
        """Whether the prompt's previews are sent: as its extra_data's preview_method says (ComfyUI's
        web page sends it), else as the server is set (--comfy-previews; ComfyUI's default is none)."""
        method = prompt.extra_data.get("preview_method")
        if method in PREVIEW_METHODS_ON:
            return True
        if method in PREVIEW_METHODS_OFF:
            return False
        return self.previews

    async def send_socket_images(self, prompt: ComfyPrompt, node: str, records: list[JobStatus | None]) -> None:
        """A SaveImageWebsocket node run: each image as a binary PNG frame, after ComfyUI's progress for it."""
        made = [r for r in records if r is not None and r.state is JobState.DONE]
        for i, record in enumerate(made):
            try:
                _, data = await self.jobs.image(record.job_id, owner=self.owner)
            except (UnknownJob, NotReady) as exc:
                log.warning("comfy prompt %s: image of job %s not sent: %s", prompt.prompt_id, record.job_id, exc)
                continue
            await self.send("progress", {"value": i, "max": len(made), "prompt_id": prompt.prompt_id, "node": node})
            await self.send_image(data, PNG)

    async def status(self, sid: str | None = None) -> None:
        data: dict[str, Any] = {"status": {"exec_info": {"queue_remaining": queue_remaining(self.jobs)}}}
        if sid is not None:
            data["sid"] = sid
        await self.send("status", data)

    async def follow(self, prompt: ComfyPrompt) -> None:
        """The prompt's run in ComfyUI's messages, from its jobs' events, to its end."""
        pid, sampler = prompt.prompt_id, prompt.sampler_node
        stamp = lambda: {"prompt_id": pid, "timestamp": int(time.time() * 1000)}  # noqa: E731
        await self.send("execution_start", stamp())
        await self.send("execution_cached", {**stamp(), "nodes": []})
        await self.send("executing", {"node": sampler, "display_node": sampler, "prompt_id": pid})
        events: asyncio.Queue[JobEvent | None] = asyncio.Queue()

        async def read(job_id: str) -> None:
            async with aclosing(self.jobs.events.follow(job_id, read_status=lambda: self.jobs.get(job_id))) as stream:
                async for event in stream:
                    events.put_nowait(event)
            events.put_nowait(None)

        readers = [asyncio.ensure_future(read(job_id)) for job_id in prompt.job_ids]
        steps: dict[str, int] = {}
        totals: dict[str, int] = {}
        stopped_by: JobEvent | None = None
        previews = self.previews_for(prompt)
        try:
            ended = 0
            while ended < len(readers):
                event = await events.get()
                if event is None:
                    ended += 1
                    continue
                if event.type == "progress" and event.step is not None and event.total:
                    steps[event.job_id], totals[event.job_id] = event.step, event.total
                    total = max(totals.values()) * len(prompt.job_ids)
                    await self.send("progress", {"value": sum(steps.values()), "max": total, "prompt_id": pid, "node": sampler})
                elif event.type == "preview" and event.preview and previews:
                    await self.send_image(event.preview, JPEG)
                elif event.type in ("failed", "expired", "cancelled"):
                    stopped_by = event  # the prompt has failed or was stopped: its end is told below
                    break
        finally:
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
        records = await job_records(self.jobs, prompt, self.owner)
        kind, data = ending(prompt, records, stopped_by)
        if kind == "execution_success":
            await self.send("executing", {"node": prompt.decode_node, "display_node": prompt.decode_node, "prompt_id": pid})
            shown = output_images(prompt, records)
            for node, node_class in sorted(prompt.outputs.items()):
                await self.send("executing", {"node": node, "display_node": node, "prompt_id": pid})
                if node_class == SOCKET_OUTPUT:
                    await self.send_socket_images(prompt, node, shown_by(prompt, node, records))
                else:
                    await self.send("executed", {"node": node, "display_node": node, "output": shown[node], "prompt_id": pid})
        await self.send(kind, data)
        await self.send("executing", {"node": None, "prompt_id": pid})
        await self.status()


@comfy_routes("/ws")("GET")
async def socket(request: web.Request) -> web.WebSocketResponse:
    """ComfyUI's socket: a `status` with the client's `sid` at once, then the run of each prompt the
    client queues with this `client_id` (and of those it had queued and not finished before it connected)."""
    jobs: JobService = request.app[SERVICE]
    owner = owner_of(request)
    client_id = request.query.get("clientId") or uuid.uuid4().hex
    ws = web.WebSocketResponse(heartbeat=20)
    await ws.prepare(request)
    sock = Socket(ws, jobs, owner)
    arrivals = jobs.comfy.follow(client_id)
    following: set[asyncio.Task] = set()
    started: set[str] = set()  # a prompt queued as the socket opened comes both ways

    async def follow(prompt: ComfyPrompt) -> None:
        try:
            await sock.follow(prompt)
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as exc:  # the broker away, say: the socket stays, and /history tells the end later
            log.warning("comfy socket %s: prompt %s no longer followed: %s", client_id, prompt.prompt_id, exc)

    def start(prompt: ComfyPrompt) -> None:
        if visible(prompt, owner) and prompt.prompt_id not in started:
            started.add(prompt.prompt_id)
            task = asyncio.ensure_future(follow(prompt))
            following.add(task)
            task.add_done_callback(following.discard)

    try:
        await sock.status(sid=client_id)
        running, pending = unfinished_prompts(jobs, owner)
        for prompt in running + pending:
            if prompt.client_id == client_id:
                start(prompt)
        closing = asyncio.ensure_future(drain(ws))
        while not closing.done():
            arrival = asyncio.ensure_future(arrivals.get())
            await asyncio.wait({arrival, closing}, return_when=asyncio.FIRST_COMPLETED)
            if arrival.done():
                start(arrival.result())
            else:
                arrival.cancel()
    except (ConnectionResetError, BROKER_DOWN) as exc:
        log.info("comfy socket %s closed: %s", client_id, exc)
    finally:
        jobs.comfy.unfollow(client_id, arrivals)
        for task in list(following):
            task.cancel()
        await asyncio.gather(*following, return_exceptions=True)
        await ws.close()
    return ws


async def drain(ws: web.WebSocketResponse) -> None:
    """Reads what the client sends (ComfyUI's clients send nothing the server acts on) until it closes."""
    async for message in ws:
        if message.type in (WSMsgType.ERROR, WSMsgType.CLOSE):
            return


# -- what it runs -------------------------------------------------------------------------------


def node_info(jobs: JobService, models: list[str], loras: list[str], controlnets: list[str] | None = None) -> dict[str, dict]:
    """ComfyUI's /object_info for the nodes /prompt takes, with this gateway's models, adapters and limits."""
    limits = jobs.settings.limits
    side = {"default": 1024, "min": limits.min_side, "max": limits.max_side, "step": 8}

    def node(name: str, display: str, category: str, required: dict, outputs: list[str], *, output_node: bool = False) -> dict:
        return {
            "input": {"required": required}, "input_order": {"required": list(required)}, "output": outputs,
            "output_is_list": [False] * len(outputs), "output_name": outputs, "name": name, "display_name": display,
            "description": "", "python_module": "nodes", "category": category, "output_node": output_node,
        }

    return {
        "CheckpointLoaderSimple": node("CheckpointLoaderSimple", "Load Checkpoint", "loaders", {"ckpt_name": [models]}, ["MODEL", "CLIP", "VAE"]),
        "LoraLoader": node("LoraLoader", "Load LoRA", "loaders", {
            "model": ["MODEL"], "clip": ["CLIP"], "lora_name": [loras],
            "strength_model": ["FLOAT", {"default": 1.0, "min": -4.0, "max": 4.0, "step": 0.01}],
            "strength_clip": ["FLOAT", {"default": 1.0, "min": -4.0, "max": 4.0, "step": 0.01}],
        }, ["MODEL", "CLIP"]),
        "CLIPTextEncode": node("CLIPTextEncode", "CLIP Text Encode (Prompt)", "conditioning",
                               {"text": ["STRING", {"multiline": True}], "clip": ["CLIP"]}, ["CONDITIONING"]),
        "EmptyLatentImage": node("EmptyLatentImage", "Empty Latent Image", "latent", {
            "width": ["INT", side], "height": ["INT", side],
            "batch_size": ["INT", {"default": 1, "min": 1, "max": limits.max_images}],
        }, ["LATENT"]),
        "KSampler": node("KSampler", "KSampler", "sampling", {
            "model": ["MODEL"], "seed": ["INT", {"default": 0, "min": 0, "max": MAX_SEED}],
            "steps": ["INT", {"default": 20, "min": 1, "max": limits.max_steps}],
            "cfg": ["FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}],
            "sampler_name": [SAMPLERS], "scheduler": [SCHEDULERS], "positive": ["CONDITIONING"], "negative": ["CONDITIONING"],
            "latent_image": ["LATENT"], "denoise": ["FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01}],
        }, ["LATENT"]),
        "LoadImage": node("LoadImage", "Load Image", "image", {"image": [[], {"image_upload": True}]}, ["IMAGE", "MASK"]),
        "VAEEncode": node("VAEEncode", "VAE Encode", "latent", {"pixels": ["IMAGE"], "vae": ["VAE"]}, ["LATENT"]),
        "SetLatentNoiseMask": node("SetLatentNoiseMask", "Set Latent Noise Mask", "latent/inpaint",
                                   {"samples": ["LATENT"], "mask": ["MASK"]}, ["LATENT"]),
        "VAEDecode": node("VAEDecode", "VAE Decode", "latent", {"samples": ["LATENT"], "vae": ["VAE"]}, ["IMAGE"]),
        "SaveImage": node("SaveImage", "Save Image", "image", {"images": ["IMAGE"], "filename_prefix": ["STRING", {"default": "ComfyUI"}]},
                          [], output_node=True),
        "PreviewImage": node("PreviewImage", "Preview Image", "image", {"images": ["IMAGE"]}, [], output_node=True),
        "SaveImageWebsocket": node("SaveImageWebsocket", "SaveImageWebsocket", "image", {"images": ["IMAGE"]}, [], output_node=True),
        **workflow_nodes(node, limits, side, controlnets or []),
    }


def workflow_nodes(node, limits, side: dict, controlnets: list[str]) -> dict[str, dict]:
    """The nodes of the graphs that run as plans: SDXL's base + refiner, hires fix, ControlNet, batches."""
    steps = ["INT", {"default": 20, "min": 1, "max": limits.max_steps}]
    at_step = ["INT", {"default": 0, "min": 0, "max": 10000}]
    sampling = {
        "sampler_name": [SAMPLERS], "scheduler": [SCHEDULERS], "positive": ["CONDITIONING"], "negative": ["CONDITIONING"],
        "cfg": ["FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}],
    }
    crop = [["disabled"]]
    fraction = ["FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}]
    size = {"width": ["INT", side], "height": ["INT", side]}
    return {
        "KSamplerAdvanced": node("KSamplerAdvanced", "KSampler (Advanced)", "sampling", {
            "model": ["MODEL"], "add_noise": [["enable", "disable"]], "noise_seed": ["INT", {"default": 0, "min": 0, "max": MAX_SEED}],
            "steps": steps, **sampling, "latent_image": ["LATENT"], "start_at_step": at_step,
            "end_at_step": ["INT", {"default": 10000, "min": 0, "max": 10000}], "return_with_leftover_noise": [["disable", "enable"]],
        }, ["LATENT"]),
        "CLIPTextEncodeSDXL": node("CLIPTextEncodeSDXL", "CLIPTextEncodeSDXL", "advanced/conditioning", {
            **size, "crop_w": ["INT", {"default": 0, "min": 0}], "crop_h": ["INT", {"default": 0, "min": 0}],
            "target_width": ["INT", side], "target_height": ["INT", side], "text_g": ["STRING", {"multiline": True}],
            "clip": ["CLIP"], "text_l": ["STRING", {"multiline": True}],
        }, ["CONDITIONING"]),
        "CLIPTextEncodeSDXLRefiner": node("CLIPTextEncodeSDXLRefiner", "CLIPTextEncodeSDXLRefiner", "advanced/conditioning", {
            "ascore": ["FLOAT", {"default": 6.0, "min": 0.0, "max": 1000.0, "step": 0.01}], **size,
            "text": ["STRING", {"multiline": True}], "clip": ["CLIP"],
        }, ["CONDITIONING"]),
        "LatentUpscale": node("LatentUpscale", "Upscale Latent", "latent", {
            "samples": ["LATENT"], "upscale_method": [list(LATENT_METHODS)], **size, "crop": crop}, ["LATENT"]),
        "LatentUpscaleBy": node("LatentUpscaleBy", "Upscale Latent By", "latent", {
            "samples": ["LATENT"], "upscale_method": [list(LATENT_METHODS)],
            "scale_by": ["FLOAT", {"default": 1.5, "min": 0.01, "max": 4.0, "step": 0.01}]}, ["LATENT"]),
        "ImageScale": node("ImageScale", "Upscale Image", "image/upscaling", {
            "image": ["IMAGE"], "upscale_method": [list(PIXEL_METHODS)], **size, "crop": crop}, ["IMAGE"]),
        "ImageScaleBy": node("ImageScaleBy", "Upscale Image By", "image/upscaling", {
            "image": ["IMAGE"], "upscale_method": [list(PIXEL_METHODS)],
            "scale_by": ["FLOAT", {"default": 1.0, "min": 0.01, "max": 4.0, "step": 0.01}]}, ["IMAGE"]),
        "ControlNetLoader": node("ControlNetLoader", "Load ControlNet Model", "loaders", {"control_net_name": [controlnets]}, ["CONTROL_NET"]),
        "ControlNetApplyAdvanced": node("ControlNetApplyAdvanced", "Apply ControlNet", "conditioning/controlnet", {
            "positive": ["CONDITIONING"], "negative": ["CONDITIONING"], "control_net": ["CONTROL_NET"], "image": ["IMAGE"],
            "strength": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 2.0, "step": 0.01}],
            "start_percent": fraction, "end_percent": [fraction[0], {**fraction[1], "default": 1.0}],
        }, ["CONDITIONING", "CONDITIONING"]),
        "Canny": node("Canny", "Canny", "image/preprocessors", {
            "image": ["IMAGE"], "low_threshold": ["FLOAT", {"default": 0.4, "min": 0.01, "max": 0.99, "step": 0.01}],
            "high_threshold": ["FLOAT", {"default": 0.8, "min": 0.01, "max": 0.99, "step": 0.01}]}, ["IMAGE"]),
        "RepeatLatentBatch": node("RepeatLatentBatch", "Repeat Latent Batch", "latent/batch", {
            "samples": ["LATENT"], "amount": ["INT", {"default": 1, "min": 1, "max": limits.max_images}]}, ["LATENT"]),
    }


def controlnets_served(jobs: JobService) -> list[str]:
    """The ControlNets the live workers loaded, by name."""
    return sorted({name for workers in jobs.served_models().values() for w in workers for name in (w.controlnets or ())})


async def served(jobs: JobService) -> tuple[list[str], list[str]]:
    models = sorted(jobs.served_models())
    loras = sorted(jobs.loaded_loras(await jobs.current_model()) or ())
    return models, loras


@comfy_routes("/object_info")("GET")
async def object_info(request: web.Request) -> web.Response:
    jobs: JobService = request.app[SERVICE]
    return web.json_response(node_info(jobs, *await served(jobs), controlnets_served(jobs)))


@comfy_routes("/object_info/{node_class}")("GET")
async def object_info_of(request: web.Request) -> web.Response:
    jobs: JobService = request.app[SERVICE]
    info = node_info(jobs, *await served(jobs), controlnets_served(jobs))
    name = request.match_info["node_class"]
    return web.json_response({name: info[name]} if name in info else {})


@comfy_routes("/models")("GET")
async def model_folders(request: web.Request) -> web.Response:
    return web.json_response(["checkpoints", "loras", "controlnet"])


@comfy_routes("/models/{folder}")("GET")
async def models_in(request: web.Request) -> web.Response:
    models, loras = await served(request.app[SERVICE])
    folder = request.match_info["folder"]
    if folder not in ("checkpoints", "loras", "controlnet"):
        return failure(404, "not_found", f"no model folder {folder!r} here: checkpoints, loras or controlnet")
    if folder == "controlnet":
        return web.json_response(controlnets_served(request.app[SERVICE]))
    return web.json_response(models if folder == "checkpoints" else loras)


@comfy_routes("/embeddings")("GET")
async def embeddings(request: web.Request) -> web.Response:
    return web.json_response([])


@comfy_routes("/system_stats")("GET")
async def system_stats(request: web.Request) -> web.Response:
    """This gateway, and the live workers as ComfyUI's devices (no memory figures: the workers do not publish them)."""
    workers = [w for ws in request.app[SERVICE].served_models().values() for w in ws]
    return web.json_response({
        "system": {"os": platform.system().lower(), "python_version": platform.python_version(), "embedded_python": False,
                   "comfyui_version": f"imagegen {__version__}", "argv": []},
        "devices": [{"name": f"{w.worker_id} ({w.model})", "type": w.device.split(":")[0], "index": i, "vram_total": 0, "vram_free": 0,
                     "torch_vram_total": 0, "torch_vram_free": 0} for i, w in enumerate(workers)],
    })
