"""A1111's settings: the current model (`GET` and `POST /sdapi/v1/options`, a request's
`override_settings.sd_model_checkpoint`), and the few other settings its clients send along, accepted
at the values that change nothing here."""

from __future__ import annotations

from aiohttp import web

from gateway.apis.a1111.failures import answered, invalid
from gateway.core.caller import SERVICE
from gateway.core.service import JobService
from gateway.http.http_errors import read_json
from schemas.request import RequestInvalid

routes = web.RouteTableDef()

# A1111 settings its clients send along with the model (in override_settings, or to /sdapi/v1/options),
# accepted at the values that change nothing here.
SETTINGS_AT_DEFAULT: dict[str, tuple] = {"CLIP_stop_at_last_layers": (1,), "sd_vae": ("Automatic", "None", "", None)}


def settings_problem(settings: dict) -> tuple[str, str] | None:
    """(the setting, why) for the first A1111 setting other than sd_model_checkpoint that is not at its
    default (A1111's clients send some of them along); None when there is none."""
    for name, value in settings.items():
        if name == "sd_model_checkpoint":
            continue
        if name not in SETTINGS_AT_DEFAULT:
            return name, "only sd_model_checkpoint can be set here"
        if value not in SETTINGS_AT_DEFAULT[name]:
            allowed = " or ".join(repr(v) for v in SETTINGS_AT_DEFAULT[name])
            return name, f"only its default ({allowed}) is accepted here, got {value!r}"
    return None


def model_of(jobs: JobService, overrides: dict | None) -> str | None:
    if not overrides:
        return None
    if (problem := settings_problem(overrides)) is not None:
        raise invalid("override_settings", f"{problem[0]}: {problem[1]}")
    if "sd_model_checkpoint" not in overrides:
        return None
    model = overrides["sd_model_checkpoint"]
    served = jobs.served_models()
    if not isinstance(model, str) or model not in served:
        known = ", ".join(sorted(served)) or "none (no worker is running)"
        raise invalid("override_settings", f"sd_model_checkpoint: unknown model {model!r}; served: {known}")
    return model


@routes.get("/sdapi/v1/options")
async def get_options(request: web.Request) -> web.Response:
    return web.json_response({"sd_model_checkpoint": await request.app[SERVICE].current_model()})


async def run_set_options(request: web.Request) -> web.Response:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise invalid("body", "the body must be a JSON object")
    if (problem := settings_problem(body)) is not None:
        raise invalid(*problem)
    if "sd_model_checkpoint" not in body:  # only settings at their defaults: nothing to change
        return web.json_response(None)
    model = body["sd_model_checkpoint"]
    if not isinstance(model, str) or not model.strip():
        raise invalid("sd_model_checkpoint", "a model name is required (GET /sdapi/v1/sd-models)")
    try:
        await request.app[SERVICE].load_model(model.strip())
    except RequestInvalid as exc:
        raise invalid("sd_model_checkpoint", exc.errors[0]["message"] if exc.errors else str(exc)) from None
    return web.json_response(None)


@routes.post("/sdapi/v1/options")
async def set_options(request: web.Request) -> web.Response:
    return await answered(run_set_options, request)
