"""ComfyUI's routes as this gateway registers them: each at its path and at `/api` + its path, as ComfyUI
serves them."""

from __future__ import annotations

from aiohttp import web


def comfy_route(table: web.RouteTableDef, method: str, path: str):
    """Registers a handler in `table` at `path` and at `/api` + `path`."""
    def wrap(handler):
        table.route(method, path)(handler)
        table.route(method, "/api" + path)(handler)
        return handler
    return wrap
