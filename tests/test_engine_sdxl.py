"""The SDXL engine on tiny-sdxl: refiner hand-over, samplers, LoRA selection, seeds, cancellation,
out-of-memory recovery and the NaN-free decode; plus LoRA and sampler choice end to end over HTTP."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gpu_worker.engines.decode import pick_decode_dtype
from gpu_worker.engines.base import GenerationTask
from gpu_worker.errors import JobCancelled, JobFailed
from gpu_worker.engines.lora import parse_lora_specs
from gpu_worker.engines.schedulers import SCHEDULER_SPECS
from gpu_worker.engines.sdxl import SdxlEngine, SdxlSettings
from gpu_worker.engines.speedups import flag_on, is_compiled, parse_buckets
from gpu_worker.engines.tiny_sdxl import build_tiny_refiner, build_tiny_sdxl
from imagegen.embedded_nats import EmbeddedNats, free_port
from schemas.request import SCHEDULERS, RequestInvalid, parse_request
from tests.helpers.loras import build_tiny_lora
from tests.helpers.service import start_service, stop_service, wait_status

ROOT = Path(__file__).resolve().parents[1]
TASK = GenerationTask(
    job_id="test-job", prompt="a lighthouse", negative_prompt="", width=64, height=64, steps=6, guidance=5.0, seed=7
)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("engine-models")
    base = build_tiny_sdxl(root / "tiny-sdxl")
    return {
        "base": base,
        "refiner": build_tiny_refiner(root / "tiny-sdxl-refiner"),
        "lora": build_tiny_lora(base, root / "style-lora"),
    }


@pytest.fixture(scope="module")
def engine(models) -> SdxlEngine:
    return SdxlEngine.load(SdxlSettings(model=str(models["base"]), refiner=str(models["refiner"]), default_steps=4))


@pytest.fixture(scope="module")
def lora_engine(models) -> SdxlEngine:
    return SdxlEngine.load(SdxlSettings(model=str(models["base"]), loras=(f"style={models['lora']}",)))


def run(engine: SdxlEngine, task: GenerationTask = TASK, **changes) -> np.ndarray:
    return np.asarray(engine.generate(dataclasses.replace(task, **changes), lambda *_: None)).astype(np.int16)


class CallCounter:
    """Counts forward calls of a module; optionally raises an exception at a given call."""

    def __init__(self, module: torch.nn.Module, *, raise_at: int | None = None, error: BaseException | None = None):
        self.calls = 0
        self.raise_at, self.error = raise_at, error
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.calls += 1
        if self.calls == self.raise_at:
            raise self.error

    def remove(self) -> None:
        self.handle.remove()


# -- refiner hand-over ------------------------------------------------------------------------------


def test_refiner_runs_the_last_steps_and_every_step_is_reported(engine):
    task = dataclasses.replace(TASK, use_refiner=True)
    base_calls, refiner_calls = CallCounter(engine._base.unet), CallCounter(engine._refiner.unet)
    steps: list[tuple[int, int]] = []
    try:
        refined = np.asarray(engine.generate(task, lambda step, total, latents: steps.append((step, total))))
    finally:
        base_calls.remove(), refiner_calls.remove()
    assert steps == [(i, 6) for i in range(1, 7)]
    assert refiner_calls.calls == engine.refiner_steps(task) > 0
    assert base_calls.calls + refiner_calls.calls == 6
    assert refined.shape == (64, 64, 3)
    assert not np.array_equal(refined, run(engine))  # same seed without the refiner
    assert np.array_equal(refined, run(engine, task))  # and the refined image reproduces


def test_refiner_split_moves_the_hand_over(engine):
    late = dataclasses.replace(TASK, use_refiner=True, refiner_split=0.8)
    early = dataclasses.replace(TASK, use_refiner=True, refiner_split=0.5)
    assert engine.refiner_steps(early) > engine.refiner_steps(late) > 0
    counter = CallCounter(engine._refiner.unet)
    try:
        early_image = run(engine, early)
    finally:
        counter.remove()
    assert counter.calls == engine.refiner_steps(early)
    assert not np.array_equal(early_image, run(engine, late))


def test_refiner_requested_without_one_fails_clearly(lora_engine):
    with pytest.raises(JobFailed, match="no refiner"):
        run(lora_engine, use_refiner=True)


# -- seeds and samplers -----------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", [None, "euler_a", "dpmpp_2m_sde"])
def test_same_seed_same_image_other_seed_other_image(engine, scheduler):
    first = run(engine, scheduler=scheduler)
    assert np.array_equal(first, run(engine, scheduler=scheduler))
    assert not np.array_equal(first, run(engine, scheduler=scheduler, seed=8))


def test_every_sampler_name_has_a_scheduler():
    assert set(SCHEDULER_SPECS) == set(SCHEDULERS)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_sampler_runs_through_the_refiner(engine, scheduler):
    task = dataclasses.replace(TASK, use_refiner=True, scheduler=scheduler)
    steps: list[int] = []
    image = np.asarray(engine.generate(task, lambda step, total, latents: steps.append(step)))
    assert steps == list(range(1, 7))
    assert 0 < engine.refiner_steps(task) < 6
    assert image.std() > 0


def test_sampler_choice_changes_the_image(engine):
    assert not np.array_equal(run(engine), run(engine, scheduler="dpmpp_2m_karras"))


def test_unknown_sampler_is_refused_by_the_schema_and_the_engine(engine):
    with pytest.raises(RequestInvalid) as caught:
        parse_request({"prompt": "x", "scheduler": "warp-drive"})
    assert caught.value.errors[0]["field"] == "scheduler"
    assert "warp-drive" in str(caught.value) and "dpmpp_2m" in str(caught.value)
    assert parse_request({"prompt": "x", "scheduler": " Euler_A "}).scheduler == "euler_a"
    with pytest.raises(JobFailed, match="warp-drive"):
        run(engine, scheduler="warp-drive")


# -- LoRA ---------------------------------------------------------------------------------------------


def test_lora_weight_changes_the_image_and_zero_or_none_gives_the_base(engine, lora_engine):
    plain = run(engine)
    assert np.array_equal(run(lora_engine), plain)  # loaded, not selected: the base model
    full = run(lora_engine, loras=(("style", 1.0),))
    half = run(lora_engine, loras=(("style", 0.5),))
    assert not np.array_equal(full, plain)
    assert not np.array_equal(half, plain) and not np.array_equal(half, full)
    assert np.array_equal(run(lora_engine, loras=(("style", 0.0),)), plain)
    assert np.array_equal(run(lora_engine, loras=(("style", 1.0),)), full)  # back again: same image
    assert np.array_equal(run(lora_engine), plain)


def test_unknown_lora_names_the_adapters_the_worker_has(engine, lora_engine):
    with pytest.raises(JobFailed, match=r"'sepia' not loaded on this worker \(it has: style\)"):
        run(lora_engine, loras=(("style", 1.0), ("sepia", 0.5)))
    with pytest.raises(JobFailed, match=r"it has: none"):
        run(engine, loras=(("style", 1.0),))
    assert np.array_equal(run(lora_engine), run(engine))


def test_lora_specs_and_request_field_are_validated(models, tmp_path):
    assert parse_lora_specs(["a=/x", " b = owner/repo:w.safetensors "]) == {"a": "/x", "b": "owner/repo:w.safetensors"}
    for bad in ["just-a-path", "=folder", "a=", "sp ace=folder"]:
        with pytest.raises(ValueError, match="--lora"):
            parse_lora_specs([bad])
    with pytest.raises(ValueError, match="twice"):
        parse_lora_specs(["a=x", "a=y"])
    with pytest.raises(ValueError, match="'gone'"):
        SdxlEngine.load(SdxlSettings(model=str(models["base"]), loras=(f"gone={tmp_path / 'missing'}",)))
    with pytest.raises(RequestInvalid, match="weight of 'style'"):
        parse_request({"prompt": "x", "loras": {"style": 9}})
    with pytest.raises(RequestInvalid, match="adapter name"):
        parse_request({"prompt": "x", "loras": {"no spaces": 1}})
    assert parse_request({"prompt": "x", "loras": {"style": 0.7}}).loras == {"style": 0.7}


# -- cancellation -------------------------------------------------------------------------------------


def cancel_at(step_to_cancel: int, seen: list[int]):
    def on_step(step: int, total: int, latents) -> None:
        seen.append(step)
        if step == step_to_cancel:
            raise JobCancelled()

    return on_step


def test_cancel_stops_at_the_step_boundary_and_the_engine_serves_on(engine):
    counter, seen = CallCounter(engine._base.unet), []
    try:
        with pytest.raises(JobCancelled):
            engine.generate(TASK, cancel_at(2, seen))
    finally:
        counter.remove()
    assert seen == [1, 2] and counter.calls == 2
    assert np.array_equal(run(engine), run(engine))


def test_cancel_reaches_into_the_refiner(engine):
    task = dataclasses.replace(TASK, use_refiner=True, refiner_split=0.5)
    base_steps = 6 - engine.refiner_steps(task)
    counter, seen = CallCounter(engine._refiner.unet), []
    try:
        with pytest.raises(JobCancelled):
            engine.generate(task, cancel_at(base_steps + 2, seen))
    finally:
        counter.remove()
    assert seen == list(range(1, base_steps + 3)) and counter.calls == 2
    assert run(engine, task).std() > 0


# -- out of memory ------------------------------------------------------------------------------------


def test_out_of_memory_fails_the_job_and_the_engine_serves_on(engine):
    expected = run(engine)
    counter = CallCounter(
        engine._base.unet, raise_at=3, error=torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    )
    try:
        with pytest.raises(JobFailed, match=r"out of GPU memory at 64x64, 6 steps.*try a smaller size"):
            run(engine)
    finally:
        counter.remove()
    assert np.array_equal(run(engine), expected)


def test_out_of_memory_in_the_decode_is_retried_in_tiles(engine):
    expected = run(engine)
    counter = CallCounter(engine._base.vae.decoder, raise_at=1, error=torch.OutOfMemoryError("out of memory"))
    try:
        image = run(engine)
    finally:
        counter.remove()
    assert counter.calls == 2  # the untiled try, then the tiled one
    assert np.array_equal(image, expected)  # this image is smaller than one tile
    assert engine._base.vae.use_tiling is False


# -- NaN-free decode ----------------------------------------------------------------------------------


def test_decode_dtype_avoids_float16_overflow():
    f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32
    pick = pick_decode_dtype
    assert pick("auto", model_dtype=f16, device="cuda:0", force_upcast=True, bf16_native=True) is bf16
    assert pick("auto", model_dtype=f16, device="cuda:0", force_upcast=True, bf16_native=False) is f32
    assert pick("auto", model_dtype=f16, device="cuda:0", force_upcast=False, bf16_native=True) is f16  # fp16-fixed VAE
    assert pick("auto", model_dtype=bf16, device="cuda:1", force_upcast=True, bf16_native=True) is bf16
    assert pick("auto", model_dtype=f32, device="cpu", force_upcast=True, bf16_native=False) is f32
    assert pick("fp16", model_dtype=f32, device="cpu", force_upcast=True, bf16_native=False) is f16


def test_half_precision_decode_overflow_is_decoded_again_in_float32(models):
    engine = SdxlEngine.load(SdxlSettings(model=str(models["base"]), vae_dtype="fp16"))
    vae = engine._base.vae
    assert vae.dtype == torch.float16
    with torch.no_grad():  # activations beyond float16's 65504: a real overflow, as with the stock SDXL VAE
        vae.post_quant_conv.weight.mul_(1000), vae.post_quant_conv.bias.mul_(1000), vae.decoder.conv_in.weight.mul_(1000)
        latents = torch.randn(1, 4, 8, 8) / vae.config.scaling_factor
        assert not torch.isfinite(vae.decode(latents.half()).sample).all()
    image = run(engine)
    assert image.std() > 0 and image.max() > 0
    assert vae.dtype == torch.float16  # the VAE is back in its dtype


def test_nan_decode_is_reported_not_returned_as_a_black_image(models):
    engine = SdxlEngine.load(SdxlSettings(model=str(models["base"])))
    with torch.no_grad():
        engine._base.vae.post_quant_conv.bias[0] = float("nan")
    with pytest.raises(JobFailed, match="NaN"):
        run(engine)


def test_nan_latents_from_the_unet_are_reported(engine):
    handle = engine._base.unet.register_forward_hook(lambda module, args, output: (output[0] * float("nan"),))
    try:
        with pytest.raises(JobFailed, match="NaN or infinite latents"):
            run(engine)
    finally:
        handle.remove()


# -- speed flags on CPU -------------------------------------------------------------------------------


def test_speedups_are_off_on_cpu_and_buckets_parse(engine):
    assert not flag_on("auto", "cpu") and flag_on("auto", "cuda:0") and flag_on("on", "cpu")
    assert not flag_on("off", "cuda:0")
    assert not is_compiled(engine._base.unet)
    assert parse_buckets("1024x1024, 1152X896,1024x1024") == ((1024, 1024), (1152, 896))
    for bad in ["1024", "1004x1024", "axb", "32x32"]:
        with pytest.raises(ValueError, match="bucket"):
            parse_buckets(bad)


# -- end to end: LoRA and sampler through HTTP ---------------------------------------------------------


@pytest.fixture(scope="module")
def own_nats(tmp_path_factory):
    server = EmbeddedNats(store_dir=tmp_path_factory.mktemp("engine-nats"), port=free_port()).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
async def lora_service(own_nats, models, tmp_path_factory):
    service = await start_service(
        own_nats.url, tmp_path_factory.mktemp("engine-data"), loras=(f"style={models['lora']}",)
    )
    yield service
    await stop_service(service)


async def generate_png(http, url: str, **fields) -> tuple[dict, bytes | None]:
    body = {"prompt": "a lighthouse", "seed": 3, "width": 64, "height": 64, "steps": 3, "format": "PNG", **fields}
    async with http.post(f"{url}/api/generate", json=body) as r:
        assert r.status == 200, await r.text()
        task_id = (await r.json())["task_id"]
    status = await wait_status(http, url, task_id, timeout=60)
    if status["status"] != "done":
        return status, None
    async with http.get(f"{url}/api/image", params={"task_id": task_id}) as r:
        assert r.status == 200
        return status, await r.read()


async def test_lora_and_sampler_chosen_per_request_over_http(lora_service, http):
    _, plain = await generate_png(http, lora_service.url)
    _, styled = await generate_png(http, lora_service.url, loras={"style": 1.0})
    _, zero = await generate_png(http, lora_service.url, loras={"style": 0})
    _, sampled = await generate_png(http, lora_service.url, scheduler="dpmpp_2m_karras")
    pixels = [np.asarray(Image.open(io.BytesIO(data))) for data in (plain, styled, zero, sampled)]
    assert pixels[0].shape == (64, 64, 3)
    assert not np.array_equal(pixels[0], pixels[1])
    assert np.array_equal(pixels[0], pixels[2])
    assert not np.array_equal(pixels[0], pixels[3])


async def test_unknown_lora_and_unknown_sampler_are_a_400(lora_service, http):
    """The gateway knows the adapters the workers loaded (they publish them): an unknown one is refused
    before anything is queued. (A worker that lacks one anyway fails the job: see above.)"""
    body = {"prompt": "a lighthouse", "width": 64, "height": 64, "loras": {"sepia": 1.0}}
    async with http.post(f"{lora_service.url}/api/generate", json=body) as r:
        assert r.status == 400
        answer = await r.json()
    assert answer["field"] == "loras" and "no adapter 'sepia'; they have: style" in answer["error"]
    body = {"prompt": "x", "scheduler": "warp-drive", "width": 64, "height": 64}
    async with http.post(f"{lora_service.url}/api/generate", json=body) as r:
        assert r.status == 400
        answer = await r.json()
    assert answer["field"] == "scheduler" and "warp-drive" in answer["error"]
    _, after = await generate_png(http, lora_service.url)  # the worker serves on
    assert after is not None


# -- the benchmark's CPU mode ---------------------------------------------------------------------------


@pytest.mark.processes  # runs the benchmark script
def test_benchmark_tiny_mode_writes_json_and_a_table(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--tiny", "--steps", "2", "--repeats", "1", "--refiner",
         "--work-dir", str(tmp_path / "work"), "--json", str(out)],
        capture_output=True, text=True, timeout=240, env=env, cwd=ROOT, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    setups = {row["setup"] for row in report["results"]}
    assert {"tutorial", "diffusers", "engine", "engine+refiner"} <= setups
    for row in report["results"]:
        assert row["seconds_per_image"] > 0 and row["images_per_s"] > 0
    assert report["engine_flops_per_image"] > 0 and report["peak_tflops"] > 0
    assert "| setup |" in done.stdout

