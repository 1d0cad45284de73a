"""Gateway settings: keyword-only, built from flags and IMAGEGEN_* environment variables."""

from __future__ import annotations

from dataclasses import dataclass, field

from schemas.jetstream import Topology
from schemas.request import Limits


@dataclass(frozen=True, kw_only=True)
class GatewaySettings:
    nats_url: str = "nats://127.0.0.1:4222"
    host: str = "127.0.0.1"
    port: int = 4030
    max_body_bytes: int = 16 * 1024 * 1024
    nats_timeout_s: float = 5.0  # a JetStream call slower than this answers 503
    cors_origins: str = "*"
    limits: Limits = field(default_factory=Limits)
    topology: Topology = field(default_factory=Topology)
