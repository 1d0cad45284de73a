"""ComfyUI's input images: `POST /upload/image` keeps the pictures a LoadImage names (in `imagegen-uploads`,
under the caller's key, in the subfolder sent), and a prompt's LoadImage reads them back by name, its
mask as this service's mask_image."""

from __future__ import annotations

import asyncio
import base64
import io
import re

from aiohttp import web
from nats.js.errors import NotFoundError, ObjectNotFoundError
from PIL import ImageOps

from gateway.apis.comfy.errors import failure, from_problem
from gateway.apis.comfy.routing import comfy_route
from gateway.core.caller import SERVICE, caller, owner_of
from gateway.core.problems import BROKER_DOWN, classify
from gateway.core.service import JobService
from gateway.http import ratelimit
from gateway.http.body import takes_images
from gateway.http.forms import read_form
from gateway.http.ratelimit import RateLimited
from gateway.state import upload_budget
from schemas.request import RequestInvalid
from schemas.storage import StoreFull
from schemas.uploads import read_image, transparency

routes = web.RouteTableDef()

UPLOAD_PREFIX = "comfy-input"
UPLOAD_NAME = re.compile(r"^[A-Za-z0-9 ._()-]{1,128}$")
MAX_NAME_TRIES = 100  # "name (1).png", "name (2).png", ... for an upload whose name is kept already
MAX_SUBFOLDER_DEPTH = 8
INPUT_ANNOTATION = " [input]"  # LoadImage's "name [input]": the input folder, as ComfyUI reads it


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


@comfy_route(routes, "POST", "/upload/image")
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
