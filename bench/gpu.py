"""SDXL speed on one GPU: plain diffusers, the FastAPI tutorial's setup, and the imagegen engine.

Full-size SDXL base and refiner are built from the official architecture configs in
`bench/sdxl_configs/` (those of stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0) with small
random weights, so nothing is downloaded; speed does not depend on the weights' values. Reported per
setup: seconds per image and images/s (batch 1), FLOPs per image counted with
torch.utils.flop_counter.FlopCounterMode, the achieved TFLOP/s against a measured bf16 matmul peak, and
peak GPU memory. Setups, in the order they run:

- diffusers: fp16 pipeline on the GPU, nothing else
- engine: gpu_worker.engines.sdxl.SdxlEngine with its defaults (torch.compile of the 1024x1024 bucket, its
  Inductor artifacts kept under the work dir so that a second run on the same machine starts faster)
- tutorial: fp16, enable_model_cpu_offload, torch.compile(mode="reduce-overhead") on the UNet

The default run (those three at 1024x1024, 30 steps) is sized to finish within about 6 minutes on an
H100; other sizes (`--sizes`), the base + refiner ensemble (`--refiner`) and float8 (`--fp8`, with
the image's difference from the fp16 engine's for the same seed) are asked for by flag. The JSON and
Markdown are written again after every row, so a run cut short keeps every row it finished.

    python bench/gpu.py --json bench.json --markdown bench.md         # on a GPU
    python bench/gpu.py --tiny --json bench-tiny.json                  # tiny-sdxl on a CPU, seconds

On a CPU the tutorial setup runs without offload and compile (both need a GPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

log = logging.getLogger("imagegen.bench")

CONFIGS = HERE / "sdxl_configs"
PROMPT = "a lighthouse on a cliff at sunset, detailed, photograph"
NEGATIVE = "blurry, low quality"
GUIDANCE = 5.0
SPLIT = 0.8


@dataclass
class Row:
    setup: str
    width: int
    height: int
    steps: int
    seconds_per_image: float = 0.0
    images_per_s: float = 0.0
    seconds_min: float = 0.0
    tflop_per_image: float | None = None
    achieved_tflops: float | None = None
    pct_of_peak: float | None = None
    max_memory_gib: float | None = None
    image_mad: float | None = None  # mean absolute pixel difference (0-255) from the fp16 engine's image, same seed
    image_psnr_db: float | None = None  # the same difference as PSNR
    elapsed_s: float = 0.0  # since the benchmark started, when the row was written
    note: str = ""
    error: str | None = None


# -- models -------------------------------------------------------------------------------------------


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


@torch.no_grad()
def _small_init(module: torch.nn.Module, seed: int) -> None:
    """Normal(0, 0.02) weights and zero biases: activations stay finite through every layer in fp16."""
    generator = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding)):
            m.weight.normal_(0.0, 0.02, generator=generator)
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()


def _made(build: Callable[[], Any], device: str, seed: int) -> Any:
    with torch.device(device):
        module = build()
    _small_init(module, seed)
    return module.to(torch.float16).eval()


def _commit(tmp: Path, target: Path) -> Path:
    os.replace(tmp, target)
    return target


def build_full_sdxl(work: Path, device: str) -> tuple[Path, Path]:
    """Random-weight SDXL base and refiner folders (fp16) from the shipped configs; reused when present."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from gpu_worker.engines.tiny_sdxl import build_tiny_sdxl

    base_dir, refiner_dir = work / "sdxl-base-random", work / "sdxl-refiner-random"
    work.mkdir(parents=True, exist_ok=True)
    if not (base_dir / "model_index.json").exists():
        started = time.monotonic()
        tiny = build_tiny_sdxl(work / "tiny-sdxl")  # its byte-level tokenizers: 77 tokens like CLIP's
        base_cfg = CONFIGS / "base"
        pipe = StableDiffusionXLPipeline(
            vae=_made(lambda: AutoencoderKL.from_config(_read(base_cfg / "vae" / "config.json")), device, 1),
            text_encoder=_made(lambda: CLIPTextModel(CLIPTextConfig.from_pretrained(base_cfg / "text_encoder")), device, 2),
            text_encoder_2=_made(
                lambda: CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(base_cfg / "text_encoder_2")), device, 3
            ),
            tokenizer=CLIPTokenizer.from_pretrained(tiny, subfolder="tokenizer"),
            tokenizer_2=CLIPTokenizer.from_pretrained(tiny, subfolder="tokenizer_2"),
            unet=_made(lambda: UNet2DConditionModel.from_config(_read(base_cfg / "unet" / "config.json")), device, 4),
            scheduler=EulerDiscreteScheduler.from_config(_read(base_cfg / "scheduler" / "scheduler_config.json")),
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
        tmp = Path(tempfile.mkdtemp(prefix=".base.", dir=work))
        pipe.to("cpu").save_pretrained(tmp, safe_serialization=True)
        del pipe
        _commit(tmp, base_dir)
        log.info("built %s in %.0fs", base_dir, time.monotonic() - started)
    if not (refiner_dir / "model_index.json").exists():
        started = time.monotonic()
        ref_cfg = CONFIGS / "refiner"
        tmp = Path(tempfile.mkdtemp(prefix=".refiner.", dir=work))
        unet = _made(lambda: UNet2DConditionModel.from_config(_read(ref_cfg / "unet" / "config.json")), device, 5)
        unet.to("cpu").save_pretrained(tmp / "unet", safe_serialization=True)
        del unet
        (tmp / "scheduler").mkdir()
        shutil.copy(ref_cfg / "scheduler" / "scheduler_config.json", tmp / "scheduler" / "scheduler_config.json")
        shutil.copy(ref_cfg / "model_index.json", tmp / "model_index.json")
        for shared in ("text_encoder_2", "tokenizer_2", "vae"):  # the refiner's are the base's
            shutil.copytree(base_dir / shared, tmp / shared)
        _commit(tmp, refiner_dir)
        log.info("built %s in %.0fs", refiner_dir, time.monotonic() - started)
    return base_dir, refiner_dir


