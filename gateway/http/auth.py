"""API keys: who is calling, which tiers they may use, how fast and how much at once.

Keys come from a file (`--api-keys FILE`: a JSON list, or one JSON entry per line) or
`IMAGEGEN_API_KEYS` (the same text), stored only as
SHA-256 hashes. With no keys configured auth is off (the default of `imagegen up`); with any key, every
API call needs `Authorization: Bearer KEY` or `X-API-Key: KEY` (or HTTP Basic with the key as the password,
as AUTOMATIC1111's clients send credentials), and a key sees only its own jobs.
Browsers cannot set headers on a WebSocket: a socket opened without one sends `{"key": KEY}` as its
first message instead (`socket_key`), so the key never appears in a URL or an access log. Such a
socket has SOCKET_KEY_WAIT_S to send it, and at most MAX_PENDING_SOCKETS of them wait at once per
gateway: more are answered 503 before the upgrade, so sockets that never authenticate cost little.

    [{"name": "marketing", "sha256": "<hex>", "tiers": ["normal", "low"],
      "rate_per_minute": 60, "max_concurrent": 4}]

`imagegen key NAME` makes a new key and prints its entry.
"""

from __future__ import annotations

import base64
import binascii

import asyncio
import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import WSMsgType, web

from schemas.names import Tier

PUBLIC_PATHS = ("/healthz", "/swagger", "/openapi.json", "/static/", "/metrics")
SOCKET_PATHS = re.compile(r"^/v1/(ws|jobs/[^/]+/ws)$")  # WebSockets that take the key as their first message
SOCKET_KEY_WAIT_S = 3.0  # read per socket: tests lower it
MAX_PENDING_SOCKETS = 256  # sockets waiting for their first-message key at once (read per request: tests lower it)


def request_key(name: str, kind: type):
    """A typed key for a request's storage where aiohttp has them (3.14 on), else the plain name."""
    make = getattr(web, "RequestKey", None)
    return make(name, kind) if make is not None else name


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, kw_only=True)
class ApiKey:
    name: str
    sha256: str
    tiers: tuple[Tier, ...] = (Tier.NORMAL, Tier.LOW)
    rate_per_minute: int = 60
    max_concurrent: int = 8


@dataclass(frozen=True, kw_only=True)
class KeyRing:
    keys: dict[str, ApiKey] = field(default_factory=dict)  # by hash

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def find(self, presented: str) -> ApiKey | None:
        digest = hash_key(presented)
        for known, key in self.keys.items():
            if hmac.compare_digest(known, digest):
                return key
        return None

    @classmethod
    def from_json(cls, text: str) -> "KeyRing":
        stripped = text.strip()
        if stripped.startswith("["):
            entries = json.loads(stripped)
        else:  # JSON lines: one entry per line, as `imagegen key` prints them
            entries = [json.loads(line) for line in stripped.splitlines() if line.strip()]
        keys = {}
        for entry in entries:
            try:
                key = ApiKey(
                    name=entry["name"],
                    sha256=entry["sha256"].lower(),
                    tiers=tuple(Tier(t) for t in entry.get("tiers", ["normal", "low"])),
                    rate_per_minute=int(entry.get("rate_per_minute", 60)),
                    max_concurrent=int(entry.get("max_concurrent", 8)),
                )
            except (KeyError, ValueError, TypeError) as exc:
                raise ValueError(f"API keys: bad entry {entry!r}: {exc}") from None
            if len(key.sha256) != 64:
                raise ValueError(f"API keys: {key.name}: sha256 must be 64 hex digits")
            keys[key.sha256] = key
        return cls(keys=keys)

    @classmethod
    def load(cls, *, path: str | None, inline: str | None) -> "KeyRing":
        if path:
            return cls.from_json(Path(path).read_text())
        if inline:
            return cls.from_json(inline)
        return cls()


def new_key_entry(name: str, *, tiers: list[str], rate_per_minute: int, max_concurrent: int) -> tuple[str, dict]:
    key = "ig_" + secrets.token_urlsafe(24)
    entry = {
        "name": name,
        "sha256": hash_key(key),
        "tiers": tiers,
        "rate_per_minute": rate_per_minute,
        "max_concurrent": max_concurrent,
    }
    return key, entry


