"""AUTOMATIC1111's LoRA tags in a prompt: `<lora:NAME>` or `<lora:NAME:WEIGHT>` (also written `<lyco:...>`).

A1111 takes them out of the prompt and applies the adapters; here they become the request's `loras`
({name: weight}, weight 1 when none is given) and the prompt goes to the model without them. What
this service cannot do is refused by name, never passed to the model as words: hypernetworks
(`<hypernet:...>`), separate text-encoder and UNet weights (`<lora:NAME:0.8:0.5>`, `te=`, `unet=`,
`dyn=`) and an adapter named twice. An adapter no worker of the model loaded is refused where every
request's adapters are checked (`JobService.submit`).
"""

from __future__ import annotations

import re

EXTRA_NETWORK = re.compile(r"<(lora|lyco|hypernet):([^<>]*)>", re.IGNORECASE)


class TagProblem(ValueError):
    """A tag this service cannot apply; the message names it."""


def loras_of(prompt: str) -> tuple[str, dict[str, float]]:
    """(the prompt without its LoRA tags, {adapter: weight}). Raises TagProblem."""
    loras: dict[str, float] = {}
    for match in EXTRA_NETWORK.finditer(prompt):
        tag, kind, args = match[0], match[1].lower(), match[2].split(":")
        if kind == "hypernet":
            raise TagProblem(f"{tag}: hypernetworks are not offered here; LoRAs are (GET /sdapi/v1/loras)")
        name, weights = args[0].strip(), [a.strip() for a in args[1:]]
        if not name:
            raise TagProblem(f"{tag}: names no adapter; write <lora:NAME:WEIGHT>")
        if any("=" in w for w in weights):
            raise TagProblem(f"{tag}: named settings (te=, unet=, dyn=) are not offered here; give one weight")
        try:
            values = [float(w) for w in weights]
        except ValueError:
            raise TagProblem(f"{tag}: the weight must be a number") from None
        if len(values) > 2 or len(set(values)) > 1:
            raise TagProblem(f"{tag}: separate text-encoder and UNet weights are not offered here; give one weight")
        if name in loras:
            raise TagProblem(f"{tag}: the adapter {name!r} is named twice")
        loras[name] = values[0] if values else 1.0
    return EXTRA_NETWORK.sub("", prompt).strip(), loras

