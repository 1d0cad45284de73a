"""HTTP plumbing shared by every API: keys, rate limits, content negotiation, bodies and forms, connections,
proxies, the error middleware, OpenAPI, metrics and webhooks."""
