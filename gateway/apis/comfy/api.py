"""ComfyUI's server API on the gateway, for the tools and scripts that queue ComfyUI prompts: `POST /prompt`
(a text-to-image or image-to-image graph, read by `gateway.apis.comfy.graph_reader`; `queueing`),
`POST /upload/image` (the images LoadImage names; `uploads`), `GET /history` (`history`), `GET /view`
(`view`), `GET /queue`, `POST /queue` (delete, clear), `POST /interrupt` (`prompt_queue`), the WebSocket
`/ws?clientId=...` with ComfyUI's messages (`socket_feed`), `GET /object_info` for the nodes it runs,
`/system_stats`, `/embeddings` and `/models` (`system`). Every route is served under `/api` too, as
ComfyUI serves them.

A prompt becomes `batch_size` jobs in one group (seeds seed, seed+1, ...), queued like any other
request; its record (`gateway.apis.comfy.record`) goes to a KV bucket that every gateway watches, so a client may
queue through one gateway and follow on another's socket. An image is `<job id>.png` for `/view`.
A `SaveImageWebsocket` node (ComfyUI's own, from its custom_nodes) sends its images to the prompt's
`client_id` socket as binary PNG frames in ComfyUI's framing while it executes, and lists none in
/history. Live previews go out as binary JPEG frames only when the prompt's `extra_data.preview_method`
asks for them, or the gateway runs with `--comfy-previews` (ComfyUI's default preview method is none).
/history's messages carry the times the prompt's jobs started and ended.
With API keys on, a caller sees and stops only its key's prompts.
"""

from __future__ import annotations

from gateway.apis.comfy import history, prompt_queue, queueing, socket_feed, system, uploads, view
from gateway.apis.comfy.prompts import ComfyPrompts
from gateway.core.service import JobService

routes = [*queueing.routes, *uploads.routes, *prompt_queue.routes, *history.routes, *view.routes, *socket_feed.routes,
          *system.routes]


def attach(jobs: JobService) -> None:
    """Keeps ComfyUI's prompt records beside `jobs`: `jobs.comfy`, watched from its KV bucket once the
    service starts."""
    jobs.comfy = ComfyPrompts(ttl_s=jobs.settings.topology.job_ttl_s)

    async def start(service: JobService) -> None:
        await service.comfy.start(service.js, service.view)

    jobs.start_hooks.append(start)
