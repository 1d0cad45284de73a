"""LoRA adapters: loaded once at start-up under a name, then selected and weighted per request.

An adapter is given as `NAME=SOURCE`, where SOURCE is a local folder, a local `.safetensors` file, or a hub
id (`owner/repo`, or `owner/repo:weights.safetensors` to pick one file of several). Adapters go on the
SDXL base (its UNet and, when the file has them, its text encoders); the refiner has another architecture
and runs without them. A request that names no adapter, or gives every named one the weight 0, runs the
plain base model.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpu_worker.errors import JobFailed

log = logging.getLogger("imagegen.worker.lora")

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def parse_lora_specs(specs: Iterable[str]) -> dict[str, str]:
    """{name: source} from `NAME=SOURCE` strings; raises ValueError naming the bad one."""
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, source = spec.partition("=")
        name, source = name.strip(), source.strip()
        if not sep or not name or not source:
            raise ValueError(f"--lora {spec!r}: expected NAME=FOLDER, NAME=FILE.safetensors or NAME=HUB_ID")
        if not ADAPTER_NAME.match(name):
            raise ValueError(f"--lora {spec!r}: the name must be 1-64 letters, digits, '_', '-' or '.'")
        if name in adapters:
            raise ValueError(f"--lora {spec!r}: the name {name!r} is given twice")
        adapters[name] = source
    return adapters


def _load_args(source: str) -> tuple[str, dict[str, Any]]:
    if Path(source).exists():
        return source, {}
    repo, sep, weight_name = source.partition(":")
    return repo, ({"weight_name": weight_name} if sep and weight_name else {})


@dataclass
class LoraSet:
    """The adapters loaded into one pipeline, and which of them the last job used."""

    names: tuple[str, ...] = ()
    _active: tuple[tuple[str, float], ...] | None = field(default=None, repr=False)

    @classmethod
    def load(cls, pipe: Any, adapters: Mapping[str, str]) -> "LoraSet":
        for name, source in adapters.items():
            where, kwargs = _load_args(source)
            try:
                pipe.load_lora_weights(where, adapter_name=name, **kwargs)
            except Exception as exc:
                raise ValueError(f"LoRA {name!r} from {source!r} could not be loaded: {exc}") from exc
            log.info("loaded LoRA %s from %s", name, source)
        lora_set = cls(names=tuple(adapters))
        if lora_set.names:
            lora_set.select(pipe, ())
        return lora_set

    def select(self, pipe: Any, wanted: Iterable[tuple[str, float]]) -> None:
        """Activates exactly the adapters with a non-zero weight; raises JobFailed for a name not loaded here."""
        wanted = tuple(wanted)
        unknown = [name for name, _ in wanted if name not in self.names]
        if unknown:
            have = ", ".join(self.names) if self.names else "none"
            raise JobFailed(f"loras: {', '.join(map(repr, unknown))} not loaded on this worker (it has: {have})")
        active = tuple((name, float(weight)) for name, weight in wanted if weight != 0)
        if not self.names or active == self._active:
            return
        self._active = None
        if active:
            pipe.enable_lora()
            pipe.set_adapters([name for name, _ in active], adapter_weights=[weight for _, weight in active])
        else:
            pipe.disable_lora()
        self._active = active
