"""ComfyUI's WebSocket `/ws?clientId=...`: a `status` at once, then the run of each prompt the client
queues in ComfyUI's messages (execution_start, executing, progress, executed, execution_success,
execution_error, execution_interrupted), from its jobs' events. Live previews go out as binary JPEG frames
only when the prompt's `extra_data.preview_method` asks for them, or the gateway runs with
`--comfy-previews` (ComfyUI's default preview method is none); a `SaveImageWebsocket` node's images go out
as binary PNG frames."""

from __future__ import annotations

import asyncio
import logging
import struct
import time
import uuid
from contextlib import aclosing
from typing import Any

from aiohttp import WSMsgType, web

from gateway.apis.comfy.node_classes import SOCKET_OUTPUT
from gateway.apis.comfy.outcome import ending, job_records, output_images, shown_by
from gateway.apis.comfy.prompt_queue import queue_remaining, unfinished_prompts
from gateway.apis.comfy.record import ComfyPrompt, visible
from gateway.apis.comfy.routing import comfy_route
from gateway.core.caller import SERVICE, owner_of
from gateway.core.problems import BROKER_DOWN, NotReady, UnknownJob
from gateway.core.service import JobService
from schemas.events import JobEvent
from schemas.status import JobState, JobStatus

log = logging.getLogger("imagegen.gateway.comfy")
routes = web.RouteTableDef()

PREVIEW_IMAGE, JPEG, PNG = 1, 1, 2  # ComfyUI's binary frame: event type, then image format, each a big-endian uint32
PREVIEW_METHODS_ON = ("auto", "latent2rgb", "taesd")  # extra_data.preview_method values that turn previews on
PREVIEW_METHODS_OFF = ("none",)  # ... and off; absent or "default": the server's setting (--comfy-previews)


class Socket:
    """One `/ws` client: its messages go out one at a time."""

    def __init__(self, ws: web.WebSocketResponse, jobs: JobService, owner: str | None):
        self.ws, self.jobs, self.owner = ws, jobs, owner
        self.lock = asyncio.Lock()
        self.previews = jobs.settings.comfy_previews

    async def send(self, kind: str, data: dict) -> None:
        async with self.lock:
            await self.ws.send_json({"type": kind, "data": data})

    async def send_image(self, data: bytes, image_format: int) -> None:
        """A binary frame in ComfyUI's framing: PREVIEW_IMAGE, the format (JPEG 1, PNG 2), the image."""
        async with self.lock:
            await self.ws.send_bytes(struct.pack(">II", PREVIEW_IMAGE, image_format) + data)

    def previews_for(self, prompt: ComfyPrompt) -> bool:
        """Whether the prompt's previews are sent: as its extra_data's preview_method says (ComfyUI's
        web page sends it), else as the server is set (--comfy-previews; ComfyUI's default is none)."""
        method = prompt.extra_data.get("preview_method")
        if method in PREVIEW_METHODS_ON:
            return True
        if method in PREVIEW_METHODS_OFF:
            return False
        return self.previews

    async def send_socket_images(self, prompt: ComfyPrompt, node: str, records: list[JobStatus | None]) -> None:
        """A SaveImageWebsocket node run: each image as a binary PNG frame, after ComfyUI's progress for it."""
        made = [r for r in records if r is not None and r.state is JobState.DONE]
        for i, record in enumerate(made):
            try:
                _, data = await self.jobs.image(record.job_id, owner=self.owner)
            except (UnknownJob, NotReady) as exc:
                log.warning("comfy prompt %s: image of job %s not sent: %s", prompt.prompt_id, record.job_id, exc)
                continue
            await self.send("progress", {"value": i, "max": len(made), "prompt_id": prompt.prompt_id, "node": node})
            await self.send_image(data, PNG)

    async def status(self, sid: str | None = None) -> None:
        data: dict[str, Any] = {"status": {"exec_info": {"queue_remaining": queue_remaining(self.jobs)}}}
        if sid is not None:
            data["sid"] = sid
        await self.send("status", data)

    async def follow(self, prompt: ComfyPrompt) -> None:
        """The prompt's run in ComfyUI's messages, from its jobs' events, to its end."""
        pid, sampler = prompt.prompt_id, prompt.sampler_node
        stamp = lambda: {"prompt_id": pid, "timestamp": int(time.time() * 1000)}  # noqa: E731
        await self.send("execution_start", stamp())
        await self.send("execution_cached", {**stamp(), "nodes": []})
        await self.send("executing", {"node": sampler, "display_node": sampler, "prompt_id": pid})
        events: asyncio.Queue[JobEvent | None] = asyncio.Queue()

        async def read(job_id: str) -> None:
            async with aclosing(self.jobs.events.follow(job_id, read_status=lambda: self.jobs.get(job_id))) as stream:
                async for event in stream:
                    events.put_nowait(event)
            events.put_nowait(None)

        readers = [asyncio.ensure_future(read(job_id)) for job_id in prompt.job_ids]
        steps: dict[str, int] = {}
        totals: dict[str, int] = {}
        stopped_by: JobEvent | None = None
        previews = self.previews_for(prompt)
        try:
            ended = 0
            while ended < len(readers):
                event = await events.get()
                if event is None:
                    ended += 1
                    continue
                if event.type == "progress" and event.step is not None and event.total:
                    steps[event.job_id], totals[event.job_id] = event.step, event.total
                    total = max(totals.values()) * len(prompt.job_ids)
                    await self.send("progress", {"value": sum(steps.values()), "max": total, "prompt_id": pid, "node": sampler})
                elif event.type == "preview" and event.preview and previews:
                    await self.send_image(event.preview, JPEG)
                elif event.type in ("failed", "expired", "cancelled"):
                    stopped_by = event  # the prompt has failed or was stopped: its end is told below
                    break
        finally:
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
        records = await job_records(self.jobs, prompt, self.owner)
        kind, data = ending(prompt, records, stopped_by)
        if kind == "execution_success":
            await self.send("executing", {"node": prompt.decode_node, "display_node": prompt.decode_node, "prompt_id": pid})
            shown = output_images(prompt, records)
            for node, node_class in sorted(prompt.outputs.items()):
                await self.send("executing", {"node": node, "display_node": node, "prompt_id": pid})
                if node_class == SOCKET_OUTPUT:
                    await self.send_socket_images(prompt, node, shown_by(prompt, node, records))
                else:
                    await self.send("executed", {"node": node, "display_node": node, "output": shown[node], "prompt_id": pid})
        await self.send(kind, data)
        await self.send("executing", {"node": None, "prompt_id": pid})
        await self.status()


