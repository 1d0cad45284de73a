"""The client's way to a gateway: its native API (/v1/jobs), progress over the job's WebSocket, and
polling its status when the WebSocket cannot be had."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator
from urllib.parse import quote

import aiohttp
import yarl

from imagegen.client_errors import ImagegenError
from schemas.events import FINAL_EVENTS
from schemas.status import JobState


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
                        if event.get("type") in FINAL_EVENTS:
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
            if state in FINAL_EVENTS:
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