def build_tiny(work: Path) -> tuple[Path, Path]:
    from gpu_worker.engines.tiny_sdxl import build_tiny_refiner, build_tiny_sdxl

    return build_tiny_sdxl(work / "tiny-sdxl"), build_tiny_refiner(work / "tiny-sdxl-refiner")


# -- measuring ------------------------------------------------------------------------------------------


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def free(device: str) -> None:
    import torch._dynamo

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    if hasattr(torch.compiler, "set_stance"):
        torch.compiler.set_stance("default")


def reset_memory(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(torch.device(device))


def max_memory_gib(device: str) -> float | None:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(torch.device(device)) / 2**30
    return None


def measure_peak(device: str) -> tuple[float, str]:
    """Dense matmul TFLOP/s: bf16 on a GPU, fp32 on a CPU (the dtype each runs fast)."""
    cuda = device.startswith("cuda")
    n, dtype, iters = (8192, torch.bfloat16, 100) if cuda else (512, torch.float32, 10)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    started = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    seconds = time.perf_counter() - started
    return 2 * n**3 * iters / seconds / 1e12, str(dtype).removeprefix("torch.")


def timed(run: Callable[[], Any], *, device: str, repeats: int, warm_ups: int) -> list[float]:
    for _ in range(warm_ups):
        run()
    times = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - started)
    return times


def fill(row: Row, times: list[float], device: str) -> Row:
    row.seconds_per_image = statistics.mean(times)
    row.seconds_min = min(times)
    row.images_per_s = 1.0 / row.seconds_per_image
    row.max_memory_gib = max_memory_gib(device)
    return row


class Report:
    """The run's facts and rows; written out (JSON and Markdown, each replaced whole) after every row."""

    def __init__(self, args: argparse.Namespace, facts: dict[str, Any]):
        self.args = args
        self.facts = facts
        self.rows: list[Row] = []
        self.flops: dict[str, int] = {}
        self.started = time.monotonic()

    def guarded(self, row: Row, measure: Callable[[Row], Row]) -> Row:
        try:
            measure(row)
        except Exception as exc:  # one setup failing (e.g. out of memory) still reports the others
            log.exception("setup %s %dx%d failed", row.setup, row.width, row.height)
            row.error = f"{type(exc).__name__}: {exc}"[:500]
        self.add(row)
        return row

    def add(self, row: Row) -> None:
        row.elapsed_s = time.monotonic() - self.started
        flops = self.flops.get(flops_key(row.width, row.setup.endswith("+refiner")))
        peak = self.facts["peak_tflops"]
        if flops and not row.error:
            row.tflop_per_image = flops / 1e12
            row.achieved_tflops = row.tflop_per_image / row.seconds_per_image
            row.pct_of_peak = 100 * row.achieved_tflops / peak if peak else None
        self.rows.append(row)
        self.write()
        if row.error:
            print(f"{row.setup} {row.width}x{row.height}: failed: {row.error}", flush=True)
        else:
            rate = f", {row.achieved_tflops:.3g} TFLOP/s, {row.pct_of_peak:.1f} % of peak" if row.achieved_tflops else ""
            print(f"{row.setup} {row.width}x{row.height}: {row.seconds_per_image:.3f} s/image{rate} "
                  f"(after {row.elapsed_s:.0f}s)", flush=True)

    def as_dict(self) -> dict[str, Any]:
        return {**self.facts, "flops": self.flops, "results": [asdict(row) for row in self.rows]}

    def write(self) -> None:
        report = self.as_dict()
        if self.args.json:
            write_whole(Path(self.args.json), json.dumps(report, indent=2))
        if self.args.markdown:
            write_whole(Path(self.args.markdown), markdown(report) + "\n")


