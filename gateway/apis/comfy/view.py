"""ComfyUI's `GET /view`: an image by the file name /history and `executed` give, or an upload by its name
and subfolder."""

from __future__ import annotations

from aiohttp import web

from gateway.apis.comfy.errors import failure, from_problem
from gateway.apis.comfy.routing import comfy_route
from gateway.apis.comfy.uploads import input_path, uploaded
from gateway.core.caller import SERVICE, owner_of
from gateway.core.problems import BROKER_DOWN, NotReady, UnknownJob, classify
from gateway.core.service import JobService
from schemas.request import RequestInvalid

routes = web.RouteTableDef()


@comfy_route(routes, "GET", "/view")
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
    except BROKER_DOWN as exc:
        return from_problem(classify(exc), "comfy view", exc)
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
    except BROKER_DOWN as exc:
        return from_problem(classify(exc), "comfy view of an upload", exc)
    kind = {b"\x89PNG": "image/png", b"\xff\xd8\xff": "image/jpeg", b"RIFF": "image/webp"}
    content_type = next((t for magic, t in kind.items() if data.startswith(magic)), "application/octet-stream")
    return web.Response(body=data, content_type=content_type)
