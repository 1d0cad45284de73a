"""Builds the aiohttp application: routes, CORS, errors, the web UI and the JetStream connection."""

from __future__ import annotations

import logging
from pathlib import Path

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from gateway.apis import mflux as mflux_api, native as native_api
from gateway.apis.a1111 import generation as a1111_generation, lists as a1111_lists, options as a1111_options
from gateway.apis.a1111 import progress as a1111_progress
from gateway.apis.comfy import api as comfy_api
from gateway.apis.openai import edits as openai_edits, images as openai_api, models as openai_models
from gateway.http import openapi
from gateway.http.auth import KeyRing, auth_middleware
from gateway.http.body import BodyLimits, body_middleware
from gateway.core.problems import RETRY_AFTER_S
from gateway.http.http_errors import errors_middleware
from gateway.core.service import JobService
from gateway.core.caller import SERVICE
from gateway.http.metrics import GatewayMetrics
from gateway.settings import GatewaySettings
from gateway.http.webhooks import WebhookSender
from schemas.version import __version__

log = logging.getLogger("imagegen.gateway")
STATIC = Path(__file__).parent / "static"
METRICS = web.AppKey("metrics", GatewayMetrics)


class AccessLog(AbstractAccessLogger):
    """One line per request: client, request line, status, bytes sent, milliseconds (about half the
    cost of aiohttp's default format, which formats a timestamp and two headers per line)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            '%s "%s %s" %d %d %.1fms', request.remote, request.method, request.path_qs, response.status,
            response.body_length, time * 1000,
        )


def cors_middleware(origins: str):
    @web.middleware
    async def cors(request: web.Request, handler):
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            response = web.Response(status=204)
        else:
            response = await handler(request)
        if not response.prepared:
            response.headers["Access-Control-Allow-Origin"] = origins
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, DELETE, OPTIONS"
            response.headers["Access-Control-Allow-Headers"] = "Content-Type, Authorization, X-API-Key, Idempotency-Key"
        return response

    return cors


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html")


async def healthz(request: web.Request) -> web.Response:
    jobs = request.app[SERVICE]
    connected = jobs.nc is not None and jobs.nc.is_connected
    body = {
        "ok": connected,
        "nats": "connected" if connected else "disconnected",
        "workers": len(jobs.view.live_workers()),
        "version": __version__,
    }
    if connected:
        return web.json_response(body)
    return web.json_response(body, status=503, headers={"Retry-After": str(RETRY_AFTER_S)})


def create_app(settings: GatewaySettings, jobs: JobService | None = None) -> web.Application:
    keys = KeyRing.load(path=settings.api_keys_file, inline=settings.api_keys)
    jobs = jobs or JobService(settings)
    metrics = GatewayMetrics(jobs)
    body_limits = BodyLimits(
        max_bytes=settings.max_json_bytes,
        max_image_bytes=settings.body_limit_bytes,
        max_json_items=settings.max_json_items,
        timeout_s=settings.body_timeout_s,
    )
    app = web.Application(
        middlewares=[
            metrics.middleware, cors_middleware(settings.cors_origins), errors_middleware, auth_middleware(keys),
            body_middleware(body_limits),
        ],
        client_max_size=settings.body_limit_bytes,
    )
    comfy_api.attach(jobs)
    app[SERVICE] = jobs
    app[METRICS] = metrics
    app.add_routes(mflux_api.routes)
    app.add_routes(native_api.routes)
    app.add_routes(openai_api.routes)
    app.add_routes(openai_edits.routes)
    app.add_routes(openai_models.routes)
    app.add_routes(a1111_generation.routes)
    app.add_routes(a1111_progress.routes)
    app.add_routes(a1111_options.routes)
    app.add_routes(a1111_lists.routes)
    app.add_routes(comfy_api.routes)
    openapi.add_routes(app)
    app.router.add_get("/", index)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics.handler)
    app.router.add_static("/static", STATIC)

    async def lifecycle(app: web.Application):
        await app[SERVICE].start()
        webhooks = WebhookSender(
            jobs.js,
            render=lambda status: native_api.job_view(jobs, status).model_dump(),
            secret=settings.webhook_secret,
            allow_private=settings.webhook_allow_private,
            retry_s=settings.webhook_retry_s,
            on_outcome=metrics.count_webhook_call,
        )
        await webhooks.start()
        log.info(
            "gateway connected (nats %s, auth %s)",
            settings.nats_url, f"on, {len(keys.keys)} keys" if keys.enabled else "off",
        )
        yield
        await webhooks.close()
        await app[SERVICE].close()

    app.cleanup_ctx.append(lifecycle)

    async def release_waiters(app: web.Application) -> None:  # before the drain waits for requests in flight
        app[SERVICE].release_waiters()

    app.on_shutdown.append(release_waiters)
    return app
