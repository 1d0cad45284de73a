"""The protocol-neutral job service: submit with admission and idempotency, wait to the end, cancel, images,
the caller, and the neutral exceptions every API renders."""
