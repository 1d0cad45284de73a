"""Shapes of the HTTP responses and requests of the gateway's APIs, one module per API, so the OpenAPI
document and the handlers share one definition. Gateway-only: a service on NATS never sees them (its wire
types are in `schemas`)."""
