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
gateway or NATS refuses raises `ImagegenError` with its message.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import io
import os
import threading
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Coroutine, TypeVar
from urllib.parse import quote

import aiohttp
import yarl
from PIL import Image

from schemas import jobstore, names, uploads
from schemas.enqueue import enqueue
from schemas.follow import follow_events
from schemas.group import plan_group, store_uploads
from schemas.job import JobEnvelope
from schemas.request import DEFAULT_LIMITS, Limits, RequestInvalid, parse_request
from schemas.status import JobState, JobStatus

FINAL = frozenset(state.value for state in JobState if state.final)
FIRST_TRIES = 3  # a NATS address that does not answer three tries, half a second apart, is reported, not waited for
T = TypeVar("T")


class ImagegenError(Exception):
    """The gateway or NATS refused a call; the text says why. `status` is the HTTP status (None over
    NATS or when the gateway is unreachable), `field` the request field at fault when there is one."""

    def __init__(self, message: str, *, status: int | None = None, field: str | None = None):
        super().__init__(message)
        self.status = status
        self.field = field


class JobFailed(ImagegenError):
    """The job ended without an image: failed, cancelled or expired; `reason` says why."""

    def __init__(self, job_id: str, state: str, reason: str | None):
        self.job_id, self.state, self.reason = job_id, state, reason or state
        super().__init__(f"job {job_id} {state}: {self.reason}")


class JobCancelled(JobFailed):
    """The job was cancelled before it finished."""


class JobTimeout(ImagegenError, TimeoutError):
    """The job did not finish within the time the caller gave it."""


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


def job_failed(job_id: str, state: str, reason: str | None) -> JobFailed:
    kind = JobCancelled if state == JobState.CANCELLED.value else JobFailed
    return kind(job_id, state, reason)


def request_body(prompt: str, **fields: Any) -> dict[str, Any]:
    return {"prompt": prompt, **{name: value for name, value in fields.items() if value is not None}}


def invalid(exc: RequestInvalid) -> ImagegenError:
    return ImagegenError(str(exc), status=400, field=exc.errors[0]["field"] if exc.errors else None)


INLINE_TEXT = 1024  # a str this long (or a data: URL) is the image itself, shorter ones name a file


def upload_text(field: str, value: Any) -> str | None:
    """An init or mask image as the request's base64 text: from a PIL image (sent as PNG), bytes, a file
    path, or a base64 / data URL text as it is."""
    if value is None:
        return None
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        value = buffer.getvalue()
    elif isinstance(value, str) and (value.startswith("data:") or len(value) >= INLINE_TEXT):
        return value
    elif isinstance(value, (str, os.PathLike)):
        try:
            with open(value, "rb") as file:
                value = file.read()
        except OSError as exc:
            raise ImagegenError(f"{field}: cannot read {os.fspath(value)!r}: {exc.strerror}", field=field) from None
    if not isinstance(value, (bytes, bytearray)):
        raise ImagegenError(f"{field}: expected a PIL image, bytes, a file path or base64 text", field=field)
    return base64.b64encode(bytes(value)).decode("ascii")


def open_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


# -- transports: the same five calls over HTTP or over NATS ------------------------------------------


def gateway_url(text: str) -> str:
    """A gateway address as given ("127.0.0.1:4030", "http://host:4030/") as the base URL the calls
    are joined to; http:// when no scheme is given. Raises ValueError saying what is wrong."""
    given = text.strip()
    if "://" not in given:
        given = f"http://{given}"
    try:
        url = yarl.URL(given)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a URL ({exc}); expected http://HOST:PORT, e.g. http://127.0.0.1:4030") from None
    if url.scheme not in ("http", "https"):
        raise ValueError(f"{text!r}: expected an http:// or https:// address, e.g. http://127.0.0.1:4030")
    if not url.host:
        raise ValueError(f"{text!r} names no host; expected http://HOST:PORT, e.g. http://127.0.0.1:4030")
    return str(url).rstrip("/")


def unreachable(url: str, exc: aiohttp.ClientConnectionError) -> str:
    """One line for a gateway that cannot be reached, with the likely cause."""
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        why = f"no host named {exc.host!r}"
    elif isinstance(exc, aiohttp.ClientConnectorError) and isinstance(exc.os_error, ConnectionRefusedError):
        why = "nothing listens there"
    elif isinstance(exc, aiohttp.ClientConnectorError):
        why = exc.os_error.strerror or type(exc.os_error).__name__
    elif isinstance(exc, aiohttp.ServerDisconnectedError):
        why = "it closed the connection"
    else:
        why = str(exc) or type(exc).__name__
    return f"cannot reach the gateway at {url}: {why}; is `imagegen up` running, and on that address?"


