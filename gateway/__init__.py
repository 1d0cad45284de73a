"""The aiohttp gateway: validates, publishes to JetStream, and serves status, events and images."""