@comfy_route(routes, "GET", "/ws")
async def socket(request: web.Request) -> web.WebSocketResponse:
    """ComfyUI's socket: a `status` with the client's `sid` at once, then the run of each prompt the
    client queues with this `client_id` (and of those it had queued and not finished before it connected)."""
    jobs: JobService = request.app[SERVICE]
    owner = owner_of(request)
    client_id = request.query.get("clientId") or uuid.uuid4().hex
    ws = web.WebSocketResponse(heartbeat=20)
    await ws.prepare(request)
    sock = Socket(ws, jobs, owner)
    arrivals = jobs.comfy.follow(client_id)
    following: set[asyncio.Task] = set()
    started: set[str] = set()  # a prompt queued as the socket opened comes both ways

    async def follow(prompt: ComfyPrompt) -> None:
        try:
            await sock.follow(prompt)
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as exc:  # the broker away, say: the socket stays, and /history tells the end later
            log.warning("comfy socket %s: prompt %s no longer followed: %s", client_id, prompt.prompt_id, exc)

    def start(prompt: ComfyPrompt) -> None:
        if visible(prompt, owner) and prompt.prompt_id not in started:
            started.add(prompt.prompt_id)
            task = asyncio.ensure_future(follow(prompt))
            following.add(task)
            task.add_done_callback(following.discard)

    try:
        await sock.status(sid=client_id)
        running, pending = unfinished_prompts(jobs, owner)
        for prompt in running + pending:
            if prompt.client_id == client_id:
                start(prompt)
        closing = asyncio.ensure_future(drain(ws))
        while not closing.done():
            arrival = asyncio.ensure_future(arrivals.get())
            await asyncio.wait({arrival, closing}, return_when=asyncio.FIRST_COMPLETED)
            if arrival.done():
                start(arrival.result())
            else:
                arrival.cancel()
    except (ConnectionResetError, BROKER_DOWN) as exc:
        log.info("comfy socket %s closed: %s", client_id, exc)
    finally:
        jobs.comfy.unfollow(client_id, arrivals)
        for task in list(following):
            task.cancel()
        await asyncio.gather(*following, return_exceptions=True)
        await ws.close()
    return ws


async def drain(ws: web.WebSocketResponse) -> None:
    """Reads what the client sends (ComfyUI's clients send nothing the server acts on) until it closes."""
    async for message in ws:
        if message.type in (WSMsgType.ERROR, WSMsgType.CLOSE):
            return
