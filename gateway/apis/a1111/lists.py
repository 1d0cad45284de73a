"""AUTOMATIC1111's utility endpoints (`/sdapi/v1/...`) that its clients call on connecting, answered in
A1111's shapes so that no client reads an error as data.

What this service has is listed as it is: the models with their hashes (`sd-models`: the sha256 its
workers publish, see `gpu_worker.model_hash`, and A1111's short hash, its first 10 hex digits), the
LoRA adapters the current model's workers loaded, the samplers and schedules offered
(`gateway.apis.a1111.samplers`), the gateway's memory (`memory`: the process's resident RAM against the machine's, as A1111 counts it;
`cuda` as A1111 answers without a GPU, since the GPUs are the workers'), and A1111's command-line
flags as this server stands. What it does not have answers A1111's empty shape: no VAE files,
upscalers, latent upscale modes, embeddings, hypernetworks, face restorers, styles, scripts or
extensions. The `refresh-*` calls have nothing to rescan (workers load their weights at start) and
answer as A1111's do.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from gateway.apis.a1111.samplers import SAMPLERS, SCHEDULES
from gateway.core.caller import SERVICE

routes = web.RouteTableDef()

SHORT_HASH_CHARS = 10  # A1111's short hash: the first 10 hex digits of the sha256
EMPTY_LISTS = ("sd-vae", "upscalers", "latent-upscale-modes", "hypernetworks", "face-restorers", "prompt-styles",
               "script-info", "extensions", "realesrgan-models")
NOTHING_TO_RESCAN = ("refresh-checkpoints", "refresh-vae", "refresh-embeddings")


def model_hashes(workers: list) -> tuple[str | None, str | None]:
    """(short hash, sha256) of a model, from the first of its workers that published one."""
    sha256 = next((w.model_sha256 for w in workers if getattr(w, "model_sha256", None)), None)
    return (sha256[:SHORT_HASH_CHARS] if sha256 else None), sha256


@routes.get("/sdapi/v1/sd-models")
async def sd_models(request: web.Request) -> web.Response:
    """The served models; `hash` and `sha256` as A1111 gives a checkpoint's, of the model's UNet weights."""
    served = request.app[SERVICE].served_models()
    listed = []
    for name in sorted(served):
        short, sha256 = model_hashes(served[name])
        listed.append({"title": name, "model_name": name, "hash": short, "sha256": sha256, "filename": name, "config": None})
    return web.json_response(listed)


@routes.get("/sdapi/v1/loras")
async def lora_list(request: web.Request) -> web.Response:
    """The LoRA adapters the current model's workers loaded (`--lora NAME=SOURCE`), for `<lora:NAME:WEIGHT>`."""
    jobs = request.app[SERVICE]
    names = jobs.loaded_loras(await jobs.current_model()) or set()
    return web.json_response([{"name": n, "alias": n, "path": n, "metadata": {}} for n in sorted(names)])


@routes.post("/sdapi/v1/refresh-loras")
async def refresh_loras(request: web.Request) -> web.Response:
    """Nothing to rescan: workers load their adapters at start, and /sdapi/v1/loras lists the live ones."""
    return web.json_response(None)


@routes.get("/sdapi/v1/samplers")
async def samplers(request: web.Request) -> web.Response:
    return web.json_response([{"name": s.name, "aliases": list(s.aliases), "options": {}} for s in SAMPLERS])


@routes.get("/sdapi/v1/schedulers")
async def schedulers(request: web.Request) -> web.Response:
    return web.json_response(
        [{"name": name, "label": label, "aliases": None, "default_rho": -1, "need_inner_model": False} for name, label in SCHEDULES.items()]
    )


def ram() -> dict:
    """This process's resident memory against the machine's, in bytes, A1111's {free, used, total}."""
    try:
        rss_pages = int(Path("/proc/self/statm").read_text().split()[1])
        import os

        used = rss_pages * os.sysconf("SC_PAGE_SIZE")
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        total = int(meminfo["MemTotal"].split()[0]) * 1024
    except (OSError, KeyError, ValueError, IndexError) as exc:
        return {"error": f"{exc}"}
    return {"free": total - used, "used": used, "total": total}


@routes.get("/sdapi/v1/memory")
async def memory(request: web.Request) -> web.Response:
    return web.json_response({"ram": ram(), "cuda": {"error": "unavailable"}})


@routes.get("/sdapi/v1/cmd-flags")
async def cmd_flags(request: web.Request) -> web.Response:
    """A1111's flags that describe this server: its API is on, its web UI too, where it listens."""
    settings = request.app[SERVICE].settings
    return web.json_response({
        "api": True, "nowebui": False, "listen": settings.host not in ("127.0.0.1", "localhost", "::1"),
        "port": settings.port, "api_auth": None, "api_log": False, "ckpt_dir": None, "vae_dir": None, "lora_dir": None,
        "embeddings_dir": None, "hypernetwork_dir": None, "styles_file": [], "skip_version_check": True,
    })


@routes.get("/sdapi/v1/embeddings")
async def embeddings(request: web.Request) -> web.Response:
    return web.json_response({"loaded": {}, "skipped": {}})


@routes.get("/sdapi/v1/scripts")
async def scripts(request: web.Request) -> web.Response:
    return web.json_response({"txt2img": [], "img2img": []})


async def empty_list(request: web.Request) -> web.Response:
    return web.json_response([])


async def nothing_done(request: web.Request) -> web.Response:
    return web.json_response(None)


for _name in EMPTY_LISTS:
    routes.get(f"/sdapi/v1/{_name}")(empty_list)
for _name in NOTHING_TO_RESCAN:
    routes.post(f"/sdapi/v1/{_name}")(nothing_done)
