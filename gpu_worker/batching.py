"""Jobs taken together run as one engine call (`--max-batch`).

The worker takes a job, then up to `max_batch - 1` more from the same lane while each can share its
pipeline call (the engine's `batch_key`: same size, steps, sampler, refiner, LoRAs; a request's n
images always can). Every job taken is handled as usual (status, events, storing, ack), side by side;
where a job reaches the engine it joins the `Gathering` instead, which runs once every job taken has
joined or ended on its own (already done, cancelled, failed): each group of equal keys as one call,
the others alone, all on the engine's thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Entry:
    job: Any  # the worker's RunningJob
    task: Any  # its GenerationTask
    fmt: str
    quality: int
    key: tuple | None  # the engine's batch key; None: it runs alone
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Gathering:
    """The jobs taken together, until each has joined (reached the engine) or left (ended before)."""

    def __init__(self, job_ids: list[str], launch: Callable[[list[list[Entry]]], None]):
        self.waiting = set(job_ids)
        self.entries: list[Entry] = []
        self.launch = launch
        self.launched = False

    def expects(self, job_id: str) -> bool:
        return job_id in self.waiting

    def join(self, entry: Entry) -> asyncio.Future:
        self.entries.append(entry)
        self.waiting.discard(entry.job.envelope.job_id)
        self._maybe_launch()
        return entry.future

    def leave(self, job_id: str) -> None:
        self.waiting.discard(job_id)
        self._maybe_launch()

    def _maybe_launch(self) -> None:
        if self.waiting or self.launched:
            return
        self.launched = True
        self.launch(group(self.entries))


def group(entries: list[Entry]) -> list[list[Entry]]:
    """Entries in runs of equal keys, in the order taken; an entry without a key runs alone."""
    runs: dict[Any, list[Entry]] = {}
    for i, entry in enumerate(entries):
        runs.setdefault(entry.key if entry.key is not None else ("alone", i), []).append(entry)
    return list(runs.values())


def settle(future: asyncio.Future, outcome: Any) -> None:
    """Gives the job its result (or exception), unless it already has one (a cancel mid-batch)."""
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
