"""Every ComfyUI prompt queued through any gateway, kept in memory from the KV bucket that holds them.

The gateway that queues a prompt writes it to `imagegen-comfy-prompts`; every gateway watches the bucket
(as its queue view watches the job records), so `/history`, `/queue` and the `/ws` of the client that
sent the prompt are answered by whichever gateway a client reaches. A socket registers its client id
and is handed each prompt of that client as it arrives. Prompts are kept by owner and prompt id
(`gateway.apis.comfy.record.prompt_key`): one key's prompt ids say nothing about another's.
"""

from __future__ import annotations

import asyncio
import logging
import time

from nats.js import JetStreamContext
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from gateway.state.queue_view import QueueView
from schemas import names
from schemas.codec import DecodeError, decode, encode
from gateway.apis.comfy.record import ComfyPrompt, prompt_key

log = logging.getLogger("imagegen.gateway.comfy")


class ComfyPrompts:
    def __init__(self, *, ttl_s: float) -> None:
        self.ttl_s = ttl_s  # the bucket's: a prompt older than this is gone from it
        self.by_key: dict[str, ComfyPrompt] = {}  # by prompt_key, in the order they came, near enough submission order
        self.by_job: dict[str, str] = {}  # job id -> prompt key
        self.clients: dict[str, set[asyncio.Queue[ComfyPrompt]]] = {}  # client id -> its sockets' queues
        self.kv: KeyValue | None = None

    async def start(self, js: JetStreamContext, view: QueueView, *, timeout_s: float = 30.0) -> None:
        self.kv = await js.key_value(names.COMFY_BUCKET)
        ready = view.watch_also(self.kv, self._on_entry)
        await asyncio.wait_for(ready.wait(), timeout_s)

    async def add(self, prompt: ComfyPrompt) -> ComfyPrompt:
        """Keeps the prompt for every gateway (and here at once, before the watch brings it back), and
        returns it; when its owner's id is kept already (the same prompt sent again), returns the one
        kept."""
        try:
            revision = await self.kv.create(prompt.key, encode(prompt))
        except KeyWrongLastSequenceError:
            entry = await self.kv.get(prompt.key)
            kept = decode(entry.value, ComfyPrompt)
            self._keep(kept, entry.revision)
            return kept
        self._keep(prompt, revision)
        return prompt

    def get(self, prompt_id: str, owner: str | None) -> ComfyPrompt | None:
        """The owner's prompt of this id (with keys off, owner None: the one prompt of this id)."""
        return self.by_key.get(prompt_key(owner, prompt_id))

    def of_job(self, job_id: str) -> ComfyPrompt | None:
        key = self.by_job.get(job_id)
        return self.by_key.get(key) if key else None

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
            prompt = self.by_key.pop(key, None)
            for job_id in prompt.job_ids if prompt else ():
                self.by_job.pop(job_id, None)
            return
        try:
            self._keep(decode(value, ComfyPrompt), revision)
        except DecodeError as exc:
            log.warning("comfy prompt %s unreadable: %s", key, exc)

    def _keep(self, prompt: ComfyPrompt, revision: int) -> None:
        if prompt.key in self.by_key:  # this gateway's own write, come back through the watch
            return
        self._forget_expired()
        self.by_key[prompt.key] = prompt
        for job_id in prompt.job_ids:
            self.by_job[job_id] = prompt.key
        for queue in self.clients.get(prompt.client_id or "", ()):
            queue.put_nowait(prompt)

    def _forget_expired(self) -> None:
        """Drops the prompts the bucket no longer holds (its TTL removes them without a word to watchers)."""
        since = time.time() - self.ttl_s
        while self.by_key:
            oldest = next(iter(self.by_key.values()))
            if oldest.submitted_at >= since:
                return
            self._on_entry(oldest.key, None, 0)
