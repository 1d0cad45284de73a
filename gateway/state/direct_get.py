"""Every message a stream holds on one subject, in order, from one batched Direct Get request.

One request (`{"next_by_subj": subject, "batch": n}` on `$JS.API.DIRECT.GET.<stream>`) is answered
with the messages, each with its stream sequence in a header, then an end-of-batch status; a longer
history is read in several batches. No consumer is set up, so a read costs the server a fraction of
what an ordered consumer does. Used for a job's stored events and for a finished image's chunks.
Needs a stream with Direct Gets allowed; where they are not (or the broker is away) a read is None.
"""

from __future__ import annotations

import asyncio
import itertools
import json

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from schemas.connect import unsubscribe_quietly

BATCH = 256  # messages per answer
MAX_PAGES = 64


class DirectReader:
    def __init__(self, nc: NATS, *, timeout_s: float = 5.0):
        self.nc = nc
        self.timeout_s = timeout_s
        self.inbox = nc.new_inbox()
        self.replies: dict[str, asyncio.Queue[Msg]] = {}
        self.tokens = itertools.count()
        self.sub: Subscription | None = None

    async def start(self) -> None:
        self.sub = await self.nc.subscribe(self.inbox + ".*", cb=self._on_reply)

    async def close(self) -> None:
        await unsubscribe_quietly(self.sub)
        self.sub = None

    async def _on_reply(self, msg: Msg) -> None:
        queue = self.replies.get(msg.subject[len(self.inbox) + 1:])
        if queue is not None:
            queue.put_nowait(msg)

    async def read(self, stream: str, subject: str, *, batch: int = BATCH) -> list[tuple[int, bytes]] | None:
        """(sequence, data) of every message `stream` holds on `subject`, in order; None when Direct
        Gets are not answered."""
        found: list[tuple[int, bytes]] = []
        start = 0
        for _ in range(MAX_PAGES):
            token = str(next(self.tokens))
            queue = self.replies[token] = asyncio.Queue()
            request = {"seq": start, "next_by_subj": subject, "batch": batch}
            try:
                await self.nc.publish(
                    f"$JS.API.DIRECT.GET.{stream}", json.dumps(request).encode(), reply=f"{self.inbox}.{token}"
                )
                while True:
                    msg = await asyncio.wait_for(queue.get(), self.timeout_s)
                    headers = msg.headers or {}
                    status = headers.get("Status")
                    if status is None and "Nats-Sequence" in headers:
                        found.append((int(headers["Nats-Sequence"]), msg.data))
                    elif status == "404":  # nothing (more) stored on the subject
                        return found
                    elif status == "204":  # end of this batch
                        more = int(headers.get("Nats-Num-Pending", "0") or 0)
                        break
                    else:
                        return None
            except (asyncio.TimeoutError, ValueError):
                return None
            finally:
                self.replies.pop(token, None)
            if not more or not found:
                return found
            start = found[-1][0] + 1
        return found
