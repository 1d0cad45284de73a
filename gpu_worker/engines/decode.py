"""Latents to a picture, never a black one: the VAE decode with a safe dtype, NaN checks and tiling.

The stock SDXL VAE overflows in float16 (its config says `force_upcast`), which turns a whole image into
NaN and then black. So a float16 model decodes in bfloat16 (same range as float32) where the GPU has it,
else in float32; an fp16-fixed VAE (`force_upcast` false) stays in float16. If a decode still yields a
non-finite value, it is decoded again in float32, and if that fails too the job fails with a clear
reason instead of returning a black image. Large images decode in tiles, and a decode that runs out of
memory is retried in tiles.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from PIL import Image

from gpu_worker.errors import JobFailed
from gpu_worker.memory import OUT_OF_MEMORY, free_device_memory

log = logging.getLogger("imagegen.worker.decode")

DTYPE_NAMES = ("auto", "fp32", "fp16", "bf16")


def torch_dtype(name: str) -> Any:
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def pick_decode_dtype(setting: str, *, model_dtype: Any, device: str, force_upcast: bool, bf16_native: bool) -> Any:
    """The dtype the VAE decodes in. `setting` is auto, fp32, fp16 or bf16; auto avoids float16 overflow."""
    import torch

    if setting != "auto":
        return torch_dtype(setting)
    if not device.startswith("cuda"):
        return torch.float32
    if model_dtype == torch.float16 and force_upcast:
        return torch.bfloat16 if bf16_native else torch.float32
    return model_dtype


def bf16_native(device: str) -> bool:
    """Whether the device computes bfloat16 natively (CUDA compute capability 8.0 or newer)."""
    import torch

    if not device.startswith("cuda"):
        return False
    return torch.cuda.get_device_capability(torch.device(device))[0] >= 8


def is_finite(tensor: Any) -> bool:
    import torch

    return bool(torch.isfinite(tensor).all())


@dataclass(kw_only=True)
class LatentDecoder:
    vae: Any
    image_processor: Any
    dtype: Any
    tiling: str = "auto"  # auto: tiles above tiling_min_pixels; on; off
    tiling_min_pixels: int = 1536 * 1536
    watermark: Any = None

    def decode(self, latents: Any, *, job_id: str) -> Image.Image:
        import torch

        if not is_finite(latents):
            raise JobFailed(
                "the denoiser produced NaN or infinite latents (numeric overflow); try --dtype bf16 or lower LoRA weights"
            )
        height, width = (side * 8 for side in latents.shape[-2:])
        tiled = self.tiling == "on" or (self.tiling == "auto" and width * height > self.tiling_min_pixels)
        image = self._decode_or_tile(latents, self.dtype, tiled=tiled, job_id=job_id)
        if not is_finite(image) and self.dtype != torch.float32:
            log.warning("job %s: the %s VAE decode gave NaN; decoding again in float32", job_id, _name(self.dtype))
            image = self._decode_or_tile(latents, torch.float32, tiled=tiled, job_id=job_id)
        if not is_finite(image):
            raise JobFailed("the VAE decode produced NaN or infinite pixels; no image was made (try --vae-dtype fp32)")
        if self.watermark is not None:
            image = self.watermark.apply_watermark(image)
        return self.image_processor.postprocess(image, output_type="pil")[0]

    def _decode_or_tile(self, latents: Any, dtype: Any, *, tiled: bool, job_id: str) -> Any:
        if tiled:
            return self._decode(latents, dtype, tiled=True)
        out_of_memory = False
        try:
            return self._decode(latents, dtype, tiled=False)
        except OUT_OF_MEMORY:
            out_of_memory = True
        if out_of_memory:
            free_device_memory()
            log.warning("job %s: the VAE decode ran out of memory; decoding again in tiles", job_id)
        return self._decode(latents, dtype, tiled=True)

    def _decode(self, latents: Any, dtype: Any, *, tiled: bool) -> Any:
        vae = self.vae
        config = vae.config
        stored_dtype = next(vae.parameters()).dtype
        if stored_dtype != dtype:
            vae.to(dtype=dtype)
        use_tiling = getattr(vae, "use_tiling", False)
        if tiled != use_tiling:
            vae.enable_tiling() if tiled else vae.disable_tiling()
        try:
            latents = latents.to(dtype=dtype)
            mean = getattr(config, "latents_mean", None)
            std = getattr(config, "latents_std", None)
            if mean is not None and std is not None:
                import torch

                mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, dtype)
                std = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, dtype)
                latents = latents * std / config.scaling_factor + mean
            else:
                latents = latents / config.scaling_factor
            return vae.decode(latents, return_dict=False)[0]
        finally:
            if tiled != use_tiling:
                vae.enable_tiling() if use_tiling else vae.disable_tiling()
            if stored_dtype != dtype:
                vae.to(dtype=stored_dtype)


def _name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")
