"""tiny-sdxl: an SDXL-architecture diffusers pipeline with small random weights.

The images it makes are noise, but loading it with
``StableDiffusionXLPipeline.from_pretrained`` and generating with it runs every
line of the real SDXL code (two CLIP text encoders, text_time UNet conditioning,
an 8x-downsampling VAE, the Euler scheduler, base -> refiner hand-over) on a
CPU in well under a second per small image.  It exists so that the worker and
its tests can run end to end without a GPU or a multi-gigabyte download.
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
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 1),
        norm_num_groups=32,
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
        block_out_channels=(8, 16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
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


def _build(folder: str | os.PathLike, make: Callable[[], DiffusionPipeline]) -> pathlib.Path:
    target = pathlib.Path(folder)
    if (target / "model_index.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        with torch.random.fork_rng(devices=[]):
            pipe = make()
        pipe.save_pretrained(tmp, safe_serialization=True)
        _make_readable(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_tiny_sdxl(folder: str | os.PathLike, *, seed: int = 0) -> pathlib.Path:
    """Builds the tiny base pipeline into folder (if folder/model_index.json exists already, returns at once). Returns the folder."""
    return _build(folder, lambda: _base_pipeline(seed))


def build_tiny_refiner(folder: str | os.PathLike, *, seed: int = 1) -> pathlib.Path:
    """Same for the tiny refiner."""
    return _build(folder, lambda: _refiner_pipeline(seed))
