"""The event loop a gateway or worker process runs on.

`auto` (the default) takes uvloop where it is installed (it is a dependency on Linux and macOS): the
same asyncio programs, with the loop, its sockets and its timers in C. One job at a time through the
whole path it took 6-7 % less CPU per job in the gateway and in the worker, and the p50 was lower in
every round (bench/event_loops.py).
`asyncio` runs on the standard library's loop; `uvloop` insists on uvloop.
"""

from __future__ import annotations

import asyncio
import importlib.util
from typing import Any, Coroutine, TypeVar

CHOICES = ("auto", "uvloop", "asyncio")

T = TypeVar("T")


class EventLoopUnavailable(RuntimeError):
    pass


def has_uvloop() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def resolve(choice: str) -> str:
    """The loop `choice` runs on: `uvloop` or `asyncio`. Raises EventLoopUnavailable for uvloop where it
    is not installed, ValueError for a name that is none of CHOICES."""
    if choice not in CHOICES:
        raise ValueError(f"{choice!r} is none of {', '.join(CHOICES)}")
    if choice == "auto":
        return "uvloop" if has_uvloop() else "asyncio"
    if choice == "uvloop" and not has_uvloop():
        raise EventLoopUnavailable("uvloop is not installed here (pip install uvloop), or ask for asyncio")
    return choice


def run(main: Coroutine[Any, Any, T], *, loop: str = "auto") -> T:
    """asyncio.run on the loop `loop` names (see `resolve`)."""
    if resolve(loop) == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


def running() -> str:
    """The loop the calling coroutine runs on: `uvloop` or `asyncio`."""
    return "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"
