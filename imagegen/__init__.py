"""imagegen: SDXL image generation over NATS JetStream. The CLI and the client live here."""

__version__ = "0.1.0"
