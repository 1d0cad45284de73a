"""OpenAI's Images API on the gateway: `POST /v1/images/generations`, answered when every image is done.

Each of the `n` images is one job on the queue, with seeds seed, seed+1, ... (a random first seed when
none is sent), queued as one group through `gateway.core.submission` like a native request with `n`. The
handler follows the jobs until all are done (at most WAIT_S seconds, then 504 and the jobs are
cancelled) and answers base64 images or absolute URLs of `/v1/jobs/{id}/image`. Without
`response_format` the answer is OpenAI's default for the model named: base64 for the GPT image models,
URLs for the DALL-E ones, for no model and for the models served here. Edits and variations
(`gateway.apis.openai.edits`) and the model list (`gateway.apis.openai.models`) answer the same way.

`model` is a served model or an OpenAI name (dall-e-2, dall-e-3, gpt-image-*), which means the current
model. `quality` scales the model's default steps: low takes half, standard/medium/auto the default,
high/hd one and a half times (within the step limit); an explicit `steps` wins. `style`, `moderation`,
`user` and `safety_identifier` are accepted and change nothing.

Every error comes in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, so OpenAI's
client libraries raise their usual exceptions: 400 naming the param, 403/429 for the API key's limits,
502 when a job failed on a worker, 503 while NATS is away, 504 after WAIT_S.
"""

from __future__ import annotations

import base64
import logging
import re
import time

from aiohttp import web
from pydantic import ValidationError

from gateway.http.http_errors import read_json
from gateway.core.problems import Problem, classify
from gateway.core.service import JobService
from gateway.core.caller import SERVICE, caller, tier_for
from gateway.core.waiting import image_data, until_done
from gateway.http.proxies import public_origin
from gateway.http.views.openai import OpenAIError, OpenAIErrorDetail, OpenAIImage, OpenAIImageRequest, OpenAIImagesResponse
from schemas.job import new_seed
from schemas.request import GenerateRequest, RequestInvalid, parse_request
from schemas.status import JobStatus

log = logging.getLogger("imagegen.gateway.openai")
routes = web.RouteTableDef()

WAIT_S = 600.0
OPENAI_MODELS = ("dall-e-", "gpt-image-", "chatgpt-image-")
B64_ONLY_MODELS = ("gpt-image-", "chatgpt-image-")  # OpenAI's models that answer base64 only
DEFAULT_SIZE = (1024, 1024)
QUALITY_SCALE = {"low": 0.5, "high": 1.5, "hd": 1.5}
OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
UPLOAD_PARAMS = {"init_image": "image", "mask_image": "mask"}  # the edit and variation params they come from
SIZE = re.compile(r"^\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*$")


class OpenAIFailure(Exception):
    """An answer in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.headers = status, headers
        self.detail = OpenAIErrorDetail(message=message, type=kind, param=param, code=code)

    def response(self) -> web.Response:
        return web.json_response(OpenAIError(error=self.detail).model_dump(), status=self.status, headers=self.headers)


def bad(param: str | None, message: str, code: str = "invalid_value") -> OpenAIFailure:
    return OpenAIFailure(400, f"{param}: {message}" if param else message, param=param, code=code)


def param_of(field: str, *, steps_given: bool) -> str:
    """The OpenAI param a GenerateRequest field came from."""
    if field in ("width", "height"):
        return "size"
    if field == "format":
        return "output_format"
    if field == "quality":
        return "output_compression"
    if field == "steps" and not steps_given:
        return "quality"
    return UPLOAD_PARAMS.get(field, field)


def described(error: dict[str, str], *, steps_given: bool) -> str:
    """One problem, under the OpenAI param's name: `size: width must be a multiple of 8, got 63`."""
    field, message = error["field"], error["message"]
    if field in ("width", "height") and message.startswith("must"):
        message = f"{field} {message}"
    return f"{param_of(field, steps_given=steps_given)}: {message}"


def from_invalid(exc: RequestInvalid, *, steps_given: bool) -> OpenAIFailure:
    first = exc.errors[0] if exc.errors else {"field": "body", "message": "invalid"}
    param = None if first["field"] == "body" else param_of(first["field"], steps_given=steps_given)
    message = "; ".join(described(e, steps_given=steps_given) for e in exc.errors) or str(exc)
    return OpenAIFailure(400, message, param=param, code="invalid_value")


def parse_body(body: object) -> OpenAIImageRequest:
    if not isinstance(body, dict):
        raise bad(None, "the body must be a JSON object")
    return validated(OpenAIImageRequest, body)


def validated(kind: type, data: dict):
    """`kind` validated from a JSON body or a form's fields; the first problem as OpenAI names it."""
    try:
        return kind.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        if err["type"] == "extra_forbidden":
            raise bad(param, "unrecognized request argument", "unknown_parameter") from None
        if err["type"] == "missing":
            raise bad(param, "Missing required parameter", "missing_required_parameter") from None
        raise bad(param, err["msg"].removeprefix("Value error, ")) from None


def parse_size(size: str | None) -> tuple[int, int]:
    if size is None or size.strip().lower() == "auto":
        return DEFAULT_SIZE
    match = SIZE.match(size)
    if match is None:
        raise bad("size", f"must be WIDTHxHEIGHT (e.g. 1024x1024) or auto, got {size!r}")
    return int(match[1]), int(match[2])


async def resolve_model(jobs: JobService, name: str | None) -> str | None:
    """The model to ask for: None (the current model) for OpenAI's names and for no name."""
    if name is None or name.startswith(OPENAI_MODELS):
        return None
    served = jobs.served_models()
    if served and name not in served:
        known = ", ".join(sorted(served))
        raise bad("model", f"unknown model {name!r}; served: {known}, or an OpenAI name such as dall-e-3 for the current model", "model_not_found")
    return name


