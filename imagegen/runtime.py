"""Starting and stopping the parts: a gateway, a worker, or all of them (`imagegen up`).

SIGTERM or SIGINT drains: the gateway stops accepting and finishes requests in flight; the worker
finishes the job in hand, stops pulling, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from imagegen import event_loop

if TYPE_CHECKING:  # each part is imported where it starts: `imagegen worker` loads no gateway module, and back
    from gateway.settings import GatewaySettings
    from gpu_worker.settings import WorkerSettings
    from gpu_worker.thermal import TemperatureSensor
    from gpu_worker.worker import Worker

log = logging.getLogger("imagegen")
BACKLOG = 1024  # connections the kernel queues before accept(): a burst past it is reset, not answered 503
LINGER_S = 2.0  # after answering a body refused unread (413, 408), how long its rest is read and dropped


@dataclass
class RunningGateway:
    runner: Any  # aiohttp's web.AppRunner
    port: int

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_gateway(settings: GatewaySettings) -> RunningGateway:
    from aiohttp import web

    from gateway.app import AccessLog, create_app
    from gateway.http.connections import CappedSite, make_room
    from gateway.http.http_errors import ServerLog

    app = create_app(settings)
    runner = web.AppRunner(
        app, handle_signals=False, shutdown_timeout=30, access_log_class=AccessLog, logger=ServerLog(),
        access_log=logging.getLogger("aiohttp.access") if settings.access_log else None,
        auto_decompress=False,  # the body middleware inflates, in bounded steps up to the route's cap
        lingering_time=LINGER_S,
        keepalive_timeout=settings.header_timeout_s,  # from the connection's start and after each answer
    )
    await runner.setup()
    make_room(settings.max_connections)
    site = CappedSite(runner, settings.host, settings.port, max_connections=settings.max_connections, backlog=BACKLOG)
    await site.start()
    port = site.port
    return RunningGateway(runner=runner, port=port)


async def start_worker(
    settings: WorkerSettings, *, warm_up: bool = True, sensor: TemperatureSensor | None = None
) -> tuple[Worker, asyncio.Task]:
    """Loads the engine, warms it up and starts serving; `sensor` replaces NVML for the temperature guard."""
    from gpu_worker.engines.load import load_engine
    from gpu_worker.worker import Worker

    engine = await asyncio.get_running_loop().run_in_executor(None, load_engine, settings)
    worker = Worker(settings, engine, sensor=sensor)
    if warm_up:
        await worker.warm_up()
    await worker.start()
    return worker, asyncio.create_task(worker.run())


def _stop_signal() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _start_parts(stack: AsyncExitStack, *, gateway: GatewaySettings | None, worker: WorkerSettings | None):
    worker_obj = worker_task = None
    if worker is not None:
        worker_obj, worker_task = await start_worker(worker)
        stack.push_async_callback(worker_obj.close)
    running = None
    if gateway is not None:
        running = await start_gateway(gateway)
        stack.push_async_callback(running.stop)
        log.info("gateway listening on http://%s:%d", gateway.host, running.port)
    return worker_obj, worker_task, running


async def serve(*, gateway: GatewaySettings | None, worker: WorkerSettings | None, on_ready=None) -> None:
    stop = _stop_signal()
    log.info("event loop: %s", event_loop.running())
    async with AsyncExitStack() as stack:
        starting = asyncio.ensure_future(_start_parts(stack, gateway=gateway, worker=worker))
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # a signal while still connecting or loading: stop at once
            log.info("stopping before start-up finished")
            starting.cancel()
            with suppress(asyncio.CancelledError):
                await starting
            return
        stopping.cancel()
        worker_obj, worker_task, running = starting.result()
        if on_ready is not None:
            on_ready(running)
        waiters = [asyncio.ensure_future(stop.wait())]
        if worker_task is not None:
            waiters.append(worker_task)
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        log.info("stopping: draining")
        if worker_obj is not None:
            worker_obj.stop()
            await worker_task