def write_whole(path: Path, text: str) -> None:
    """Replaces the file at once: a reader (or a run killed meanwhile) never sees half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def flops_key(side: int, refiner: bool) -> str:
    return f"{side}x{side}{'+refiner' if refiner else ''}"


def count_once(report: Report, key: str, count: Callable[[], int]) -> None:
    if key in report.flops:
        return
    try:
        report.flops[key] = count()
    except Exception as exc:
        log.warning("FLOP count of %s failed: %s", key, exc)


def flops_by_steps(image_at: Callable[[int], Callable[[], Any]], steps: int) -> int:
    """One image's FLOPs at `steps`, from counts at 1 and 2 steps (each step costs the same)."""
    one, two = count_flops(image_at(1)), count_flops(image_at(2))
    return one + (steps - 1) * (two - one)


def generator() -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(0)


# -- setups -------------------------------------------------------------------------------------------


def bench_diffusers(args, base_dir: Path, refiner_dir: Path, report: Report) -> None:
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    reset_memory(args.device)
    base = StableDiffusionXLPipeline.from_pretrained(base_dir, dtype=dtype, local_files_only=True).to(args.device)
    base.set_progress_bar_config(disable=True)

    def image(side: int, steps: int) -> Callable[[], Any]:
        return lambda: base(
            PROMPT, negative_prompt=NEGATIVE, width=side, height=side, num_inference_steps=steps,
            guidance_scale=GUIDANCE, generator=generator(),
        ).images[0]

    for side in [args.size, *args.sizes]:
        count_once(report, flops_key(side, False), lambda side=side: flops_by_steps(
            lambda steps: image(side, steps), args.steps))
        report.guarded(Row("diffusers", side, side, args.steps), lambda row, side=side: fill(
            row, timed(image(side, args.steps), device=args.device, repeats=args.repeats, warm_ups=1), args.device))
    if args.refiner:
        refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
            refiner_dir, dtype=dtype, text_encoder_2=base.text_encoder_2, vae=base.vae, local_files_only=True
        ).to(args.device)
        refiner.set_progress_bar_config(disable=True)

        def ensemble() -> Any:
            common = dict(negative_prompt=NEGATIVE, num_inference_steps=args.steps, guidance_scale=GUIDANCE)
            latents = base(
                PROMPT, width=args.size, height=args.size, denoising_end=SPLIT, output_type="latent",
                generator=generator(), **common,
            ).images
            return refiner(PROMPT, image=latents, denoising_start=SPLIT, generator=generator(), **common).images[0]

        count_once(report, flops_key(args.size, True), lambda: count_flops(ensemble))
        report.guarded(Row("diffusers+refiner", args.size, args.size, args.steps), lambda row: fill(
            row, timed(ensemble, device=args.device, repeats=args.repeats, warm_ups=1), args.device))


