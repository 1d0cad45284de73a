"""Tests for tiny-sdxl: real diffusers SDXL code paths on tiny random weights."""

from __future__ import annotations

import logging
import pathlib
import socket

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

from gpu_worker.engines.tiny_sdxl import TINY_REFINER, TINY_SDXL, build_tiny_refiner, build_tiny_sdxl

torch.set_num_threads(1)

PROMPT = "a cat"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def base_dir(models_dir: pathlib.Path) -> pathlib.Path:
    return build_tiny_sdxl(models_dir / TINY_SDXL)


@pytest.fixture(scope="module")
def refiner_dir(models_dir: pathlib.Path) -> pathlib.Path:
    return build_tiny_refiner(models_dir / TINY_REFINER)


@pytest.fixture(scope="module")
def base(base_dir: pathlib.Path) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(base_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def refiner(refiner_dir: pathlib.Path) -> StableDiffusionXLImg2ImgPipeline:
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe: StableDiffusionXLPipeline, seed: int = 0, **kwargs) -> np.ndarray:
    args = dict(
        prompt=PROMPT,
        width=64,
        height=64,
        num_inference_steps=4,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(seed),
    )
    args.update(kwargs)
    return np.asarray(pipe(**args).images[0])


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_build_writes_a_loadable_folder(base_dir: pathlib.Path, refiner_dir: pathlib.Path) -> None:
    assert (base_dir / "model_index.json").is_file()
    assert (base_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (base_dir / "text_encoder_2" / "model.safetensors").is_file()
    assert (refiner_dir / "model_index.json").is_file()
    assert not (refiner_dir / "text_encoder").exists()
    assert not [p for p in base_dir.parent.iterdir() if p.name.endswith(".tmp")]
    size = sum(p.stat().st_size for p in base_dir.rglob("*") if p.is_file())
    assert size < 20 * 1024 * 1024


def test_build_returns_existing_folder_without_rebuilding(base_dir: pathlib.Path) -> None:
    marker = base_dir / "unet" / "diffusion_pytorch_model.safetensors"
    before = marker.stat().st_mtime_ns
    assert build_tiny_sdxl(base_dir) == base_dir
    assert marker.stat().st_mtime_ns == before


def test_build_is_deterministic(base_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    again = build_tiny_sdxl(tmp_path / "again")
    other = build_tiny_sdxl(tmp_path / "other", seed=7)
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert (again / weights).read_bytes() == (base_dir / weights).read_bytes()
    assert (other / weights).read_bytes() != (base_dir / weights).read_bytes()


def test_load_is_offline_and_reports_no_missing_or_unexpected_weights(
    base_dir: pathlib.Path, refiner_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError(f"network access: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    records = _Records()
    loggers = [logging.getLogger("diffusers"), logging.getLogger("transformers")]
    for logger in loggers:
        logger.addHandler(records)
    try:
        base = StableDiffusionXLPipeline.from_pretrained(base_dir)
        refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner_dir)
    finally:
        for logger in loggers:
            logger.removeHandler(records)
    assert records.messages == []
    assert base.vae_scale_factor == 8
    assert base.text_encoder.config.vocab_size == len(base.tokenizer)
    assert base.tokenizer.model_max_length == 77
    assert base.unet.config.cross_attention_dim == 64
    assert refiner.text_encoder is None and refiner.tokenizer is None
    assert refiner.config.requires_aesthetics_score is True
    assert refiner.unet.config.cross_attention_dim == 32


@pytest.mark.parametrize(("width", "height"), [(64, 64), (128, 64), (64, 96), (72, 136)])  # 72: latents 9 wide, odd at every level
def test_image_has_requested_size(base: StableDiffusionXLPipeline, width: int, height: int) -> None:
    pixels = generate(base, width=width, height=height, num_inference_steps=2)
    assert pixels.shape == (height, width, 3)


def test_latents_are_one_eighth_of_the_image(base: StableDiffusionXLPipeline) -> None:
    latents = base(
        prompt=PROMPT, width=64, height=128, num_inference_steps=2, output_type="latent"
    ).images
    assert tuple(latents.shape) == (1, 4, 16, 8)


def test_size_not_multiple_of_8_is_rejected(base: StableDiffusionXLPipeline) -> None:
    with pytest.raises(ValueError):
        generate(base, width=100, num_inference_steps=1)


def test_same_seed_same_image_other_seed_other_image(base: StableDiffusionXLPipeline) -> None:
    first = generate(base, seed=0)
    again = generate(base, seed=0)
    other = generate(base, seed=1)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
    assert first.std() > 0


def test_output_has_no_nan(base: StableDiffusionXLPipeline) -> None:
    out = base(prompt=PROMPT, width=64, height=64, num_inference_steps=4, output_type="np").images
    assert out.shape == (1, 64, 64, 3)
    assert not np.isnan(out).any()


def test_callback_on_step_end_runs_once_per_step(base: StableDiffusionXLPipeline) -> None:
    steps: list[int] = []

    def on_step_end(pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        steps.append(step)
        return callback_kwargs

    generate(base, num_inference_steps=5, callback_on_step_end=on_step_end)
    assert steps == [0, 1, 2, 3, 4]


def test_base_to_refiner_hand_over(
    base: StableDiffusionXLPipeline, refiner: StableDiffusionXLImg2ImgPipeline
) -> None:
    latents = base(
        prompt=PROMPT,
        width=64,
        height=96,
        num_inference_steps=4,
        denoising_end=0.8,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert tuple(latents.shape) == (1, 4, 12, 8)
    image = refiner(
        prompt=PROMPT,
        image=latents,
        denoising_start=0.8,
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (64, 96)
    assert np.asarray(image).std() > 0


def test_a_build_of_an_older_layout_is_replaced(base_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    from gpu_worker.engines import tiny_sdxl

    folder = build_tiny_sdxl(tmp_path / TINY_SDXL)
    stamp = folder / tiny_sdxl.VERSION_FILE
    stamp.write_text("tiny-sdxl 1 seed=0\n")  # as a data dir's model from an earlier release
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"stale")
    assert build_tiny_sdxl(folder) == folder
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert (folder / weights).read_bytes() == (base_dir / weights).read_bytes()
    assert stamp.read_text() == (base_dir / tiny_sdxl.VERSION_FILE).read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == [TINY_SDXL]