def quality_steps(jobs: JobService, model: str | None, quality: str | None) -> int | None:
    """Steps for low/high/hd from the model's default; None (the default) otherwise."""
    scale = QUALITY_SCALE.get(quality or "")
    workers = jobs.served_models().get(model or "", [])
    if scale is None or not workers:
        return None
    return max(1, min(jobs.settings.limits.max_steps, round(workers[0].default_steps * scale)))


def build_request(ask: OpenAIImageRequest, *, width: int, height: int, model: str | None, steps: int | None, limits) -> GenerateRequest:
    fields: dict = {
        "prompt": ask.prompt,
        "width": width,
        "height": height,
        "format": OUTPUT_FORMATS[ask.output_format or "png"],
        "n": ask.n,
        "seed": ask.seed if ask.seed is not None else new_seed(),
    }
    optional = {
        "model": model,
        "steps": steps,
        "negative_prompt": ask.negative_prompt,
        "guidance": ask.guidance,
        "quality": max(1, ask.output_compression) if ask.output_compression is not None else None,
        "cache": False if ask.seed is None else None,  # a seed picked here never repeats: not worth caching
    }
    fields.update({k: v for k, v in optional.items() if v is not None})
    try:
        return parse_request(fields, limits=limits)
    except RequestInvalid as exc:
        raise from_invalid(exc, steps_given=ask.steps is not None) from None


def from_problem(problem: Problem) -> OpenAIFailure:
    """A neutral Problem in OpenAI's shape: the error type by status, the param for a field of the body."""
    if problem.status == 403:
        kind, param = "permission_error", problem.field
    elif problem.status == 429:
        kind, param = "rate_limit_error", None
    elif problem.status >= 500:
        kind, param = "server_error", None
    else:
        kind, param = "invalid_request_error", None
    if problem.status == 400 and problem.field is not None:  # a job failed over a field of its request
        param = param_of(problem.field, steps_given=False)
    headers = None if problem.retry_after_s is None else {"Retry-After": str(problem.retry_after_s)}
    return OpenAIFailure(problem.status, problem.message, param=param, code=problem.code, kind=kind, headers=headers)


def default_response_format(model: str | None) -> str:
    """OpenAI's default: b64_json for the GPT image models (they answer nothing else), url for the DALL-E
    ones, for no model and for the models served here."""
    return "b64_json" if model is not None and model.startswith(B64_ONLY_MODELS) else "url"


async def answer_images(
    request: web.Request, base: GenerateRequest, *, response_format: str | None, model_name: str | None,
    output_format: str | None = None, what: str = "images",
) -> web.Response:
    """Queues `base` for the caller (its API key's tier), waits for every image and answers OpenAI's
    images response: base64 or URLs (`response_format`, else OpenAI's default for `model_name`)."""
    jobs = request.app[SERVICE]
    who = caller(request)
    owner = who.get("owner")
    tier = tier_for(who.get("key"))
    if tier is not None:
        base = base.model_copy(update={"tier": tier})
    as_url = (response_format or default_response_format(model_name)) == "url"
    started = time.monotonic()

    async def collect(finished: list[JobStatus]) -> list[OpenAIImage]:
        images = []
        for status in finished:
            item = OpenAIImage(job_id=status.job_id, seed=status.seed)
            if as_url:
                item.url = f"{public_origin(request, jobs.settings.trust_proxy)}/v1/jobs/{status.job_id}/image"
            else:
                item.b64_json = base64.b64encode(await image_data(jobs, status.job_id, owner)).decode("ascii")
            images.append(item)
        return images

    finished, images = await until_done(jobs, base, who, collect, wait_s=WAIT_S)
    job_ids = [status.job_id for status in finished]
    made = finished[0].request or {}
    width, height = made.get("width", base.width), made.get("height", base.height)
    log.info("%s %s: %d done in %.1fs, %dx%d", what, ",".join(job_ids), len(job_ids), time.monotonic() - started, width, height)
    answer = OpenAIImagesResponse(
        created=int(time.time()), data=images, size=f"{width}x{height}", output_format=output_format or "png"
    )
    return web.json_response(answer.model_dump(exclude_none=True))


async def generate(request: web.Request) -> web.Response:
    jobs = request.app[SERVICE]
    ask = parse_body(await read_json(request))
    if ask.stream:
        raise bad("stream", "streaming is not available on this server; leave stream unset or false", "unsupported_value")
    if ask.background == "transparent":
        raise bad("background", "transparent backgrounds are not available; use auto or opaque", "unsupported_value")
    width, height = parse_size(ask.size)
    model = await resolve_model(jobs, ask.model)
    if ask.steps is not None:
        steps = ask.steps
    else:
        steps = quality_steps(jobs, model or await jobs.current_model(), ask.quality)
    base = build_request(ask, width=width, height=height, model=model, steps=steps, limits=jobs.settings.limits)
    return await answer_images(
        request, base, response_format=ask.response_format, model_name=ask.model, output_format=ask.output_format
    )


async def answered(run, request: web.Request) -> web.Response:
    """`run(request)`, with every failure in OpenAI's error shape."""
    try:
        return await run(request)
    except OpenAIFailure as exc:
        return exc.response()
    except RequestInvalid as exc:
        return from_invalid(exc, steps_given=True).response()
    except web.HTTPRequestEntityTooLarge as exc:
        return OpenAIFailure(413, f"body too large: {exc.text}", code="body_too_large").response()
    except Exception as exc:
        if (problem := classify(exc)) is None:
            raise
        if problem.status == 503:
            log.warning("images request: broker unavailable: %s", exc)
        return from_problem(problem).response()


@routes.post("/v1/images/generations")
async def generations(request: web.Request) -> web.Response:
    return await answered(generate, request)
