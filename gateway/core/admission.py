"""Admission checks that need the live workers: a plan's ControlNets must be loaded on a worker of its model."""

from __future__ import annotations

from schemas.plan import controlnet_names
from schemas.request import GenerateRequest, RequestInvalid


def check_controlnets(request: GenerateRequest, served: dict[str, list]) -> None:
    """Refuses a plan naming a ControlNet that no live worker of its model loaded (when workers say)."""
    names = controlnet_names(request)
    workers = [w for ws in served.values() for w in ws if request.model in (None, w.model)]
    if not names or not workers or any(w.controlnets is None for w in workers):
        return
    loaded = {name for w in workers for name in w.controlnets}
    if missing := [name for name in names if name not in loaded]:
        field = "stages" if request.stages else "controlnet"
        have = ", ".join(sorted(loaded)) or "none"
        raise RequestInvalid([{"field": field, "message": f"no running worker has the ControlNet {missing[0]!r}; they have: {have}"}])
