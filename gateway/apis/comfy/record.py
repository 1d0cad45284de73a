"""A ComfyUI prompt as the gateways keep it: which jobs it became and which of its nodes did what.

Any gateway may be asked about a prompt another one queued (`/history`, `/queue`, the `/ws` of the
client that sent it), so each prompt is written to the KV bucket `imagegen-comfy-prompts` (key: its
owner's and its prompt id, `prompt_key`; kept as long as job records) and every gateway watches that
bucket. Prompt ids are each key's own: two keys may send the same one and get two prompts.
"""

from __future__ import annotations

import re
import time
from typing import Any

from pydantic import BaseModel, Field

PROMPT_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # ComfyUI's are UUIDs; a client may send its own


def prompt_key(owner: str | None, prompt_id: str) -> str:
    """A prompt's KV key: its owner (the API key's name, hex, or `_` with keys off), then its id."""
    return f"{owner.encode().hex() if owner else '_'}.{prompt_id}"


class ComfyPrompt(BaseModel):
    prompt_id: str
    number: int = Field(description="ComfyUI's queue number: milliseconds since the epoch at submission.")
    client_id: str | None = Field(None, description="The /ws?clientId= that follows it, as the client sent it.")
    owner: str | None = None
    job_ids: list[str] = Field(description="One job per image of the batch, in order.")
    sampler_node: str = Field(description="The KSampler node: progress and errors are its.")
    decode_node: str = Field(description="The VAEDecode node.")
    outputs: dict[str, str] = Field(description="Output node id -> its class (SaveImage, PreviewImage).")
    output_jobs: dict[str, list[str]] = Field(
        default_factory=dict, description="Output node id -> the jobs whose images it shows, where outputs show different "
        "VAEDecodes; empty: every output shows every job's image."
    )
    graph: dict[str, Any] = Field(description="The prompt as sent, for /history and /queue.")
    extra_data: dict[str, Any] = Field(default_factory=dict)
    submitted_at: float = Field(default_factory=time.time)

    def outputs_to_execute(self) -> list[str]:
        return sorted(self.outputs)

    @property
    def key(self) -> str:
        return prompt_key(self.owner, self.prompt_id)

    def queue_entry(self) -> list[Any]:
        """ComfyUI's queue item: [number, prompt_id, prompt, extra_data, outputs_to_execute]."""
        return [self.number, self.prompt_id, self.graph, self.extra_data, self.outputs_to_execute()]


def visible(prompt: ComfyPrompt | None, owner: str | None) -> bool:
    """Whether a caller (`owner`, None with API keys off) may see the prompt."""
    return prompt is not None and (owner is None or prompt.owner == owner)
