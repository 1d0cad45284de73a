"""Gateway settings: keyword-only, each field with its flag and IMAGEGEN_* variable (schemas.settings_fields)."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.http.proxies import parse_trusted
from schemas.jetstream import Topology
from schemas.request import Limits
from schemas.settings_fields import at_least_one, comma_list, nats_url_setting, nested, setting
from schemas.uploads import max_text_chars


def proxy_list(text: str) -> tuple[str, ...]:
    entries = comma_list(text)
    try:
        parse_trusted(entries)
    except ValueError as exc:
        raise ValueError(str(exc).removeprefix("--trust-proxy: ")) from None
    return entries


@dataclass(frozen=True, kw_only=True)
class GatewaySettings:
    nats_url: str = nats_url_setting()
    host: str = setting("127.0.0.1", group="network", help="address the gateway listens on")
    port: int = setting(4030, group="network", help="gateway port")
    max_body_bytes: int = setting(16 * 1024 * 1024, group="safety", parse=at_least_one, help="largest body of a route that takes images inline (/v1/jobs, /api/generate, img2img, uploads); at least what two uploads of --max-upload-bytes need as base64")  # see body_limit_bytes
    max_json_bytes: int = setting(1024 * 1024, group="safety", parse=at_least_one, help="largest body of every other route")
    max_json_items: int = setting(10_000, group="safety", parse=at_least_one, help="most keys and items in a JSON body, counted as its ',' and ':' while it arrives")
    body_timeout_s: float = setting(60.0, group="safety", help="seconds a request body may take to arrive; 408 after")
    header_timeout_s: float = setting(15.0, group="safety", help="seconds a request's headers may take to arrive (from the connection's start, or the last answer on it; also how long an idle keep-alive connection stays); the connection is closed after")
    max_connections: int = setting(2048, group="safety", parse=at_least_one, help="open connections per gateway (HTTP, WebSocket); one more is answered 503 with Retry-After")
    nats_timeout_s: float = 5.0  # a JetStream call slower than this answers 503
    submit_timeout_s: float = setting(0.6, group="operations", help="seconds a submit waits for the broker to take its job; unanswered (a cluster electing a leader): 503 with Retry-After, and submits are refused at once until the job stream has a leader")
    cors_origins: str = "*"
    limits: Limits = nested(Limits)
    topology: Topology = nested(Topology)
    api_keys_file: str | None = setting(None, flag="--api-keys", env="API_KEYS_FILE", group="safety", help="JSON file of API keys (hashes); auth is on when any key is configured; IMAGEGEN_API_KEYS may hold the JSON itself")  # see gateway/http/auth.py
    api_keys: str | None = setting(None, kind="env", env="API_KEYS", group="safety", help="the JSON of --api-keys inline")  # no flag: a secret stays off the command line
    blocklist: tuple[str, ...] = setting((), group="safety", parse=comma_list, help="comma-separated terms; prompts containing one are refused")  # case-insensitive
    redact_prompts: bool = setting(False, kind="switch", group="safety", help="audit records carry a hash instead of the prompt")
    default_timeout_s: float | None = setting(None, group="limits", parse=float, flag_default=0.0, help="seconds a job may wait in the queue when the request sets no timeout_s; 0: forever")
    cache_ttl_s: float = setting(24 * 3600.0, group="operations", help="seconds an image answers identical requests (with a seed, or cache: true) from the result cache; 0: no cache")
    webhook_secret: str | None = setting(None, group="operations", help="signs webhook calls (Standard Webhooks: whsec_ and base64, or any text); the same on every gateway")
    webhook_allow_private: bool = setting(False, kind="switch", group="safety", help="webhooks may go to loopback, private and link-local addresses, for a closed network")
    webhook_retry_s: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)  # waits between a call's tries
    trust_proxy: tuple[str, ...] = setting((), group="network", parse=proxy_list, metavar="ADDR[,ADDR]", help="addresses or networks (10.0.0.0/8) of the reverse proxies in front; only from them are X-Forwarded-Proto and X-Forwarded-Host believed (the scheme and host of image URLs); * for any peer; default none")
    comfy_previews: bool = setting(False, kind="switch", group="operations", help="ComfyUI's /ws sends live previews as binary frames for every prompt, as ComfyUI does with a preview method on; without it only for prompts whose extra_data asks (preview_method auto, latent2rgb or taesd), as ComfyUI's default (none) does")
    cache_scope: str = setting("key", group="safety", choices=("key", "global"), help="with API keys: key keeps each key's result-cache entries to itself; global shares them between keys")
    access_log: bool = setting(False, kind="switch", group="operations", help="log a line per HTTP request: method, path, status, bytes, milliseconds")
    audit_log: bool = setting(False, kind="switch", group="operations", help="also log each audit record (a JSON line per submission, with the prompt unless --redact-prompts); the records go to NATS subject imagegen.audit either way")
    upload_bytes_per_key: int = setting(128 << 20, group="limits", help="bytes of uploaded images (ComfyUI's /upload/image) each API key may keep at once; past it 413")

    def __post_init__(self) -> None:
        parse_trusted(self.trust_proxy)  # a ValueError naming an entry that is no address or network

    @property
    def body_limit_bytes(self) -> int:
        """The largest request body taken: max_body_bytes, or more when an init image and a mask of
        max_upload_bytes each, as base64, need it, with 1 MiB for the rest of the request."""
        return max(self.max_body_bytes, 2 * max_text_chars(self.limits) + 1024 * 1024)
