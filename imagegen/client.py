"""The Python client: generate images through a gateway (HTTP and WebSocket) or straight over NATS.

    async with AsyncClient(url="http://127.0.0.1:4030") as client:
        image = await client.generate("a lighthouse at dusk", width=1024, height=1024)

    with Client(nats="nats://127.0.0.1:4222") as client:
        job_id = client.submit("a fox", steps=20)
        client.wait(job_id, on_progress=print)
        client.image(job_id).save("fox.png")
        foxes = client.generate("a fox in snow", init_image="fox.png", strength=0.6, n=3)  # three images

`init_image` (image-to-image) and `mask_image` (inpainting: white is redrawn) take a PIL image, bytes,
a file path or a base64 / data URL text. `n` images come as n jobs with seeds seed, seed+1, ...:
`submit_many` returns their ids, `wait_all` waits for them, and `generate(..., n=k)` returns a list.

`AsyncClient` speaks to one of the two: `url=` a gateway (sending `Authorization: Bearer KEY` when
`api_key=` is given; progress over the WebSocket `/v1/jobs/{id}/ws`, falling back to polling), or
`nats=` a NATS server (the job message on the tier's subject, events from `imagegen.events.<id>`,
status from KV `imagegen-jobs`, the image from object store `imagegen-images`). `Client` is the same
API, synchronous: it runs an AsyncClient on a private event loop in a thread, and calls `on_progress`
on that thread.

A job that ends other than done raises `JobFailed` (or `JobCancelled`) with the reason; anything the
gateway or NATS refuses raises `ImagegenError` with its message (`imagegen.client_errors`). The two ways
to the jobs are `imagegen.client_http` and `imagegen.client_nats`.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Coroutine, TypeVar

from PIL import Image

from imagegen.client_errors import ImagegenError, JobCancelled, JobFailed, JobTimeout, job_failed
from imagegen.client_http import HttpTransport
from imagegen.client_images import open_image, upload_text
from imagegen.client_nats import NatsTransport
from schemas.events import FINAL_EVENTS
from schemas.request import DEFAULT_LIMITS, Limits
from schemas.status import JobState

__all__ = ["AsyncClient", "Client", "ImagegenError", "JobCancelled", "JobFailed", "JobTimeout", "Progress", "ProgressCallback"]

T = TypeVar("T")


@dataclass(frozen=True)
class Progress:
    """What `on_progress` receives: `queued` (with position), `started`, then `progress` for each step."""

    job_id: str
    type: str
    step: int = 0
    total: int = 0
    eta_s: float | None = None
    position: int | None = None


ProgressCallback = Callable[[Progress], "Awaitable[None] | None"]


def request_body(prompt: str, **fields: Any) -> dict[str, Any]:
    return {"prompt": prompt, **{name: value for name, value in fields.items() if value is not None}}


class AsyncClient:
    """Submit, follow, fetch and cancel jobs through a gateway (`url=`) or over NATS (`nats=`)."""

    def __init__(
        self,
        url: str | None = None,
        *,
        api_key: str | None = None,
        nats: str | None = None,
        poll_s: float = 1.0,
        request_timeout_s: float = 30.0,
        websocket: bool = True,
        limits: Limits = DEFAULT_LIMITS,
    ):
        if (url is None) == (nats is None):
            raise ValueError("give either url= (a gateway) or nats= (a NATS server), not both or neither")
        if nats is not None:
            self.transport: HttpTransport | NatsTransport = NatsTransport(
                nats, poll_s=poll_s, limits=limits, request_timeout_s=request_timeout_s
            )
        else:
            self.transport = HttpTransport(
                url, api_key=api_key, poll_s=poll_s, request_timeout_s=request_timeout_s, websocket=websocket
            )

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *_exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.transport.close()

    async def submit(self, prompt: str, **fields: Any) -> str:
        """Queues one image and returns its job id. `fields` are the request's fields: width, height,
        steps, seed, negative_prompt, format, tier, guidance, scheduler, loras, use_refiner, model,
        timeout_s, ...; `init_image` makes it image-to-image (changed by `strength`, 0.4 unless given),
        `mask_image` too inpainting, both as a PIL image, bytes, a file path or base64 text. For several
        images, `submit_many`."""
        if fields.pop("n", None) not in (None, 1):
            raise ValueError("submit queues one image; use submit_many(prompt, n=...) for several")
        (job_id,) = await self.submit_many(prompt, n=1, **fields)
        return job_id

    async def submit_many(
        self,
        prompt: str,
        *,
        n: int,
        seed: int | str | None = None,
        init_image: Any = None,
        mask_image: Any = None,
        **fields: Any,
    ) -> list[str]:
        """Queues n images of one request, seeds seed, seed+1, ... (a random first seed when none is
        given), and returns their job ids in seed order. Takes submit's arguments."""
        body = request_body(
            prompt, n=n, seed=seed, init_image=upload_text("init_image", init_image),
            mask_image=upload_text("mask_image", mask_image), **fields,
        )
        return await self.transport.submit(body)

    async def status(self, job_id: str) -> dict[str, Any]:
        """The job's status record: state, step, total_steps, seed, error, request, ... (through a
        gateway also position and eta_s)."""
        return await self.transport.status(job_id)

    async def wait(self, job_id: str, on_progress: ProgressCallback | None = None, *, timeout: float | None = None) -> dict[str, Any]:
        """Follows the job until it ends and returns its final status; raises JobFailed (JobCancelled)
        when it ends without an image, JobTimeout after `timeout` seconds."""
        try:
            final = await asyncio.wait_for(self._follow(job_id, on_progress), timeout)
        except asyncio.TimeoutError:
            raise JobTimeout(f"job {job_id} did not finish within {timeout:g}s") from None
        if final["type"] != JobState.DONE.value:
            raise job_failed(job_id, final["type"], final.get("reason"))
        return await self.status(job_id)

    async def wait_all(
        self, job_ids: list[str], on_progress: ProgressCallback | None = None, *, timeout: float | None = None
    ) -> list[dict[str, Any]]:
        """Follows every job until all have ended and returns their final statuses in order; raises
        JobFailed for the first that ends without an image, JobTimeout after `timeout` seconds in all."""
        waits = [asyncio.ensure_future(self.wait(job_id, on_progress)) for job_id in job_ids]
        try:
            async with asyncio.timeout(timeout):
                return list(await asyncio.gather(*waits))
        except TimeoutError:
            raise JobTimeout(f"jobs {', '.join(job_ids)} did not all finish within {timeout:g}s") from None
        finally:
            for wait in waits:
                wait.cancel()
            await asyncio.gather(*waits, return_exceptions=True)

    async def _follow(self, job_id: str, on_progress: ProgressCallback | None) -> dict[str, Any]:
        last_step = 0
        async with aclosing(self.transport.events(job_id)) as events:
            async for event in events:
                kind = event.get("type")
                if kind in FINAL_EVENTS:
                    return event
                if on_progress is None or kind not in ("queued", "started", "progress"):
                    continue
                step = event.get("step") or 0
                if kind == "progress":
                    if step <= last_step:  # a replay after a reconnect: already reported
                        continue
                    last_step = step
                result = on_progress(
                    Progress(job_id=job_id, type=kind, step=step, total=event.get("total") or 0,
                             eta_s=event.get("eta_s"), position=event.get("position"))
                )
                if inspect.isawaitable(result):
                    await result
        raise ImagegenError(f"the events of job {job_id} ended before its final state")

    async def image_bytes(self, job_id: str) -> bytes:
        """The finished image as stored (PNG, JPEG or WEBP bytes, as the request asked)."""
        return await self.transport.image_bytes(job_id)

    async def image(self, job_id: str) -> Image.Image:
        return open_image(await self.image_bytes(job_id))

    async def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancels the job: a queued one at once, a running one at its next step. Returns its status."""
        return await self.transport.cancel(job_id)

    async def generate(
        self,
        prompt: str,
        *,
        n: int | None = None,
        on_progress: ProgressCallback | None = None,
        timeout: float | None = 600.0,
        **fields: Any,
    ) -> Image.Image | list[Image.Image]:
        """Submits, waits and returns the image; with `n`, a list of n images (seeds seed, seed+1, ...).
        `fields` as for `submit`. A timeout (or the caller's cancellation) cancels the jobs; a failed one
        raises JobFailed."""
        job_ids = await self.submit_many(prompt, n=n or 1, **fields)
        try:
            await self.wait_all(job_ids, on_progress, timeout=timeout)
        except (JobFailed, JobTimeout, asyncio.CancelledError):
            for job_id in job_ids:
                try:
                    await asyncio.shield(self.cancel(job_id))
                except ImagegenError:
                    pass
            raise
        images = [await self.image(job_id) for job_id in job_ids]
        return images if n is not None else images[0]


class Client:
    """The synchronous client: AsyncClient's API on a private event loop in a thread."""

    def __init__(self, url: str | None = None, *, api_key: str | None = None, nats: str | None = None, **options: Any):
        self._async = AsyncClient(url, api_key=api_key, nats=nats, **options)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="imagegen-client", daemon=True)
        self._thread.start()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop.is_closed():
            coro.close()
            raise ImagegenError("this client is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except KeyboardInterrupt:
            future.cancel()
            raise

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._run(self._async.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()

    def submit(self, prompt: str, **fields: Any) -> str:
        return self._run(self._async.submit(prompt, **fields))

    def submit_many(self, prompt: str, *, n: int, **fields: Any) -> list[str]:
        return self._run(self._async.submit_many(prompt, n=n, **fields))

    def status(self, job_id: str) -> dict[str, Any]:
        return self._run(self._async.status(job_id))

    def wait(self, job_id: str, on_progress: Callable[[Progress], None] | None = None, *, timeout: float | None = None) -> dict[str, Any]:
        return self._run(self._async.wait(job_id, on_progress, timeout=timeout))

    def wait_all(
        self, job_ids: list[str], on_progress: Callable[[Progress], None] | None = None, *, timeout: float | None = None
    ) -> list[dict[str, Any]]:
        return self._run(self._async.wait_all(job_ids, on_progress, timeout=timeout))

    def image_bytes(self, job_id: str) -> bytes:
        return self._run(self._async.image_bytes(job_id))

    def image(self, job_id: str) -> Image.Image:
        return self._run(self._async.image(job_id))

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._run(self._async.cancel(job_id))

    def generate(
        self,
        prompt: str,
        *,
        n: int | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        timeout: float | None = 600.0,
        **fields: Any,
    ) -> Image.Image | list[Image.Image]:
        return self._run(self._async.generate(prompt, n=n, on_progress=on_progress, timeout=timeout, **fields))