def bench_tutorial(args, base_dir: Path, report: Report) -> None:
    from diffusers import StableDiffusionXLPipeline

    cuda = args.device.startswith("cuda")
    reset_memory(args.device)
    pipe = StableDiffusionXLPipeline.from_pretrained(
        base_dir, dtype=torch.float16 if cuda else torch.float32, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    note = "fp16, model CPU offload, UNet compiled with reduce-overhead"
    if cuda:
        pipe.enable_model_cpu_offload(device=args.device)
        pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead")
    else:
        pipe.to(args.device)
        note = "fp32 on CPU: offload and compile need a GPU"

    def image() -> Any:
        return pipe(
            PROMPT, negative_prompt=NEGATIVE, width=args.size, height=args.size, num_inference_steps=args.steps,
            guidance_scale=GUIDANCE, generator=generator(),
        ).images[0]

    report.guarded(Row("tutorial", args.size, args.size, args.steps, note=note), lambda row: fill(
        row, timed(image, device=args.device, repeats=args.repeats, warm_ups=2 if cuda else 1), args.device))


def load_engine(args, base_dir: Path, refiner_dir: Path, *, quantize: str = "none") -> tuple[Any, float]:
    from gpu_worker.engines.sdxl import SdxlEngine, SdxlSettings

    started = time.monotonic()
    engine = SdxlEngine.load(SdxlSettings(
        model=str(base_dir),
        refiner=str(refiner_dir) if args.refiner else None,
        device=args.device,
        threads=args.threads,
        compile=args.engine_compile,
        compile_mode=args.compile_mode,
        compile_buckets=",".join(f"{s}x{s}" for s in [args.size, *args.sizes]),
        compile_cache=str(args.work_dir / "compile-cache"),
        max_batch=args.batch if quantize == "none" else 1,
        quantize=quantize,
    ))
    return engine, time.monotonic() - started


def engine_task(args, side: int, use_refiner: bool = False) -> Any:
    from gpu_worker.engines.base import GenerationTask

    return GenerationTask(
        job_id="bench", prompt=PROMPT, negative_prompt=NEGATIVE, width=side, height=side,
        steps=args.steps, guidance=GUIDANCE, seed=0, use_refiner=use_refiner, refiner_split=SPLIT,
    )


def bench_engine(args, base_dir: Path, refiner_dir: Path, report: Report) -> Any:
    """The engine's rows; returns its image at the main size (seed 0), for the float8 comparison."""
    import dataclasses

    reset_memory(args.device)
    engine, startup_s = load_engine(args, base_dir, refiner_dir)
    report.facts["engine_startup_s"] = startup_s
    report.facts["engine_compile_buckets"] = ",".join(f"{s}x{s}" for s in [args.size, *args.sizes]) if args.device.startswith("cuda") else ""
    images: dict[tuple[int, bool], Any] = {}

    def image(side: int, use_refiner: bool, steps: int | None = None) -> Callable[[], Any]:
        task = engine_task(args, side, use_refiner)
        if steps is not None:
            task = dataclasses.replace(task, steps=steps)

        def run() -> Any:
            images[side, use_refiner] = engine.generate(task, lambda *_: None)
            return images[side, use_refiner]

        return run

    configs = [(args.size, False)] + ([(args.size, True)] if args.refiner else []) + [(s, False) for s in args.sizes]
    for side, use_refiner in configs:
        if use_refiner:
            count_once(report, flops_key(side, True), lambda side=side: count_flops(image(side, True)))
        else:
            count_once(report, flops_key(side, False), lambda side=side: flops_by_steps(
                lambda steps: image(side, False, steps), args.steps))
        name = "engine+refiner" if use_refiner else "engine"
        note = f"start-up {startup_s:.0f}s (load, compile, warm-up)" if (side, use_refiner) == configs[0] else ""
        report.guarded(Row(name, side, side, args.steps, note=note), lambda row, side=side, use_refiner=use_refiner: fill(
            row, timed(image(side, use_refiner), device=args.device, repeats=args.repeats, warm_ups=1), args.device))
    report.facts["engine_flops_per_image"] = report.flops.get(flops_key(args.size, False), 0)
    if args.samplers:
        from gpu_worker.engines.schedulers import SCHEDULER_SPECS

        for name in SCHEDULER_SPECS:
            task = dataclasses.replace(engine_task(args, args.size), scheduler=name)
            run = lambda task=task: engine.generate(task, lambda *_: None)  # noqa: E731

            def strict(row: Row, run=run) -> Row:
                stance = torch.compiler.set_stance("fail_on_recompile") if engine_compiled(engine) else nullcontext()
                with stance:  # a guard failing here would have been a silent eager run in the worker
                    return fill(row, timed(run, device=args.device, repeats=1, warm_ups=0), args.device)

            report.guarded(Row(f"engine {name}", args.size, args.size, args.steps), strict)
    if args.batch > 1:
        tasks = [dataclasses.replace(engine_task(args, args.size), seed=seed) for seed in range(args.batch)]
        batch = lambda: engine.generate_batch(tasks, [lambda *_: None] * len(tasks))  # noqa: E731

        def per_image(row: Row) -> Row:
            times = timed(batch, device=args.device, repeats=args.repeats, warm_ups=1)
            return fill(row, [t / args.batch for t in times], args.device)

        report.guarded(Row(f"engine batch {args.batch}", args.size, args.size, args.steps, note="s/image: a call's time / its images"), per_image)
    return images.get((args.size, False))


def engine_compiled(engine: Any) -> bool:
    from gpu_worker.engines.speedups import is_compiled

    return is_compiled(engine._base.unet)


def bench_fp8(args, base_dir: Path, refiner_dir: Path, report: Report, fp16_image: Any) -> None:
    """The engine with --quantize fp8 at the main size, and how far its image is from the fp16 one."""
    import numpy as np

    row = Row("engine+fp8", args.size, args.size, args.steps)

    def measure(row: Row) -> Row:
        reset_memory(args.device)
        engine, startup_s = load_engine(args, base_dir, refiner_dir, quantize="fp8")
        task = engine_task(args, args.size)
        last: list[Any] = []
        run = lambda: last.append(engine.generate(task, lambda *_: None))  # noqa: E731
        fill(row, timed(run, device=args.device, repeats=args.repeats, warm_ups=1), args.device)
        row.note = f"start-up {startup_s:.0f}s"
        if fp16_image is not None:
            a = np.asarray(last[-1], dtype=np.float64)
            b = np.asarray(fp16_image, dtype=np.float64)
            row.image_mad = float(np.abs(a - b).mean())
            mse = float(((a - b) ** 2).mean())
            row.image_psnr_db = float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)
            row.note += f"; vs fp16 image: mean |diff| {row.image_mad:.2f}/255, PSNR {row.image_psnr_db:.1f} dB"
        return row

    report.guarded(row, measure)


