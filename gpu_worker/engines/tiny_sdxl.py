"""tiny-sdxl: an SDXL-architecture diffusers pipeline with small random weights.

The images it makes are noise, but loading it with
``StableDiffusionXLPipeline.from_pretrained`` and generating with it runs every
line of the real SDXL code (two CLIP text encoders, text_time UNet conditioning,
an 8x-downsampling VAE, the Euler scheduler, base -> refiner hand-over) on a
CPU: about a second for a 1024x1024 image in 4 steps on one core, a few
hundredths of a second at 64x64.  It exists so that the worker and its tests
can run end to end without a GPU or a multi-gigabyte download.  Its sizes are
chosen for that speed: the UNet's attention sits at its lowest level only, with
one head, and the VAE is four channels wide with no attention in its middle
block (at 1024x1024 that attention alone, over 16,384 latent pixels, cost more
than the rest of the decode).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

TINY_SDXL = "tiny-sdxl"
TINY_REFINER = "tiny-sdxl-refiner"

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_LENGTH = 77
TEXT_HIDDEN = 32
TEXT_PROJECTION = 32
TIME_EMBED_DIM = 8
VERSION = "tiny-sdxl 2"
"""Bumped whenever the layout or sizes change, so a data dir's older (slower) build is replaced."""
VERSION_FILE = "tiny-sdxl-version.txt"
UNET_CHANNELS = (8, 16, 32)
"""Three levels as in SDXL; attention only at the lowest (1/32 of the image side, 1,024 tokens at 1024x1024)."""
VAE_CHANNELS = (4, 4, 4, 4)
"""Four blocks, so the VAE still scales by 8; four channels keep a 1024x1024 decode to a few passes over memory."""


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 / CLIP map from each byte to a printable unicode character."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _vocab() -> dict[str, int]:
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(tokens)}


def _tokenizer(pad_token: str) -> CLIPTokenizer:
    return CLIPTokenizer(
        vocab=_vocab(),
        merges=[],
        model_max_length=MAX_LENGTH,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=pad_token,
    )


def _text_config(tokenizer: CLIPTokenizer, hidden_act: str) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=TEXT_PROJECTION,
        hidden_act=hidden_act,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _unet(cross_attention_dim: int, time_ids: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        block_out_channels=UNET_CHANNELS,
        layers_per_block=1,
        attention_head_dim=(1, 1, 1),  # diffusers' legacy name: the number of heads per block
        transformer_layers_per_block=(1, 1, 1),
        norm_num_groups=UNET_CHANNELS[0],
        cross_attention_dim=cross_attention_dim,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=TIME_EMBED_DIM * time_ids + TEXT_PROJECTION,
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=VAE_CHANNELS,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=VAE_CHANNELS[0],
        mid_block_add_attention=False,
        sample_size=256,
        scaling_factor=0.13025,
        force_upcast=True,
    )


def _scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        interpolation_type="linear",
        use_karras_sigmas=False,
        timestep_spacing="leading",
        steps_offset=1,
    )


def _seeded(seed: int, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build().eval()


def _base_pipeline(seed: int) -> StableDiffusionXLPipeline:
    tokenizer = _tokenizer(pad_token=EOS_TOKEN)
    tokenizer_2 = _tokenizer(pad_token="!")
    return StableDiffusionXLPipeline(
        vae=_seeded(seed, _vae),
        text_encoder=_seeded(seed + 1, lambda: CLIPTextModel(_text_config(tokenizer, "quick_gelu"))),
        text_encoder_2=_seeded(seed + 2, lambda: CLIPTextModelWithProjection(_text_config(tokenizer_2, "gelu"))),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=_seeded(seed + 3, lambda: _unet(cross_attention_dim=2 * TEXT_HIDDEN, time_ids=6)),
        scheduler=_scheduler(),
        force_zeros_for_empty_prompt=True,
    )


def _refiner_pipeline(seed: int) -> StableDiffusionXLImg2ImgPipeline:
    tokenizer_2 = _tokenizer(pad_token="!")
    return StableDiffusionXLImg2ImgPipeline(
        vae=_seeded(seed, _vae),
        text_encoder=None,
        text_encoder_2=_seeded(seed + 2, lambda: CLIPTextModelWithProjection(_text_config(tokenizer_2, "gelu"))),
        tokenizer=None,
        tokenizer_2=tokenizer_2,
        unet=_seeded(seed + 3, lambda: _unet(cross_attention_dim=TEXT_HIDDEN, time_ids=5)),
        scheduler=_scheduler(),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )


def _make_readable(root: pathlib.Path) -> None:
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


def _current(target: pathlib.Path, seed: int) -> bool:
    """Whether target holds a complete build of this version of the layout, with this seed."""
    stamp = target / VERSION_FILE
    return (target / "model_index.json").exists() and stamp.exists() and stamp.read_text().strip() == f"{VERSION} seed={seed}"


def _build(folder: str | os.PathLike, seed: int, make: Callable[[], DiffusionPipeline]) -> pathlib.Path:
    target = pathlib.Path(folder)
    if _current(target, seed):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    old = tmp.with_suffix(".old")
    try:
        with torch.random.fork_rng(devices=[]):
            pipe = make()
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / VERSION_FILE).write_text(f"{VERSION} seed={seed}\n")
        _make_readable(tmp)
        if target.exists() and not _current(target, seed):  # an older layout (or a half-copied one)
            os.rename(target, old)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _current(target, seed):  # another process built it meanwhile: theirs is as good
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return target


def build_tiny_sdxl(folder: str | os.PathLike, *, seed: int = 0) -> pathlib.Path:
    """Builds the tiny base pipeline into folder and returns the folder. A folder that holds this version's
    build already is returned at once; one from an older version of the layout is replaced."""
    return _build(folder, seed, lambda: _base_pipeline(seed))


def build_tiny_refiner(folder: str | os.PathLike, *, seed: int = 1) -> pathlib.Path:
    """Same for the tiny refiner."""
    return _build(folder, seed, lambda: _refiner_pipeline(seed))
