"""The OpenAPI document, generated from the same pydantic models that validate requests, and the
Swagger UI at /swagger, served from the swagger-ui-bundle package's files (no CDN)."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel
from swagger_ui_bundle import swagger_ui_path

from gateway.http.views.a1111 import (
    A1111Embeddings,
    A1111Error,
    A1111Images,
    A1111Img2ImgRequest,
    A1111Lora,
    A1111Memory,
    A1111Model,
    A1111Options,
    A1111OptionsUpdate,
    A1111Progress,
    A1111Sampler,
    A1111Schedule,
    A1111Scripts,
    A1111Txt2ImgRequest,
)
from gateway.http.views.comfy import ComfyError, ComfyPromptQueued, ComfyPromptRequest
from gateway.http.views.mflux import (
    LoadRequest,
    MfluxGenerateResponse,
    MfluxPs,
    MfluxStatusResponse,
    MfluxTask,
    ModelInfo,
)
from gateway.http.views.native import ErrorBody, GroupView, JobView, LimitsView, WorkersView
from gateway.http.views.openai import (
    OpenAIError,
    OpenAIImageRequest,
    OpenAIImagesResponse,
    OpenAIModel,
    OpenAIModelList,
)
from schemas.request import GenerateRequest

TASK_ID = {"name": "task_id", "in": "query", "required": True, "schema": {"type": "string"}}
JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
GROUP_ID = {"name": "group_id", "in": "path", "required": True, "schema": {"type": "string"}}
BOOL = {"type": "boolean"}
WAIT = {
    "name": "wait", "in": "query", "description": "Seconds to wait for the job's end before answering (a long poll)",
    "schema": {"type": "number", "minimum": 0, "maximum": 60},
}
PREFER = {
    "name": "Prefer", "in": "header", "description": "wait=N: as the wait parameter (RFC 7240)",
    "schema": {"type": "string", "pattern": "^wait(=([0-9]|[1-5][0-9])(\\.[0-9]+)?|=60)?$"},
}
ACCEPT = {
    "name": "Accept", "in": "header",
    "description": "image/* (or the job's image type ranked above application/json) with a wait: the 201 is the image itself",
    "schema": {"type": "string"},
}
IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key", "in": "header",
    "description": "Names this request: sent again with the same body it answers the jobs queued the first time; with another body, 422",
    "schema": {"type": "string", "maxLength": 255},
}
KEY_REUSED = {
    "description": "The Idempotency-Key came before with another request",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
}

# (method, path, summary, tag, request body model, response model, parameters, extra responses)
OPERATIONS: list[tuple[str, str, str, str, type[BaseModel] | None, Any, list[dict], dict]] = [
    ("post", "/api/generate", "Queue an image (mflux-server)", "mflux", GenerateRequest, MfluxGenerateResponse, [IDEMPOTENCY_KEY], {"422": KEY_REUSED}),
    ("get", "/api/status", "Status of a task (mflux-server)", "mflux", None, MfluxStatusResponse, [TASK_ID], {}),
    (
        "get",
        "/api/image",
        "The finished image; deleted after delivery unless delete=false (mflux-server)",
        "mflux",
        None,
        "image",
        [
            TASK_ID,
            {"name": "base64", "in": "query", "schema": {**BOOL, "default": False}},
            {"name": "delete", "in": "query", "schema": {**BOOL, "default": True}},
        ],
        {},
    ),
    ("get", "/api/cancel", "Cancel a task (mflux-server)", "mflux", None, None, [TASK_ID], {}),
    ("get", "/api/tasks", "All tasks, without images (mflux-server)", "mflux", None, [MfluxTask], [], {}),
    ("get", "/api/clear", "Remove all tasks (mflux-server)", "mflux", None, None, [], {}),
    ("get", "/api/ls", "Models the workers serve (mflux-server)", "mflux", None, {"additionalProperties": ModelInfo}, [], {}),
    ("get", "/api/ps", "The current model (mflux-server)", "mflux", None, MfluxPs, [], {}),
    ("post", "/api/load", "Make a served model the default (mflux-server)", "mflux", LoadRequest, None, [], {}),
    (
        "post",
        "/v1/jobs",
        "Queue an image, or n images as a group (job_ids lists them); with a wait, 201 once they have ended",
        "jobs",
        GenerateRequest,
        JobView,
        [WAIT, PREFER, ACCEPT, IDEMPOTENCY_KEY],
        {
            "422": KEY_REUSED,
            "201": {
                "description": "Ended within the wait: the job, or with an Accept that ranks the image first, the image itself",
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/JobView"}},
                    **{t: {} for t in ("image/jpeg", "image/png", "image/webp")},
                },
            },
            "406": {"description": "The Accept header takes neither JSON nor the image this request can be answered with"},
            "502": {
                "description": "The image was asked for and the job ended without one (failed, cancelled, expired)",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobView"}}},
            },
        },
    ),
    (
        "get",
        "/v1/jobs",
        "The caller's jobs, newest first, a page at a time (Link: <...>; rel=\"next\" while more follow)",
        "jobs",
        None,
        [JobView],
        [
            {"name": "state", "in": "query", "description": "Comma-separated states to list", "schema": {"type": "string"}},
            {"name": "limit", "in": "query", "description": "Jobs per page", "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}},
            {"name": "before", "in": "query", "description": "The cursor from the Link header of the page before", "schema": {"type": "string"}},
        ],
        {},
    ),
    ("get", "/v1/jobs/{job_id}", "A job's status, position and ETA; with wait, once it has ended", "jobs", None, JobView, [JOB_ID, WAIT], {}),
    ("get", "/v1/jobs/{job_id}/image", "The finished image", "jobs", None, "image", [JOB_ID], {}),
    ("delete", "/v1/jobs/{job_id}", "Cancel an unfinished job; remove a finished one and its image (deleted: true, then 404)", "jobs", None, JobView, [JOB_ID], {}),
    ("post", "/v1/jobs/{job_id}/cancel", "Cancel a job", "jobs", None, JobView, [JOB_ID], {}),
    ("get", "/v1/jobs/{job_id}/events", "The job's events as Server-Sent Events", "jobs", None, "sse", [JOB_ID], {}),
    ("get", "/v1/groups/{group_id}", "The jobs of a request with n images", "jobs", None, GroupView, [GROUP_ID], {}),
    (
        "get",
        "/v1/limits",
        "What this gateway accepts: images per request, steps, pixels, sides, prompt and upload sizes",
        "jobs",
        None,
        LimitsView,
        [],
        {},
    ),
    (
        "post",
        "/v1/images/generations",
        "Generate images, answered when all are done (OpenAI Images API)",
        "openai",
        OpenAIImageRequest,
        OpenAIImagesResponse,
        [IDEMPOTENCY_KEY],
        {code: OpenAIError for code in ("400", "403", "422", "429", "502", "503", "504")},
    ),
    (
        "post",
        "/v1/images/edits",
        "Edit an image (OpenAI Images API; multipart: image or image[], mask whose transparent area is redrawn, prompt, n, size, response_format)",
        "openai",
        None,
        OpenAIImagesResponse,
        [],
        {code: OpenAIError for code in ("400", "403", "429", "502", "503", "504")},
    ),
    (
        "post",
        "/v1/images/variations",
        "Variations of an image, as image-to-image (OpenAI Images API; multipart: image, n, size, response_format)",
        "openai",
        None,
        OpenAIImagesResponse,
        [],
        {code: OpenAIError for code in ("400", "403", "429", "502", "503", "504")},
    ),
    ("get", "/v1/models", "The served models in OpenAI's list shape", "openai", None, OpenAIModelList, [], {}),
    (
        "get",
        "/v1/models/{model_id}",
        "One served model, or an OpenAI model name (the current model), in OpenAI's shape",
        "openai",
        None,
        OpenAIModel,
        [{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}],
        {"404": OpenAIError},
    ),
    (
        "post",
        "/sdapi/v1/txt2img",
        "Text to image, answered when all images are done (AUTOMATIC1111's API)",
        "a1111",
        A1111Txt2ImgRequest,
        A1111Images,
        [],
        {code: A1111Error for code in ("403", "413", "422", "429", "502", "503", "504")},
    ),
    (
        "post",
        "/sdapi/v1/img2img",
        "Image to image and inpainting, answered when all images are done (AUTOMATIC1111's API)",
        "a1111",
        A1111Img2ImgRequest,
        A1111Images,
        [],
        {code: A1111Error for code in ("403", "413", "422", "429", "502", "503", "504")},
    ),
    (
        "get",
        "/sdapi/v1/progress",
        "Progress of the caller's newest unfinished request, with its job in hand's newest preview (AUTOMATIC1111's API)",
        "a1111",
        None,
        A1111Progress,
        [{"name": "skip_current_image", "in": "query", "description": "true: no preview image (current_image null)", "schema": BOOL}],
        {},
    ),
    (
        "post",
        "/sdapi/v1/interrupt",
        "Stop the caller's newest unfinished request; its call answers with the images made before (AUTOMATIC1111's API)",
        "a1111",
        None,
        None,
        [],
        {code: A1111Error for code in ("503",)},
    ),
    (
        "post",
        "/sdapi/v1/skip",
        "Drop the job in hand of the caller's newest unfinished request (AUTOMATIC1111's API); answers null",
        "a1111",
        None,
        "null",
        [],
        {code: A1111Error for code in ("503",)},
    ),
    ("get", "/sdapi/v1/sd-models", "The served models with their hashes (AUTOMATIC1111's API)", "a1111", None, [A1111Model], [], {}),
    ("get", "/sdapi/v1/memory", "The gateway's RAM; CUDA unavailable (AUTOMATIC1111's API)", "a1111", None, A1111Memory, [], {}),
    ("get", "/sdapi/v1/cmd-flags", "A1111's command-line flags as this server stands (AUTOMATIC1111's API)", "a1111", None, None, [], {}),
    ("get", "/sdapi/v1/scripts", "No scripts here (AUTOMATIC1111's API)", "a1111", None, A1111Scripts, [], {}),
    ("get", "/sdapi/v1/embeddings", "No embeddings here (AUTOMATIC1111's API)", "a1111", None, A1111Embeddings, [], {}),
    *[("get", f"/sdapi/v1/{name}", f"Empty: no {name.replace('-', ' ')} here (AUTOMATIC1111's API)", "a1111", None, "empty", [], {})
      for name in ("sd-vae", "upscalers", "latent-upscale-modes", "hypernetworks", "face-restorers", "prompt-styles",
                   "script-info", "extensions", "realesrgan-models")],
    *[("post", f"/sdapi/v1/{name}", "Nothing to rescan: workers load their weights at start (AUTOMATIC1111's API); answers null",
       "a1111", None, "null", [], {}) for name in ("refresh-checkpoints", "refresh-vae", "refresh-embeddings")],
    ("get", "/sdapi/v1/loras", "The LoRA adapters the current model's workers loaded, for <lora:NAME:WEIGHT> in prompts (AUTOMATIC1111's API)", "a1111", None, [A1111Lora], [], {}),
    ("post", "/sdapi/v1/refresh-loras", "Nothing to rescan: the list is the live workers' (AUTOMATIC1111's API); answers null", "a1111", None, "null", [], {}),
    ("get", "/sdapi/v1/samplers", "The samplers txt2img takes (AUTOMATIC1111's API)", "a1111", None, [A1111Sampler], [], {}),
    ("get", "/sdapi/v1/schedulers", "The schedules txt2img takes (AUTOMATIC1111's API)", "a1111", None, [A1111Schedule], [], {}),
    ("get", "/sdapi/v1/options", "The current model (AUTOMATIC1111's API; only sd_model_checkpoint)", "a1111", None, A1111Options, [], {}),
    (
        "post",
        "/sdapi/v1/options",
        "Make a served model the current one (AUTOMATIC1111's API; only sd_model_checkpoint); answers null",
        "a1111",
        A1111OptionsUpdate,
        "null",
        [],
        {code: A1111Error for code in ("422", "503")},
    ),
    (
        "post", "/prompt", "Queue a ComfyUI prompt: a text-to-image graph of the nodes in /object_info (ComfyUI's API; also /api/prompt)",
        "comfyui", ComfyPromptRequest, ComfyPromptQueued, [], {code: ComfyError for code in ("400", "403", "429", "503")},
    ),
    ("get", "/prompt", "How many jobs are queued or running on the pool: {exec_info: {queue_remaining}} (ComfyUI's API)", "comfyui", None,
     None, [], {}),
    ("get", "/history", "The caller's finished ComfyUI prompts, their outputs and status (ComfyUI's API)", "comfyui", None, None,
     [{"name": "max_items", "in": "query", "description": "Only the newest this many", "schema": {"type": "integer", "minimum": 1}}],
     {"400": ComfyError}),
    ("get", "/history/{prompt_id}", "A finished ComfyUI prompt; {} while it runs (ComfyUI's API)", "comfyui", None, None,
     [{"name": "prompt_id", "in": "path", "required": True, "schema": {"type": "string"}}], {}),
    ("get", "/view", "An image /history names (ComfyUI's API)", "comfyui", None, "image",
     [{"name": n, "in": "query", "required": n == "filename", "schema": {"type": "string"}} for n in ("filename", "subfolder", "type")],
     {"404": ComfyError}),
    ("get", "/queue", "The caller's running and pending ComfyUI prompts (ComfyUI's API)", "comfyui", None, None, [], {}),
    ("post", "/queue", "Drop prompts: {\"delete\": [prompt_id]} or {\"clear\": true} (ComfyUI's API)", "comfyui", None, None, [], {"400": ComfyError}),
    ("post", "/interrupt", "Stop the caller's running prompt, or {\"prompt_id\": ...} (ComfyUI's API)", "comfyui", None, None, [], {"400": ComfyError}),
    ("get", "/object_info", "The nodes /prompt takes, with the served models, LoRAs and limits (ComfyUI's API)", "comfyui", None, None, [], {}),
    ("get", "/system_stats", "This gateway and the live workers (ComfyUI's API)", "comfyui", None, None, [], {}),
    ("get", "/embeddings", "None here (ComfyUI's API)", "comfyui", None, "names", [], {}),
    ("get", "/models/{folder}", "checkpoints: the served models; loras: the adapters (ComfyUI's API)", "comfyui", None, "names",
     [{"name": "folder", "in": "path", "required": True, "schema": {"type": "string", "enum": ["checkpoints", "loras", "controlnet"]}}],
     {"404": ComfyError}),
    ("get", "/v1/workers", "The live workers: model, device, state, speed, fairness, release", "ops", None, WorkersView, [], {}),
    ("get", "/healthz", "Liveness, NATS connection, live workers and the gateway's release", "ops", None, None, [], {}),
]


NULL = {"type": "null"}


def openapi30(schema: Any) -> Any:
    """A JSON Schema from pydantic (draft 2020-12) in OpenAPI 3.0's dialect, which Swagger UI 4 and
    schema-driven clients read: `nullable` instead of a `null` type, boolean exclusive bounds."""
    if not isinstance(schema, dict):
        return [openapi30(s) for s in schema] if isinstance(schema, list) else schema
    out = {
        k: {name: openapi30(sub) for name, sub in v.items()} if k == "properties" else openapi30(v)
        for k, v in schema.items()
    }
    for bound, limit in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if type(out.get(bound)) in (int, float):
            out[limit], out[bound] = out[bound], True
    options = out.get("anyOf")
    if isinstance(options, list) and NULL in options:
        rest = [o for o in out.pop("anyOf") if o != NULL]
        if len(rest) == 1 and "$ref" not in rest[0]:
            out = {**rest[0], **out}
        elif rest:
            out["allOf" if len(rest) == 1 else "anyOf"] = rest
        out["nullable"] = True
    return out


def _schema_ref(model: Any, components: dict[str, Any]) -> dict[str, Any]:
    if isinstance(model, list):
        return {"type": "array", "items": _schema_ref(model[0], components)}
    if isinstance(model, dict):
        return {k: _schema_ref(v, components) if isinstance(v, type) else v for k, v in model.items()} | {
            "type": "object"
        }
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, sub in schema.pop("$defs", {}).items():
        components[name] = openapi30(sub)
    components[model.__name__] = openapi30(schema)
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _error_response(model: type[BaseModel], components: dict[str, Any]) -> dict[str, Any]:
    description = (model.__doc__ or "Error").strip().splitlines()[0]
    return {"description": description, "content": {"application/json": {"schema": _schema_ref(model, components)}}}


def build_spec() -> dict[str, Any]:
    components: dict[str, Any] = {}
    paths: dict[str, Any] = {}
    error = {"content": {"application/json": {"schema": _schema_ref(ErrorBody, components)}}}
    for method, path, summary, tag, body, answer, params, extra in OPERATIONS:
        if answer == "image":
            ok = {"description": "The image", "content": {t: {} for t in ("image/jpeg", "image/png", "image/webp", "text/plain")}}
        elif answer == "sse":
            ok = {"description": "Events", "content": {"text/event-stream": {}}}
        elif answer is None:
            ok = {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}
        elif answer == "empty":
            ok = {"description": "OK: an empty list", "content": {"application/json": {"schema": {"type": "array", "items": {"type": "object"}, "maxItems": 0}}}}
        elif answer == "names":
            ok = {"description": "OK", "content": {"application/json": {"schema": {"type": "array", "items": {"type": "string"}}}}}
        elif answer == "null":
            ok = {"description": "OK: null", "content": {"application/json": {"schema": {"type": "object", "nullable": True}}}}
        else:
            ok = {"description": "OK", "content": {"application/json": {"schema": _schema_ref(answer, components)}}}
        op: dict[str, Any] = {
            "summary": summary,
            "tags": [tag],
            "parameters": params,
            "responses": {"200" if method != "post" or path != "/v1/jobs" else "202": ok, "400": {"description": "Bad input", **error}, "404": {"description": "Unknown task", **error}, "503": {"description": "NATS unavailable", **error}, **{code: _error_response(v, components) if isinstance(v, type) else v for code, v in extra.items()}},
        }
        if body is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _schema_ref(body, components)}}}
        paths.setdefault(path, {})[method] = op
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "imagegen",
            "version": "1",
            "description": "SDXL image generation over NATS JetStream. mflux-server's API under /api, the native API under /v1, OpenAI's Images API at /v1/images/generations, AUTOMATIC1111's under /sdapi/v1, ComfyUI's at /prompt, /history, /view, /queue and /ws.",
        },
        "paths": paths,
        "components": {"schemas": components},
    }


SWAGGER_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>imagegen API</title>
<link rel="stylesheet" href="/swagger/static/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/swagger/static/swagger-ui-bundle.js"></script>
<script>window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});</script>
</body></html>"""


def add_routes(app: web.Application) -> None:
    spec = build_spec()

    async def openapi(_request: web.Request) -> web.Response:
        return web.json_response(spec)

    async def swagger(_request: web.Request) -> web.Response:
        return web.Response(text=SWAGGER_PAGE, content_type="text/html")

    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/swagger", swagger)
    app.router.add_get("/swagger/", swagger)
    app.router.add_static("/swagger/static", swagger_ui_path)
