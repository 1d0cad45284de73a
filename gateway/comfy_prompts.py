"""Every ComfyUI prompt queued through any gateway, kept in memory from the KV bucket that holds them.

The gateway that queues a prompt writes it to `imagegen-comfy-prompts`; every gateway watches the bucket
(as its queue view watches the job records), so `/history`, `/queue` and the `/ws` of the client that
sent the prompt are answered by whichever gateway a client reaches. A socket registers its client id
and is handed each prompt of that client as it arrives.
"""

from __future__ import annotations

import asyncio
import logging
import time

from nats.js import JetStreamContext
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from gateway.queue_view import QueueView
from schemas import names
from schemas.codec import DecodeError, decode, encode
from gateway.comfy_record import ComfyPrompt

log = logging.getLogger("imagegen.gateway.comfy")


class ComfyPrompts:
    def __init__(self, *, ttl_s: float) -> None:
        self.ttl_s = ttl_s  # the bucket's: a prompt older than this is gone from it
        self.by_id: dict[str, ComfyPrompt] = {}  # in the order they came, near enough submission order
        self.by_job: dict[str, str] = {}  # job id -> prompt id
        self.clients: dict[str, set[asyncio.Queue[ComfyPrompt]]] = {}  # client id -> its sockets' queues
        self.kv: KeyValue | None = None

    async def start(self, js: JetStreamContext, view: QueueView, *, timeout_s: float = 30.0) -> None:
        self.kv = await js.key_value(names.COMFY_BUCKET)
        ready = view.watch_also(self.kv, self._on_entry)
        await asyncio.wait_for(ready.wait(), timeout_s)

    async def add(self, prompt: ComfyPrompt) -> ComfyPrompt:
        """Keeps the prompt for every gateway (and here at once, before the watch brings it back), and
        returns it; when its id is kept already (the same prompt sent again), returns the one kept,
        which may be another caller's."""
        try:
            revision = await self.kv.create(prompt.prompt_id, encode(prompt))
        except KeyWrongLastSequenceError:
            entry = await self.kv.get(prompt.prompt_id)
            kept = decode(entry.value, ComfyPrompt)
            self._keep(kept, entry.revision)
            return kept
        self._keep(prompt, revision)
        return prompt

    def get(self, prompt_id: str) -> ComfyPrompt | None:
        return self.by_id.get(prompt_id)

    def of_job(self, job_id: str) -> ComfyPrompt | None:
        prompt_id = self.by_job.get(job_id)
        return self.by_id.get(prompt_id) if prompt_id else None

    def follow(self, client_id: str) -> asyncio.Queue[ComfyPrompt]:
        """A queue of the client's prompts as they are queued, from now on."""
        queue: asyncio.Queue[ComfyPrompt] = asyncio.Queue()
        self.clients.setdefault(client_id, set()).add(queue)
        return queue

    def unfollow(self, client_id: str, queue: asyncio.Queue[ComfyPrompt]) -> None:
        queues = self.clients.get(client_id)
        if queues is not None:
            queues.discard(queue)
            if not queues:
                del self.clients[client_id]

    def _on_entry(self, key: str, value: bytes | None, revision: int) -> None:
        if value is None:
            prompt = self.by_id.pop(key, None)
            for job_id in prompt.job_ids if prompt else ():
                self.by_job.pop(job_id, None)
            return
        try:
            self._keep(decode(value, ComfyPrompt), revision)
        except DecodeError as exc:
            log.warning("comfy prompt %s unreadable: %s", key, exc)

    def _keep(self, prompt: ComfyPrompt, revision: int) -> None:
        if prompt.prompt_id in self.by_id:  # this gateway's own write, come back through the watch
            return
        self._forget_expired()
        self.by_id[prompt.prompt_id] = prompt
        for job_id in prompt.job_ids:
            self.by_job[job_id] = prompt.prompt_id
        for queue in self.clients.get(prompt.client_id or "", ()):
            queue.put_nowait(prompt)

    def _forget_expired(self) -> None:
        """Drops the prompts the bucket no longer holds (its TTL removes them without a word to watchers)."""
        since = time.time() - self.ttl_s
        while self.by_id:
            oldest = next(iter(self.by_id.values()))
            if oldest.submitted_at >= since:
                return
            self._on_entry(oldest.prompt_id, None, 0)