class HttpTransport:
    """A gateway's native API: /v1/jobs, its WebSocket, and polling when the WebSocket cannot be had."""

    def __init__(self, url: str, *, api_key: str | None, poll_s: float, request_timeout_s: float, websocket: bool):
        self.url = gateway_url(url)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.poll_s = poll_s
        self.timeout = aiohttp.ClientTimeout(total=request_timeout_s)
        self.websocket = websocket
        self.session: aiohttp.ClientSession | None = None

    def _session(self) -> aiohttp.ClientSession:
        if self.session is None or self.session.closed:
            self.session = aiohttp.ClientSession(headers=self.headers)
        return self.session

    def _job_url(self, job_id: str, suffix: str = "") -> str:
        return f"{self.url}/v1/jobs/{quote(job_id, safe='')}{suffix}"

    async def _call(self, method: str, url: str, **kw: Any) -> aiohttp.ClientResponse:
        try:
            response = await self._session().request(method, url, timeout=self.timeout, **kw)
            await response.read()
        except aiohttp.ClientConnectionError as exc:
            raise ImagegenError(unreachable(self.url, exc)) from None
        except asyncio.TimeoutError:
            raise ImagegenError(f"the gateway at {self.url} did not answer in time") from None
        if response.status >= 400:
            try:
                body = await response.json(content_type=None)
            except ValueError:
                body = None
            if isinstance(body, dict) and isinstance(body.get("error"), str):
                raise ImagegenError(body["error"], status=response.status, field=body.get("field"))
            raise ImagegenError(f"HTTP {response.status} {response.reason}", status=response.status)
        return response

    async def _json(self, method: str, url: str, **kw: Any) -> Any:
        response = await self._call(method, url, **kw)
        return await response.json(content_type=None)

    async def submit(self, body: dict[str, Any]) -> list[str]:
        try:
            view = await self._json("POST", f"{self.url}/v1/jobs", json=body)
        except ImagegenError as exc:
            if exc.status == 404:  # every gateway has POST /v1/jobs: this address is not a gateway's root
                raise ImagegenError(
                    f"no imagegen gateway at {self.url} (POST /v1/jobs there: 404 Not Found); give the gateway's "
                    "own address, without /api or /v1, e.g. http://127.0.0.1:4030",
                    status=404,
                ) from None
            raise
        return view.get("job_ids") or [view["job_id"]]

    async def status(self, job_id: str) -> dict[str, Any]:
        return await self._json("GET", self._job_url(job_id))

    async def image_bytes(self, job_id: str) -> bytes:
        return await (await self._call("GET", self._job_url(job_id, "/image"))).read()

    async def cancel(self, job_id: str) -> dict[str, Any]:
        return await self._json("POST", self._job_url(job_id, "/cancel"))

    async def events(self, job_id: str) -> AsyncIterator[dict[str, Any]]:
        """The job's events until the final one: over the WebSocket, or by polling its status when the
        WebSocket cannot be opened or drops."""
        if self.websocket:
            try:
                async with self._session().ws_connect(self._job_url(job_id, "/ws"), heartbeat=20) as ws:
                    async for message in ws:
                        if message.type is not aiohttp.WSMsgType.TEXT:
                            break
                        event = message.json()
                        if event.get("type") == "error":
                            raise ImagegenError(event.get("error", "unknown job"), status=404)
                        yield event
                        if event.get("type") in FINAL:
                            return
            except (aiohttp.WSServerHandshakeError, aiohttp.ClientConnectionError, asyncio.TimeoutError):
                pass
        async for event in self._poll(job_id):
            yield event

    async def _poll(self, job_id: str) -> AsyncIterator[dict[str, Any]]:
        last: tuple = ()
        while True:
            job = await self.status(job_id)
            state = job["state"]
            if state in FINAL:
                yield {"type": state, "job_id": job_id, "reason": job.get("error")}
                return
            seen = (state, job.get("position"), job.get("step"))
            if seen != last:
                if state == JobState.QUEUED.value:
                    yield {"type": "queued", "job_id": job_id, "position": job.get("position"), "eta_s": job.get("eta_s")}
                elif job.get("step"):
                    yield {"type": "progress", "job_id": job_id, "step": job["step"], "total": job["total_steps"], "eta_s": job.get("eta_s")}
                last = seen
            await asyncio.sleep(self.poll_s)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


