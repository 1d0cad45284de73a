"""The NSFW output check: a checker flags generated images, a policy blanks or rejects them.

A checker is anything with `check(images) -> list[bool]` (one flag per image). `--safety-checker`
names one: a folder or hub id holding diffusers' `StableDiffusionSafetyChecker` weights and the CLIP
image processor's settings side by side (as `CompVis/stable-diffusion-safety-checker` does), or a
plug-in `package.module:factory`, called with the worker's settings, returning a checker. With
`--nsfw-action blank` a flagged image is replaced by a black one of its size and the job's status
says `nsfw: true`; with `reject` the job fails, for good, with "output flagged by the safety check".
Without a checker nothing is checked.
"""

from __future__ import annotations

import importlib
import logging
import re
from dataclasses import dataclass
from typing import Any, Protocol

from PIL import Image

from gpu_worker.errors import JobFailed

log = logging.getLogger("imagegen.worker.safety")

ACTIONS = ("blank", "reject")
REJECTED = "output flagged by the safety check"
PLUGIN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class SafetyChecker(Protocol):
    def check(self, images: list[Image.Image]) -> list[bool]:
        """One flag per image: True where the image must not be shown."""
        ...


class DiffusersSafetyChecker:
    """diffusers' StableDiffusionSafetyChecker (a CLIP vision tower and concept embeddings with their
    thresholds) with its CLIP image processor, loaded from one folder or hub id."""

    def __init__(self, source: str, *, device: str = "cpu"):
        import torch
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import AutoImageProcessor

        self.device = device
        self.dtype = torch.float16 if device.startswith("cuda") else torch.float32
        self.processor = AutoImageProcessor.from_pretrained(source)
        model = StableDiffusionSafetyChecker.from_pretrained(source, dtype=self.dtype)
        self.model = model.to(device).eval()

    def check(self, images: list[Image.Image]) -> list[bool]:
        import numpy as np
        import torch

        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt").pixel_values
        with torch.no_grad():
            _, flagged = self.model(
                clip_input=pixels.to(self.device, self.dtype), images=[np.zeros((1,)) for _ in images]
            )
        return [bool(f) for f in flagged]


def load_checker(source: str, *, settings: Any, device: str) -> SafetyChecker:
    """The checker `source` names: `module:factory` (called with the worker's settings), else a folder
    or hub id of StableDiffusionSafetyChecker weights. Raises ValueError saying what is wrong."""
    if PLUGIN.match(source):
        module_name, _, attr = source.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"--safety-checker {source}: {exc}") from None
        checker = factory(settings)
        if not callable(getattr(checker, "check", None)):
            kind = type(checker).__name__
            raise ValueError(f"--safety-checker {source}: the factory returned {kind}, which has no check(images)")
        return checker
    try:
        return DiffusersSafetyChecker(source, device=device)
    except (OSError, ValueError) as exc:  # not found, not a valid hub id, or not a checker's files
        raise ValueError(f"--safety-checker {source}: no safety checker weights there ({exc})") from None


def blank(image: Image.Image) -> Image.Image:
    """A black image of the same size and mode."""
    return Image.new(image.mode, image.size)


@dataclass(frozen=True)
class SafetyStage:
    """Checks each generated image and applies the policy: `blank` or `reject`."""

    checker: SafetyChecker
    action: str = "blank"

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"--nsfw-action must be one of {', '.join(ACTIONS)}, got {self.action!r}")

    def screen(self, image: Image.Image) -> tuple[Image.Image, bool]:
        """The image to store and whether it was flagged; raises JobFailed when a flagged image is rejected."""
        flagged = bool(self.checker.check([image])[0])
        if not flagged:
            return image, False
        if self.action == "reject":
            raise JobFailed(REJECTED)
        return blank(image), True


def load_safety(settings: Any, *, device: str) -> SafetyStage | None:
    """The stage `settings.safety_checker` and `settings.nsfw_action` describe; None without a checker.
    Raises ValueError for a checker that cannot be loaded or an unknown action (SafetyStage checks it)."""
    source = getattr(settings, "safety_checker", None)
    if not source:
        return None
    stage = SafetyStage(load_checker(source, settings=settings, device=device), settings.nsfw_action)
    log.info("safety check on: %s, flagged images are %s", source, "blanked" if stage.action == "blank" else "rejected")
    return stage
