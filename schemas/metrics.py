"""What the gateway's and the worker's /metrics share: the histogram buckets, so their timings line
up on one dashboard, and the exposition in the format the scraper asks for (Prometheus text, or
OpenMetrics). Imports prometheus_client and nothing else; nothing else in schemas imports it, so a
service that only publishes jobs does not need it."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

QUEUE_WAIT_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
"""Seconds from submit to a worker starting the job."""
GENERATION_BUCKETS = (0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)
"""Seconds from a worker starting a job to its image being stored."""


def exposition(registry: CollectorRegistry, accept: str) -> tuple[bytes, str]:
    """The registry's samples, encoded as the request's Accept header asks: (body, content type)."""
    encode, content_type = choose_encoder(accept)
    return encode(registry), content_type
