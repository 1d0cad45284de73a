"""OpenAI's model list on the gateway: `GET /v1/models` and `GET /v1/models/{id}`, the models the live
workers serve in OpenAI's shape, so that OpenAI's clients (`client.models.list()`) see what they may
name in `model`. An OpenAI image model's name (dall-e-3, gpt-image-1, ...), which means the current
model here, is found by `GET /v1/models/{id}` too; unknown names answer 404 in OpenAI's shape.
"""

from __future__ import annotations

from aiohttp import web

from gateway.core.caller import SERVICE
from gateway.apis.openai.images import OPENAI_MODELS, OpenAIFailure
from gateway.http.views.openai import OpenAIModel, OpenAIModelList

routes = web.RouteTableDef()


def served(request: web.Request) -> dict[str, OpenAIModel]:
    models = request.app[SERVICE].served_models()
    return {name: OpenAIModel(id=name, created=int(min(w.started_at for w in workers))) for name, workers in models.items()}


@routes.get("/v1/models")
async def model_list(request: web.Request) -> web.Response:
    listed = OpenAIModelList(data=[model for _, model in sorted(served(request).items())])
    return web.json_response(listed.model_dump())


@routes.get("/v1/models/{model_id}")
async def model_one(request: web.Request) -> web.Response:
    name = request.match_info["model_id"]
    models = served(request)
    if name in models:
        return web.json_response(models[name].model_dump())
    current = await request.app[SERVICE].current_model()
    if name.startswith(OPENAI_MODELS) and current in models:  # an alias of the current model
        return web.json_response(models[current].model_copy(update={"id": name}).model_dump())
    return OpenAIFailure(
        404, f"The model '{name}' does not exist; served: {', '.join(sorted(models)) or 'none (no worker is running)'}",
        param="model", code="model_not_found",
    ).response()
