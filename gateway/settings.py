"""Gateway settings: keyword-only, built from flags and IMAGEGEN_* environment variables."""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.http.proxies import parse_trusted
from schemas.jetstream import Topology
from schemas.request import Limits
from schemas.uploads import max_text_chars


@dataclass(frozen=True, kw_only=True)
class GatewaySettings:
    nats_url: str = "nats://127.0.0.1:4222"
    host: str = "127.0.0.1"
    port: int = 4030
    max_body_bytes: int = 16 * 1024 * 1024  # a body that may carry images (see body_limit_bytes)
    max_json_bytes: int = 1024 * 1024  # the body of a route that takes no image inline
    max_json_items: int = 10_000  # keys and items of a JSON body, counted as its ',' and ':'
    body_timeout_s: float = 60.0  # a body must arrive within this long (408 after)
    header_timeout_s: float = 15.0  # a request's headers must arrive within this long of the connection opening (or of the last answer on it); also the idle keep-alive
    max_connections: int = 2048  # open connections of this gateway; one more is answered 503 with Retry-After
    nats_timeout_s: float = 5.0  # a JetStream call slower than this answers 503
    submit_timeout_s: float = 0.6  # a submit's record and job unacknowledged this long: 503 (a cluster electing a leader)
    cors_origins: str = "*"
    limits: Limits = field(default_factory=Limits)
    topology: Topology = field(default_factory=Topology)
    api_keys_file: str | None = None  # JSON list of keys (see gateway/http/auth.py); auth is on when any key is set
    api_keys: str | None = None  # the same JSON inline
    blocklist: tuple[str, ...] = ()  # prompts containing any of these (case-insensitive) are refused
    redact_prompts: bool = False  # audit records and logs carry a hash instead of the prompt
    default_timeout_s: float | None = None  # deadline for requests that set no timeout_s
    cache_ttl_s: float = 24 * 3600  # result cache: identical requests within this long get the stored image; 0: off
    webhook_secret: str | None = None  # signs webhook calls (Standard Webhooks); the same on every gateway
    webhook_allow_private: bool = False  # webhooks may go to loopback and private addresses (a closed network)
    webhook_retry_s: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)  # waits between a call's tries
    trust_proxy: tuple[str, ...] = ()  # proxies (addresses, networks, or "*") whose X-Forwarded-Proto/-Host are believed
    comfy_previews: bool = False  # ComfyUI's /ws sends live previews to every prompt, as ComfyUI with a preview method on
    cache_scope: str = "key"  # result cache entries: each API key's own (key), or shared by all keys (global)
    access_log: bool = False  # one log line per HTTP request (a browser's page polls make many)
    audit_log: bool = False  # echo each audit record (JSON, with the prompt unless redacted) to the log too
    upload_bytes_per_key: int = 128 << 20  # bytes of uploaded images (POST /upload/image) each API key may keep

    def __post_init__(self) -> None:
        parse_trusted(self.trust_proxy)  # a ValueError naming an entry that is no address or network

    @property
    def body_limit_bytes(self) -> int:
        """The largest request body taken: max_body_bytes, or more when an init image and a mask of
        max_upload_bytes each, as base64, need it, with 1 MiB for the rest of the request."""
        return max(self.max_body_bytes, 2 * max_text_chars(self.limits) + 1024 * 1024)