class NatsTransport:
    """Straight onto JetStream, needing only `schemas`: what a gateway does, without one."""

    def __init__(self, url: str, *, poll_s: float, limits: Limits, request_timeout_s: float):
        self.url = url
        self.poll_s = poll_s
        self.limits = limits
        self.request_timeout_s = request_timeout_s
        self.nc = None
        self._lock = asyncio.Lock()

    async def _connect(self) -> None:
        async with self._lock:
            if self.nc is not None:
                return
            from schemas.connect import connect

            try:
                nc = await connect(
                    self.url, name="imagegen-client", connect_timeout=self.request_timeout_s, first_tries=FIRST_TRIES
                )
            except Exception as exc:  # nats-py raises several unrelated types for "no server"
                raise ImagegenError(f"cannot reach NATS at {self.url}: {exc}") from None
            self.js = nc.jetstream(timeout=self.request_timeout_s)
            try:
                self.kv = await self.js.key_value(names.STATUS_BUCKET)
                self.images = await self.js.object_store(names.IMAGES_BUCKET)
                self.uploads = await self.js.object_store(names.UPLOADS_BUCKET)
            except Exception as exc:
                await nc.close()
                raise ImagegenError(f"no imagegen buckets on NATS at {self.url} (start a gateway or worker first): {exc}") from None
            self.nc = nc

    async def _record(self, job_id: str) -> JobStatus:
        await self._connect()
        status = await jobstore.read_status(self.kv, job_id)
        if status is None:
            raise ImagegenError(f"unknown job {job_id!r}", status=404)
        return status

    async def submit(self, body: dict[str, Any]) -> list[str]:
        """What the gateway does: checks the request and its images, stores the images in object store
        `imagegen-uploads`, and queues one job per image (`schemas.enqueue`), each naming the stored images."""
        try:
            request = parse_request(body, limits=self.limits)
            prepared = await asyncio.to_thread(uploads.prepare, request, self.limits)
        except RequestInvalid as exc:
            raise invalid(exc) from None
        await self._connect()
        plan = plan_group(prepared.request)
        stored = await store_uploads(self.uploads, plan, prepared.uploads, timeout_s=self.request_timeout_s * 6)
        for member in plan.members(prepared.request, stored):
            envelope = JobEnvelope.for_request(member.request, job_id=member.job_id, placement=member.placement)
            await enqueue(self.nc, self.js, self.kv, envelope)
        return plan.job_ids

    async def status(self, job_id: str) -> dict[str, Any]:
        return (await self._record(job_id)).model_dump(mode="json")

    async def image_bytes(self, job_id: str) -> bytes:
        status = await self._record(job_id)
        if status.state is not JobState.DONE or status.image is None:
            raise ImagegenError(f"job {job_id} is {status.state.value}" + (f": {status.error}" if status.error else ""), status=404)
        from nats.js.errors import NotFoundError, ObjectNotFoundError

        try:
            result = await asyncio.wait_for(self.images.get(status.image.name), timeout=self.request_timeout_s * 6)
        except (ObjectNotFoundError, NotFoundError):
            raise ImagegenError(f"the image of job {job_id} is no longer stored", status=404) from None
        return result.data

    async def cancel(self, job_id: str) -> dict[str, Any]:
        await self._connect()
        status, _ = await jobstore.request_cancel(self.nc, self.kv, job_id)
        if status is None:
            raise ImagegenError(f"unknown job {job_id!r}", status=404)
        return status.model_dump(mode="json")

    async def events(self, job_id: str) -> AsyncIterator[dict[str, Any]]:
        """Replays the job's stored events, then live ones (`schemas.follow`)."""
        await self._record(job_id)
        events = follow_events(self.js, job_id, read_status=lambda: self._record(job_id), poll_s=self.poll_s)
        async with aclosing(events):
            async for event in events:
                yield event.model_dump(mode="json", exclude_none=True, exclude={"preview"})

    async def close(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.drain()
        self.nc = None


# -- the client --------------------------------------------------------------------------------------


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
                if kind in FINAL:
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
