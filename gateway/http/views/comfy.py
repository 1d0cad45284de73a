"""ComfyUI's server shapes: the `POST /prompt` body, its answer and ComfyUI's error shape."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from schemas.request import JsonBool


class ComfyPromptRequest(BaseModel):
    """ComfyUI's `POST /prompt` body."""

    prompt: dict[str, Any] = Field(description="The node graph in ComfyUI's API format: {node_id: {class_type, inputs}}.")
    client_id: str | None = Field(None, description="The clientId of the /ws that follows the run.")
    prompt_id: str | None = Field(None, description="An id of the caller's own (1-64 letters, digits, '-', '_'); sent again, it queues nothing more.")
    extra_data: dict[str, Any] | None = Field(None, description="Kept with the prompt and given back in /history and /queue.")
    front: JsonBool | None = Field(None, description="Only false: the order of the queue is the tiers' (an API key's tier).")


class ComfyPromptQueued(BaseModel):
    prompt_id: str
    number: int = Field(description="Milliseconds since the epoch when it was queued.")
    node_errors: dict[str, Any]


class ComfyError(BaseModel):
    """An error in ComfyUI's shape: {type, message, details, extra_info}, and the problems of each node."""

    error: dict[str, Any]
    node_errors: dict[str, Any] | list[Any]
