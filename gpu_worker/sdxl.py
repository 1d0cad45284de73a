"""The SDXL engine: diffusers' StableDiffusionXLPipeline, with the refiner taking over the last steps.

`--model` is a hub id (stabilityai/stable-diffusion-xl-base-1.0), a local folder, or `tiny-sdxl`
(built locally with small random weights and loaded through the same `from_pretrained` path).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from gpu_worker.engine import GenerationTask, StepCallback
from gpu_worker.errors import JobFailed

log = logging.getLogger("imagegen.worker.sdxl")

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_REFINER = "stabilityai/stable-diffusion-xl-refiner-1.0"


@dataclass(kw_only=True)
class SdxlSettings:
    model: str = SDXL_BASE
    refiner: str | None = None
    device: str = "cpu"
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    refiner_split: float = 0.8  # fraction of steps the base runs when the refiner is used
    default_steps: int = 30
    default_guidance: float = 5.0
    threads: int = 1  # torch CPU threads


def _torch_dtype(name: str, device: str) -> Any:
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


@dataclass(kw_only=True)
class SdxlEngine:
    settings: SdxlSettings
    name: str = ""
    device: str = "cpu"
    default_steps: int = 30
    default_guidance: float = 5.0
    has_refiner: bool = False
    _base: Any = field(default=None, repr=False)
    _refiner: Any = field(default=None, repr=False)

    @classmethod
    def load(cls, settings: SdxlSettings, *, name: str | None = None) -> "SdxlEngine":
        import torch
        from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

        if settings.device == "cpu":
            torch.set_num_threads(max(1, settings.threads))
        dtype = _torch_dtype(settings.dtype, settings.device)
        local = Path(settings.model).is_dir()
        base = StableDiffusionXLPipeline.from_pretrained(
            settings.model, dtype=dtype, local_files_only=local or bool(os.environ.get("HF_HUB_OFFLINE"))
        ).to(settings.device)
        base.set_progress_bar_config(disable=True)
        refiner = None
        if settings.refiner:
            refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
                settings.refiner,
                dtype=dtype,
                text_encoder_2=base.text_encoder_2,
                vae=base.vae,
                local_files_only=Path(settings.refiner).is_dir(),
            ).to(settings.device)
            refiner.set_progress_bar_config(disable=True)
        log.info("loaded model=%s refiner=%s device=%s dtype=%s", settings.model, settings.refiner, settings.device, dtype)
        return cls(
            settings=settings,
            name=name or settings.model,
            device=settings.device,
            default_steps=settings.default_steps,
            default_guidance=settings.default_guidance,
            has_refiner=refiner is not None,
            _base=base,
            _refiner=refiner,
        )

    def refiner_steps(self, task: GenerationTask) -> int:
        if not (task.use_refiner and self.has_refiner):
            return 0
        return task.steps - self._base_steps(task)

    def _base_steps(self, task: GenerationTask) -> int:
        return max(1, int(task.steps * self.settings.refiner_split))

    def generate(self, task: GenerationTask, on_step: StepCallback) -> Image.Image:
        import torch

        if task.use_refiner and not self.has_refiner:
            raise JobFailed("use_refiner: this worker has no refiner loaded (start it with --refiner)")
        generator = torch.Generator(device="cpu").manual_seed(task.seed)
        use_refiner = task.use_refiner and self.has_refiner
        base_steps = self._base_steps(task) if use_refiner else task.steps
        done = 0

        def callback(pipe: Any, step: int, timestep: Any, kwargs: dict) -> dict:
            nonlocal done
            done += 1
            on_step(min(done, task.steps), task.steps, kwargs.get("latents"))
            return kwargs

        common = dict(
            prompt=task.prompt,
            negative_prompt=task.negative_prompt or None,
            num_inference_steps=task.steps,
            guidance_scale=task.guidance,
            generator=generator,
            callback_on_step_end=callback,
        )
        with torch.inference_mode():
            if not use_refiner:
                return self._base(width=task.width, height=task.height, **common).images[0]
            split = base_steps / task.steps
            latents = self._base(
                width=task.width, height=task.height, denoising_end=split, output_type="latent", **common
            ).images
            return self._refiner(image=latents, denoising_start=split, **common).images[0]
