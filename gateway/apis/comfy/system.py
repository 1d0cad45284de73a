"""What this gateway runs, in ComfyUI's routes: `/object_info` (the node catalogue of
`gateway.apis.comfy.object_info`), `/models`, `/embeddings` and `/system_stats`."""

from __future__ import annotations

import platform

from aiohttp import web

from gateway.apis.comfy.errors import failure
from gateway.apis.comfy.object_info import node_info
from gateway.apis.comfy.routing import comfy_route
from gateway.core.caller import SERVICE
from gateway.core.service import JobService
from schemas.version import __version__

routes = web.RouteTableDef()


def controlnets_served(jobs: JobService) -> list[str]:
    """The ControlNets the live workers loaded, by name."""
    return sorted({name for workers in jobs.served_models().values() for w in workers for name in (w.controlnets or ())})


async def served(jobs: JobService) -> tuple[list[str], list[str]]:
    models = sorted(jobs.served_models())
    loras = sorted(jobs.loaded_loras(await jobs.current_model()) or ())
    return models, loras


@comfy_route(routes, "GET", "/object_info")
async def object_info(request: web.Request) -> web.Response:
    jobs: JobService = request.app[SERVICE]
    return web.json_response(node_info(jobs, *await served(jobs), controlnets_served(jobs)))


@comfy_route(routes, "GET", "/object_info/{node_class}")
async def object_info_of(request: web.Request) -> web.Response:
    jobs: JobService = request.app[SERVICE]
    info = node_info(jobs, *await served(jobs), controlnets_served(jobs))
    name = request.match_info["node_class"]
    return web.json_response({name: info[name]} if name in info else {})


@comfy_route(routes, "GET", "/models")
async def model_folders(request: web.Request) -> web.Response:
    return web.json_response(["checkpoints", "loras", "controlnet"])


@comfy_route(routes, "GET", "/models/{folder}")
async def models_in(request: web.Request) -> web.Response:
    models, loras = await served(request.app[SERVICE])
    folder = request.match_info["folder"]
    if folder not in ("checkpoints", "loras", "controlnet"):
        return failure(404, "not_found", f"no model folder {folder!r} here: checkpoints, loras or controlnet")
    if folder == "controlnet":
        return web.json_response(controlnets_served(request.app[SERVICE]))
    return web.json_response(models if folder == "checkpoints" else loras)


@comfy_route(routes, "GET", "/embeddings")
async def embeddings(request: web.Request) -> web.Response:
    return web.json_response([])


@comfy_route(routes, "GET", "/system_stats")
async def system_stats(request: web.Request) -> web.Response:
    """This gateway, and the live workers as ComfyUI's devices (no memory figures: the workers do not publish them)."""
    workers = [w for ws in request.app[SERVICE].served_models().values() for w in ws]
    return web.json_response({
        "system": {"os": platform.system().lower(), "python_version": platform.python_version(), "embedded_python": False,
                   "comfyui_version": f"imagegen {__version__}", "argv": []},
        "devices": [{"name": f"{w.worker_id} ({w.model})", "type": w.device.split(":")[0], "index": i, "vram_total": 0, "vram_free": 0,
                     "torch_vram_total": 0, "torch_vram_free": 0} for i, w in enumerate(workers)],
    })
