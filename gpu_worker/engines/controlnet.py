"""ControlNets: loaded at start like LoRAs (`--controlnet NAME=SOURCE`), used by plans' sample stages.

A SOURCE is a folder or hub id of an SDXL ControlNet (diffusers' ControlNetModel), or `tiny-controlnet`:
one made from tiny-sdxl's UNet (`ControlNetModel.from_unet`), its zero convolutions given small seeded
weights so that it changes the image (a ControlNet fresh from `from_unet` adds nothing). The pipelines
(StableDiffusionXLControlNetPipeline and its image-to-image variant) are built on first use around the
loaded base's modules; the ControlNet a stage names is set on them before each call. The control image
goes in as sent or, with the `canny` preprocessor, as its edges (`canny`, numpy only).
"""

from __future__ import annotations

import logging
import os
import pathlib
import re
from typing import Any

from PIL import Image

from gpu_worker.engines.base import GenerationTask, fit
from gpu_worker.errors import JobFailed

log = logging.getLogger("imagegen.worker.controlnet")

TINY_CONTROLNET = "tiny-controlnet"
NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def parse_specs(specs: tuple[str, ...]) -> list[tuple[str, str]]:
    """NAME=SOURCE pairs; raises ValueError naming a bad one."""
    pairs = []
    for spec in specs:
        name, sep, source = spec.partition("=")
        if not sep or not NAME.match(name) or not source:
            raise ValueError(f"--controlnet: expected NAME=SOURCE (NAME of letters, digits, '_', '-', '.'), got {spec!r}")
        if name in dict(pairs):
            raise ValueError(f"--controlnet: {name!r} is given twice")
        pairs.append((name, source))
    return pairs


def build_tiny_controlnet(folder: str | os.PathLike, unet: Any, *, seed: int = 5) -> pathlib.Path:
    """A small SDXL ControlNet made from `unet`, saved to `folder` (returned at once when there)."""
    import torch
    from diffusers import ControlNetModel

    target = pathlib.Path(folder)
    if (target / "config.json").exists():
        return target
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ControlNetModel.from_unet(unet)  # copies the weights into a new fp32 model; the UNet is left as it is
        with torch.no_grad():
            for block in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
                block.weight.normal_(0.0, 0.2)
                block.bias.zero_()
    net.save_pretrained(target, safe_serialization=True)
    return target


def load(specs: tuple[str, ...], *, base: Any, dtype: Any, device: str, models_dir: pathlib.Path) -> dict[str, Any]:
    """The ControlNets by name, on the device, in the model's dtype."""
    from diffusers import ControlNetModel

    loaded = {}
    for name, source in parse_specs(specs):
        if source == TINY_CONTROLNET:
            source = str(build_tiny_controlnet(models_dir / TINY_CONTROLNET, base.unet))
        local = pathlib.Path(source).is_dir() or bool(os.environ.get("HF_HUB_OFFLINE"))
        net = ControlNetModel.from_pretrained(source, dtype=dtype, local_files_only=local)
        loaded[name] = net.to(device)
        log.info("loaded ControlNet %s from %s", name, source)
    return loaded


def pipeline(engine: Any, kind: str, name: str) -> Any:
    """The base's ControlNet pipeline (`controlnet`: text to image; `controlnet-img2img`) with `name` set on it."""
    if name not in engine._controlnets:
        have = ", ".join(sorted(engine._controlnets)) or "none"
        raise JobFailed(f"controlnet: this worker has no ControlNet {name!r}; it has: {have}")
    pipe = engine._derived.get(kind)
    if pipe is None:
        import inspect

        from diffusers import StableDiffusionXLControlNetImg2ImgPipeline, StableDiffusionXLControlNetPipeline

        cls = StableDiffusionXLControlNetPipeline if kind == "controlnet" else StableDiffusionXLControlNetImg2ImgPipeline
        accepted = inspect.signature(cls.__init__).parameters
        source = engine._base
        parts = {k: module for k, module in source.components.items() if k in accepted}
        options = {k: source.config[k] for k in ("force_zeros_for_empty_prompt",) if k in source.config and k in accepted}
        pipe = cls(**parts, **options, controlnet=engine._controlnets[name], add_watermarker=False)
        pipe.set_progress_bar_config(disable=True)
        engine._derived[kind] = pipe
        log.info("built the %s pipeline from the loaded components", kind)
    pipe.controlnet = engine._controlnets[name]
    return pipe


def canny(image: Image.Image, *, low: int = 100, high: int = 200) -> Image.Image:
    """Canny-like edges with numpy only: Sobel gradients, thresholds with hysteresis by one dilation;
    white edges on black, as SDXL canny ControlNets take them."""
    import numpy as np

    grey = np.asarray(image.convert("L"), dtype=np.float32)
    padded = np.pad(grey, 1, mode="edge")
    gx = (padded[:-2, 2:] + 2 * padded[1:-1, 2:] + padded[2:, 2:]) - (padded[:-2, :-2] + 2 * padded[1:-1, :-2] + padded[2:, :-2])
    gy = (padded[2:, :-2] + 2 * padded[2:, 1:-1] + padded[2:, 2:]) - (padded[:-2, :-2] + 2 * padded[:-2, 1:-1] + padded[:-2, 2:])
    magnitude = np.hypot(gx, gy) / 4
    strong = magnitude >= high
    weak = magnitude >= low
    grown = np.pad(strong, 1)
    near = np.zeros_like(strong)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            near |= grown[dy:dy + strong.shape[0], dx:dx + strong.shape[1]]
    edges = strong | (weak & near)
    return Image.fromarray((edges * 255).astype(np.uint8), mode="L").convert("RGB")


def control_image(task: GenerationTask, unit: Any, width: int, height: int) -> Image.Image:
    """The task's control image at width x height, preprocessed as the unit (schemas.plan.ControlNetUnit) asks."""
    if task.control_image is None:
        raise JobFailed("controlnet: the plan names a ControlNet but the job carries no control image")
    image = fit(task.control_image, width, height, mode="RGB")
    return canny(image, low=unit.low_threshold, high=unit.high_threshold) if unit.preprocessor == "canny" else image