def count_flops(run: Callable[[], Any]) -> int:
    """FLOPs of one image, counted on the eager model (compiled graphs hide their ops from the counter)."""
    from contextlib import nullcontext

    from torch.utils.flop_counter import FlopCounterMode

    stance = torch.compiler.set_stance("force_eager") if hasattr(torch.compiler, "set_stance") else nullcontext()
    counter = FlopCounterMode(display=False)
    with stance, counter:
        run()
    return counter.get_total_flops()


# -- report ---------------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    def num(value: float | None, fmt: str) -> str:
        return "" if value is None else format(value, fmt)

    lines = [
        f"SDXL on {report['device_name']} ({report['device']}), torch {report['torch']}, diffusers {report['diffusers']}, "
        f"batch 1, {report['steps']} steps, "
        f"mean of {report['repeats']}; matmul peak {report['peak_tflops']:.3g} TFLOP/s ({report['peak_dtype']})",
        "",
        "| setup | size | s/image | images/s | TFLOP/image | TFLOP/s | % of peak | max GiB | note |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in report["results"]:
        if row["error"]:
            lines.append(f"| {row['setup']} | {row['width']}x{row['height']} | failed | | | | | | {row['error'][:120]} |")
            continue
        lines.append(
            f"| {row['setup']} | {row['width']}x{row['height']} | {row['seconds_per_image']:.3f} | "
            f"{row['images_per_s']:.3f} | {num(row['tflop_per_image'], '.3g')} | {num(row['achieved_tflops'], '.3g')} | "
            f"{num(row['pct_of_peak'], '.0f')} | {num(row['max_memory_gib'], '.1f')} | {row['note']} |"
        )
    return "\n".join(lines)


SETUPS = ("diffusers", "engine", "tutorial")  # in the order they run: the engine before the slow tutorial


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny-sdxl on the CPU: checks the script, measures nothing real")
    p.add_argument("--device", default=None, help="cuda:N or cpu (default: cuda:0 when there is one; cpu with --tiny)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (30; 3 with --tiny)")
    p.add_argument("--repeats", type=int, default=None, help="timed images per row, after one untimed (3; 1 with --tiny)")
    p.add_argument("--size", type=int, default=None, help="main square size (1024; 64 with --tiny)")
    p.add_argument("--sizes", default="", help="other square sizes, comma-separated, e.g. 512,768,1536 (default: none)")
    p.add_argument("--setups", default=",".join(SETUPS), help="which setups to run, comma-separated")
    p.add_argument("--refiner", action="store_true", help="add the base + refiner rows (diffusers and engine)")
    p.add_argument("--samplers", action="store_true", help="add an engine row per sampler, each refused if it would leave the compiled graph")
    p.add_argument("--batch", type=int, default=1, help="add an engine row making this many images per call (--max-batch); s/image is per image")
    p.add_argument("--fp8", action="store_true", help="add the engine with --quantize fp8, and its image difference from fp16")
    p.add_argument("--engine-compile", default="auto", choices=["auto", "on", "off"], help="the engine's --compile")
    p.add_argument("--compile-mode", default="default", help="the engine's --compile-mode")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--budget-s", type=float, default=240.0, help="a setup not started this many seconds into the run is skipped (its row says so)")
    p.add_argument("--work-dir", default=None, help="where the random-weight models are built (kept for reuse)")
    p.add_argument("--json", default=None, help="write the results as JSON here")
    p.add_argument("--markdown", default=None, help="write the table as markdown here")
    args = p.parse_args(argv)
    tiny = args.tiny
    args.device = args.device or ("cpu" if tiny or not torch.cuda.is_available() else "cuda:0")
    args.steps = args.steps if args.steps is not None else (3 if tiny else 30)
    args.repeats = args.repeats if args.repeats is not None else (1 if tiny else 3)
    args.size = args.size if args.size is not None else (64 if tiny else 1024)
    for name in ("steps", "repeats", "threads", "batch"):
        if getattr(args, name) < 1:
            p.error(f"argument --{name}: must be at least 1, got {getattr(args, name)}")
    sizes = args.sizes
    try:
        args.sizes = [int(s) for s in sizes.split(",") if s.strip()]
    except ValueError:  # not bench.common's `counts`: this script runs where bench.common's imports are missing
        p.error(f"argument --sizes: {sizes!r} is not a comma-separated list of whole numbers")
    for side in (args.size, *args.sizes):
        if side < 8 or side % 8:
            p.error(f"image sizes must be positive multiples of 8, got {side}")
    args.setups = {s.strip() for s in args.setups.split(",") if s.strip()}
    if not args.setups or args.setups - set(SETUPS):
        p.error(f"argument --setups: {', '.join(sorted(args.setups - set(SETUPS))) or 'none given'}; known: {', '.join(SETUPS)}")
    default_work = Path(tempfile.gettempdir()) / ("imagegen-bench-tiny" if tiny else "imagegen-bench")
    args.work_dir = Path(args.work_dir) if args.work_dir else default_work
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import diffusers

    cuda = args.device.startswith("cuda")
    name = torch.cuda.get_device_name(torch.device(args.device)) if cuda else platform.processor() or "cpu"
    print(f"device {name} ({args.device}), torch {torch.__version__}, diffusers {diffusers.__version__}", flush=True)
    started = time.monotonic()
    if args.tiny:
        base_dir, refiner_dir = build_tiny(args.work_dir)
    else:
        base_dir, refiner_dir = build_full_sdxl(args.work_dir, args.device)
    peak, peak_dtype = measure_peak(args.device)
    print(f"models ready in {time.monotonic() - started:.0f}s; matmul peak {peak:.3g} TFLOP/s ({peak_dtype})", flush=True)
    report = Report(args, {
        "device": args.device,
        "device_name": name,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "command": " ".join(["python", "bench/gpu.py", *(argv if argv is not None else sys.argv[1:])]),
        "tiny": args.tiny,
        "steps": args.steps,
        "repeats": args.repeats,
        "guidance": GUIDANCE,
        "refiner_split": SPLIT,
        "peak_tflops": peak,
        "peak_dtype": peak_dtype,
    })
    report.write()
    fp16_image = None
    for setup in SETUPS:
        if setup not in args.setups:
            continue
        spent = time.monotonic() - started
        if spent > args.budget_s:
            report.add(Row(setup, args.size, args.size, args.steps, error=f"skipped: {spent:.0f}s spent, over --budget-s {args.budget_s:g}"))
            continue
        if setup == "diffusers":
            bench_diffusers(args, base_dir, refiner_dir, report)
        elif setup == "engine":
            fp16_image = bench_engine(args, base_dir, refiner_dir, report)
            free(args.device)
            if args.fp8:
                bench_fp8(args, base_dir, refiner_dir, report, fp16_image)
        else:
            bench_tutorial(args, base_dir, report)
        free(args.device)  # each setup's models are gone once its function returns
    print(markdown(report.as_dict()))
    return 0 if all(row.error is None for row in report.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
