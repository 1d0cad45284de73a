"""imagegen: SDXL image generation over NATS JetStream. The CLI and the client live here."""

from schemas.version import __version__

__all__ = ["__version__"]
