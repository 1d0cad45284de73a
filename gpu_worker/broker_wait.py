"""A worker's pause after a job failed on JetStream: it pulls nothing until the streams a job needs
answer again."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from schemas import names

if TYPE_CHECKING:
    from gpu_worker.worker import Worker

log = logging.getLogger("imagegen.worker")


async def wait_for_broker(worker: Worker, *, longest_wait_s: float = 0.5, ask_timeout_s: float = 0.5) -> None:
    """Waits until the status and image streams answer (with a leader), or the worker stops: else every
    queued job would be taken and fail in turn, using up its tries during an outage. Asked with short
    timeouts and waits, so that the worker takes jobs again within about a second of a cluster electing
    their leaders (a STREAM.INFO each half second costs the broker little)."""
    wait_s = 0.25
    js = worker.nc.jetstream(timeout=ask_timeout_s)
    while not worker.stopping.is_set():
        try:
            for stream in (f"KV_{names.STATUS_BUCKET}", f"OBJ_{names.IMAGES_BUCKET}"):
                info = await js.stream_info(stream)
                if info.cluster is not None and not info.cluster.leader:
                    raise ConnectionError(f"stream {stream} has no leader")
        except Exception as exc:
            log.warning("worker %s waits for the broker (%s: %s)", worker.worker_id, type(exc).__name__, exc)
            try:
                await asyncio.wait_for(worker.stopping.wait(), wait_s)
            except asyncio.TimeoutError:
                pass
            wait_s = min(longest_wait_s, wait_s * 2)
            continue
        worker.broker_trouble = False
        log.info("worker %s: the broker answers again; taking jobs", worker.worker_id)
        return
