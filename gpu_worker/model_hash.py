"""The model's hash, as AUTOMATIC1111 shows it in `/sdapi/v1/sd-models`: the sha256 of its weights,
and a short hash of its first 10 hex digits.

A1111 hashes the checkpoint file. A diffusers folder has no one checkpoint file, so here the hash is
that of its UNet's weights: `unet/diffusion_pytorch_model.safetensors` (or `.bin`), or, when the UNet
is sharded, its shards read one after another in name order. The UNet is what tells two SDXL
checkpoints apart (fine-tunes share the text encoders and the VAE). Read in 8 MiB pieces; a 5 GB UNet
takes a few seconds, once per worker start.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

CHUNK_BYTES = 8 * 1024 * 1024
WEIGHTS = re.compile(r"^diffusion_pytorch_model(-\d+-of-\d+)?\.(safetensors|bin)$")
SHORT_CHARS = 10


def unet_files(unet_folder: Path) -> list[Path]:
    """The UNet's weight files without a variant (what `from_pretrained` loads with no `variant`):
    safetensors when there are any, else .bin; in name order."""
    found = sorted(p for p in unet_folder.iterdir() if p.is_file() and WEIGHTS.match(p.name)) if unet_folder.is_dir() else []
    safetensors = [p for p in found if p.suffix == ".safetensors"]
    return safetensors or found


def sha256_of(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        with path.open("rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                digest.update(chunk)
    return digest.hexdigest()


def model_sha256(unet_folder: str | Path | None) -> str | None:
    """The sha256 of the UNet's weights in `unet_folder` (the local folder its weights were loaded from);
    None when it has none there (weights not on this disk)."""
    if not unet_folder:
        return None
    files = unet_files(Path(unet_folder))
    return sha256_of(files) if files else None


def short_hash(sha256: str | None) -> str | None:
    """A1111's short hash: the first 10 hex digits of the sha256."""
    return sha256[:SHORT_CHARS] if sha256 else None