def presented_key(request: web.Request) -> str | None:
    """The key a request presents: `Authorization: Bearer KEY`, `X-API-Key: KEY`, or HTTP Basic credentials
    with the key as the password (any user name; the key as the user name with no password works too),
    as AUTOMATIC1111's clients send their `--api-auth`."""
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    if header.lower().startswith("basic "):
        try:
            user, _, password = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return (password or user).strip() or None
    return request.headers.get("X-API-Key") or None


@dataclass(kw_only=True)
class SocketGate:
    """The sockets of one gateway still waiting for their first-message key."""

    ring: KeyRing
    waiting: set[int] = field(default_factory=set)  # ids of their requests

    def admit(self, request: web.Request) -> bool:
        if len(self.waiting) >= MAX_PENDING_SOCKETS:
            return False
        self.waiting.add(id(request))
        request[SOCKET_GATE] = self
        return True

    def release(self, request: web.Request) -> None:
        self.waiting.discard(id(request))


OWNER = request_key("owner", str)  # the caller's key name, set on every request that presented a key
API_KEY = request_key("api_key", ApiKey)
SOCKET_GATE = request_key("socket_gate", SocketGate)  # set on a socket request whose key is still to come


def set_caller(request: web.Request, key: ApiKey) -> None:
    request[OWNER] = key.name
    request[API_KEY] = key


def auth_middleware(ring: KeyRing):
    gate = SocketGate(ring=ring)

    @web.middleware
    async def authenticate(request: web.Request, handler):
        if not ring.enabled or request.method == "OPTIONS" or request.path == "/" or request.path.startswith(PUBLIC_PATHS):
            return await handler(request)
        presented = presented_key(request)
        if not presented and is_socket_upgrade(request):
            if not gate.admit(request):
                return web.json_response(
                    {"error": f"{MAX_PENDING_SOCKETS} sockets are waiting for their API key already: "
                              "send Authorization: Bearer KEY, or try again shortly"},
                    status=503,
                    headers={"Retry-After": str(int(SOCKET_KEY_WAIT_S))},
                )
            try:  # the handler reads the key from the first message
                return await handler(request)
            finally:
                gate.release(request)
        if not presented:
            return web.json_response(
                {"error": "an API key is required: send Authorization: Bearer KEY or X-API-Key: KEY"},
                status=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        key = ring.find(presented)
        if key is None:
            return web.json_response({"error": "unknown API key"}, status=401, headers={"WWW-Authenticate": "Bearer"})
        set_caller(request, key)
        return await handler(request)

    return authenticate


def is_socket_upgrade(request: web.Request) -> bool:
    return (
        request.method == "GET"
        and request.headers.get("Upgrade", "").lower() == "websocket"
        and SOCKET_PATHS.match(request.path) is not None
    )


async def socket_key(request: web.Request, ws: web.WebSocketResponse) -> bool:
    """For a socket opened without a key header: reads `{"key": KEY}` as the first message and sets the
    caller, as the middleware does for other requests. True when the caller may go on (or no key is due);
    otherwise sends an error event, closes the socket (1008) and returns False."""
    gate: SocketGate | None = request.get(SOCKET_GATE)
    if gate is None:
        return True
    try:
        message = await ws.receive(timeout=SOCKET_KEY_WAIT_S)
    except asyncio.TimeoutError:
        message = None
    finally:
        gate.release(request)
    ring = gate.ring
    if message is not None and message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
        return False
    presented = None
    if message is not None and message.type is WSMsgType.TEXT:
        try:
            body = json.loads(message.data)
        except json.JSONDecodeError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("key"), str):
            presented = body["key"]
    key = ring.find(presented) if presented else None
    if key is None:
        error = "unknown API key" if presented else (
            'an API key is required: send {"key": KEY} as the first message, or Authorization: Bearer KEY'
        )
        await ws.send_json({"type": "error", "error": error})
        await ws.close(code=1008, message=b"unauthorized")
        return False
    set_caller(request, key)
    return True
