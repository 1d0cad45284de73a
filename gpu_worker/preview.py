"""A cheap preview from SDXL latents: a fixed linear map from the 4 latent channels to RGB (no VAE),
scaled to at most `max_side` pixels and encoded as a small JPEG."""

from __future__ import annotations

import io
from typing import Any

from PIL import Image

# Least-squares fit of SDXL latents to RGB, as used by common SDXL front ends for live previews.
SDXL_LATENT_RGB = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
SDXL_LATENT_RGB_BIAS = (0.1084, -0.0175, -0.0011)


def latent_preview(latents: Any, *, max_side: int = 128, quality: int = 70) -> bytes | None:
    """JPEG bytes of a rough picture of `latents` (B, 4, h, w), or None if they are not SDXL latents."""
    import torch

    if latents is None or latents.ndim != 4 or latents.shape[1] != 4:
        return None
    with torch.no_grad():
        factors = torch.tensor(SDXL_LATENT_RGB, dtype=torch.float32)
        bias = torch.tensor(SDXL_LATENT_RGB_BIAS, dtype=torch.float32)
        rgb = torch.einsum("chw,cr->hwr", latents[0].detach().float().cpu(), factors) + bias
        pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).to(torch.uint8).numpy()
    image = Image.fromarray(pixels, "RGB")
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
