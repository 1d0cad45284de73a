"""The SDXL engine: diffusers' StableDiffusionXLPipeline, with the refiner taking over the last steps.

`--model` is a hub id (stabilityai/stable-diffusion-xl-base-1.0), a local folder, or `tiny-sdxl`
(built locally with small random weights and loaded through the same `from_pretrained` path).

The engine loads the pipelines (base, optional refiner, LoRAs, ControlNets, speed-ups, the compile
warm-up) and runs every job through the stage runner (`stages.py`): a request without stages is its
implicit plan (one sample stage; two handing over with the refiner), so text-to-image, image-to-image,
inpainting, base + refiner and the plans of the hires fix and ControlNets share one code path. A job
picks the LoRA mix it asks for; progress is reported after every step of every stage; the step callback
may raise JobCancelled, which stops the job at that step boundary. Out of GPU memory fails only that
job, with a clear reason, after the memory is given back.

Several text-to-image jobs that differ only in prompt and seed (`batch_key`) run as one batch through
the same runner (`generate_batch`): one generator per image, so each image's noise is the one its job
draws alone; a job cancelled mid-batch drops out while the others go on. Out of memory, a batch's jobs
run again one by one.

Image-to-image, inpainting and the ControlNet stages run on pipelines built from the loaded base (and
refiner) components on first use (`_derived_pipe`, `controlnet.pipeline`), so no weight is loaded twice.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from gpu_worker.engines.base import GenerationTask, StepCallback
from gpu_worker.errors import JobFailed
from gpu_worker.engines.options import EngineOptions

log = logging.getLogger("imagegen.worker.sdxl")

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_REFINER = "stabilityai/stable-diffusion-xl-refiner-1.0"
WARM_UP_STEPS = 4


@dataclass(frozen=True, kw_only=True)
class SdxlSettings(EngineOptions):
    """What the engine loads and how: the worker's engine options (engines.options), resolved (a model
    path, a device), and the engine's own."""

    model: str = SDXL_BASE
    device: str = "cpu"
    default_steps: int = 30
    default_guidance: float = 5.0
    vae_tiling_min_pixels: int = 1536 * 1536  # vae_tiling auto: tiles above this
    models_dir: str = "."  # where tiny-controlnet is built
    compile_backend: str = "inductor"  # the Dynamo backend; tests trace with "eager" to stay quick on a CPU


def _torch_dtype(name: str, device: str) -> Any:
    import torch

    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _local_only(source: str) -> bool:
    return Path(source).is_dir() or bool(os.environ.get("HF_HUB_OFFLINE"))


def _load_vae(source: str, dtype: Any) -> Any:
    from diffusers import AutoencoderKL

    subfolder = "vae" if (Path(source) / "vae" / "config.json").is_file() else None
    return AutoencoderKL.from_pretrained(source, subfolder=subfolder, dtype=dtype, local_files_only=_local_only(source))


def _checked_speedups(settings: SdxlSettings) -> Any:
    """The speed-ups the settings ask for on their device; raises ValueError naming a setting that cannot be."""
    import torch

    from gpu_worker.engines import speedups as sp
    from gpu_worker.engines.decode import DTYPE_NAMES
    from gpu_worker.engines.quantize import refusal

    device = settings.device
    problem = refusal(settings.quantize, device)
    if problem:
        raise ValueError(problem)
    if settings.quantize != "none" and settings.offload:
        raise ValueError("--quantize fp8 and --offload do not go together: float8 weights stay on the GPU")
    if device == "cpu":
        torch.set_num_threads(max(1, settings.threads))
    if settings.vae_tiling not in sp.FLAG_VALUES:
        raise ValueError(f"--vae-tiling: expected one of {', '.join(sp.FLAG_VALUES)}, got {settings.vae_tiling!r}")
    if settings.vae_dtype not in DTYPE_NAMES:
        raise ValueError(f"--vae-dtype: expected one of {', '.join(DTYPE_NAMES)}, got {settings.vae_dtype!r}")
    if settings.compile_mode not in sp.COMPILE_MODES:
        raise ValueError(f"--compile-mode: expected one of {', '.join(sp.COMPILE_MODES)}, got {settings.compile_mode!r}")
    return sp.Speedups(
        channels_last=sp.flag_on(settings.channels_last, device),
        fuse_qkv=sp.flag_on(settings.fuse_qkv, device),
        compile=sp.flag_on(settings.compile, device) and not settings.offload,
        compile_mode=settings.compile_mode,
        compile_backend=settings.compile_backend,
        buckets=sp.parse_buckets(settings.compile_buckets),
        batch_sizes=tuple(range(1, max(1, settings.max_batch) + 1)),
    )


def _load_pipelines(settings: SdxlSettings, dtype: Any) -> tuple[Any, Any, dict[str, Any], Any]:
    """(base pipeline, refiner pipeline or None, ControlNets by name, LoRA set), still on the CPU."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    from gpu_worker.engines import controlnet
    from gpu_worker.engines.lora import LoraSet, parse_lora_specs

    adapters = parse_lora_specs(settings.loras)
    extra = {"vae": _load_vae(settings.vae, dtype)} if settings.vae else {}
    base = StableDiffusionXLPipeline.from_pretrained(
        settings.model, dtype=dtype, local_files_only=_local_only(settings.model), **extra
    )
    base.set_progress_bar_config(disable=True)
    # before LoRAs and speedups touch the UNet: tiny-controlnet is made from its plain weights
    controlnets = controlnet.load(
        settings.controlnets, base=base, dtype=dtype, device=settings.device, models_dir=Path(settings.models_dir)
    )
    loras = LoraSet.load(base, adapters)
    refiner = None
    if settings.refiner:
        refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
            settings.refiner,
            dtype=dtype,
            text_encoder_2=base.text_encoder_2,
            vae=base.vae,
            local_files_only=_local_only(settings.refiner),
        )
        refiner.set_progress_bar_config(disable=True)
    return base, refiner, controlnets, loras


def _place(settings: SdxlSettings, speedups: Any, base: Any, refiner: Any, *, has_loras: bool, decode_dtype: Any) -> list[Any]:
    """Puts the VAE in its decode dtype, applies the speed-ups, moves (or offloads) the pipelines to the
    device and quantizes; returns the UNets."""
    from gpu_worker.engines import speedups as sp
    from gpu_worker.engines.quantize import quantize_fp8

    if base.vae.dtype != decode_dtype:
        base.vae.to(dtype=decode_dtype)
    unets = [base.unet] + ([refiner.unet] if refiner is not None else [])
    sp.apply_to_modules(speedups, unets=unets, vae=base.vae, has_loras=has_loras)
    for pipe in (base, refiner):
        if pipe is None:
            continue
        if settings.offload:
            pipe.enable_model_cpu_offload(device=settings.device)
        else:
            pipe.to(settings.device)
    if settings.quantize == "fp8":
        converted = sum(quantize_fp8(unet) for unet in unets)
        log.info("float8: %d linear layers of the UNets' transformer blocks converted", converted)
    return unets


@dataclass(kw_only=True)
class SdxlEngine:
    settings: SdxlSettings
    name: str = ""
    device: str = "cpu"
    default_steps: int = 30
    default_guidance: float = 5.0
    has_refiner: bool = False
    lora_names: tuple[str, ...] = ()
    controlnet_names: tuple[str, ...] = ()
    model_sha256: str | None = None  # gpu_worker.model_hash: its UNet weights' sha256, when they are on this disk
    executor: Any = None  # the engine thread (engines.load_engine sets it); None: the caller's thread
    loaded_on: int = 0  # the thread ident that loaded the weights (and recorded any CUDA graph)
    ran_on: set[int] = field(default_factory=set)  # the thread idents that ran jobs
    _base: Any = field(default=None, repr=False)
    _refiner: Any = field(default=None, repr=False)
    _loras: Any = field(default=None, repr=False)
    _decoder: Any = field(default=None, repr=False)
    _scheduler_configs: dict[str, Any] = field(default_factory=dict, repr=False)
    _derived: dict[str, Any] = field(default_factory=dict, repr=False)
    _controlnets: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, settings: SdxlSettings, *, name: str | None = None) -> "SdxlEngine":
        from gpu_worker.engines.decode import LatentDecoder, bf16_native, pick_decode_dtype
        from gpu_worker.model_hash import model_sha256

        speedups = _checked_speedups(settings)
        device = settings.device
        dtype = _torch_dtype(settings.dtype, device)
        base, refiner, controlnets, loras = _load_pipelines(settings, dtype)
        decode_dtype = pick_decode_dtype(
            settings.vae_dtype,
            model_dtype=dtype,
            device=device,
            force_upcast=bool(getattr(base.vae.config, "force_upcast", True)),
            bf16_native=bf16_native(device),
        )
        unets = _place(settings, speedups, base, refiner, has_loras=bool(loras.names), decode_dtype=decode_dtype)
        engine = cls(
            settings=settings,
            name=name or settings.model,
            device=device,
            default_steps=settings.default_steps,
            default_guidance=settings.default_guidance,
            has_refiner=refiner is not None,
            lora_names=loras.names,
            controlnet_names=tuple(controlnets),
            _controlnets=controlnets,
            model_sha256=model_sha256(base.unet.config.get("_name_or_path")),
            loaded_on=threading.get_ident(),
            _base=base,
            _refiner=refiner,
            _loras=loras,
            _decoder=LatentDecoder(
                vae=base.vae,
                image_processor=base.image_processor,
                dtype=decode_dtype,
                tiling=settings.vae_tiling,
                tiling_min_pixels=settings.vae_tiling_min_pixels,
                watermark=getattr(base, "watermark", None),
            ),
            _scheduler_configs={
                "base": base.scheduler.config,
                **({"refiner": refiner.scheduler.config} if refiner is not None else {}),
            },
        )
        log.info(
            "loaded model=%s refiner=%s device=%s dtype=%s vae_decode=%s loras=%s offload=%s quantize=%s speedups=%s",
            settings.model, settings.refiner, device, dtype, decode_dtype,
            ",".join(loras.names) or "none", settings.offload, settings.quantize, speedups.describe(),
        )
        if speedups.compile:
            engine._compile(speedups, unets)
        return engine

    def _compile(self, speedups: Any, unets: list[Any]) -> None:
        """Compiles the UNets, traces them at every bucket and batch size, then freezes the graphs."""
        from gpu_worker.engines import speedups as sp

        started = time.monotonic()
        cache = sp.use_compile_cache(self.settings.compile_cache) if speedups.compile_backend == "inductor" else ""
        hits, misses = sp.cache_counts()
        sp.compile_unets(speedups, unets)
        self._warm_up(speedups.buckets, speedups.batch_sizes)
        sp.freeze_compiled()
        hits, misses = sp.cache_counts()[0] - hits, sp.cache_counts()[1] - misses
        log.info(
            "compile warm-up took %.1fs for %d bucket(s) x %d batch size(s) x %d UNet(s); %s",
            time.monotonic() - started, len(speedups.buckets), len(speedups.batch_sizes), len(unets),
            f"Inductor cache {cache}: {hits} graph(s) reused, {misses} compiled" if cache
            else f"backend {speedups.compile_backend}: no Inductor cache",
        )

    def _warm_up(self, buckets: tuple[tuple[int, int], ...], batch_sizes: tuple[int, ...] = (1,)) -> None:
        for width, height in buckets:
            for size in batch_sizes:
                started = time.monotonic()
                tasks = [
                    GenerationTask(
                        job_id="compile-warm-up",
                        prompt="warm-up",
                        negative_prompt="",
                        width=width,
                        height=height,
                        steps=WARM_UP_STEPS,
                        guidance=self.default_guidance,
                        seed=seed,
                        use_refiner=self.has_refiner,
                    )
                    for seed in range(size)
                ]
                if size == 1:
                    self.generate(tasks[0], lambda *_: None)
                else:
                    self.generate_batch(tasks, [lambda *_: None] * size)
                log.info("compiled and warmed up %dx%d, batch %d, in %.1fs", width, height, size, time.monotonic() - started)

    # -- the plan's numbers -------------------------------------------------------------------------

    def refiner_steps(self, task: GenerationTask) -> int:
        """How many of the task's steps run on the refiner (0 when it cannot run)."""
        from gpu_worker.engines.stage_sample import Sample
        from gpu_worker.engines.stages import plan_of

        if not self.has_refiner:
            return 0
        try:
            return sum(stage.runs for stage in plan_of(self, task) if isinstance(stage, Sample) and stage.model == "refiner")
        except JobFailed:
            return 0

    def batch_key(self, task: GenerationTask) -> tuple | None:
        """Tasks with equal keys can run as one pipeline call; None: this task runs alone."""
        if task.init_image is not None or task.mask_image is not None or task.stages or self.settings.offload:
            return None  # image-to-image, inpainting and a request's own stages run alone
        return (
            task.width, task.height, task.steps, task.guidance, task.scheduler, task.use_refiner,
            task.refiner_split, task.loras, bool(task.negative_prompt), task.eta,
        )

    # -- running ----------------------------------------------------------------------------------

    def generate(self, task: GenerationTask, on_step: StepCallback) -> Image.Image:
        from gpu_worker.engines.stages import run_plan
        from gpu_worker.memory import OUT_OF_MEMORY, free_device_memory, memory_note

        self.ran_on.add(threading.get_ident())
        self._loras.select(self._base, task.loras)
        try:
            [outcome] = run_plan(self, [task], [on_step])
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome
        except OUT_OF_MEMORY:
            log.debug("job %s: out of memory; freeing it", task.job_id)
        finally:
            if self.settings.offload:
                for pipe in (self._base, self._refiner):
                    if pipe is not None:
                        pipe.maybe_free_model_hooks()
        free_device_memory()
        note = memory_note(self.device)
        what = f"{task.width}x{task.height}, {task.steps} steps" + (", refiner" if self.refiner_steps(task) else "")
        log.warning("job %s: out of GPU memory at %s%s", task.job_id, what, f" ({note})" if note else "")
        raise JobFailed(
            f"out of GPU memory at {what}{f' ({note})' if note else ''}; try a smaller size"
            + ("" if self.settings.offload else ", or start the worker with --offload on a small GPU")
        )

    def generate_batch(self, tasks: list[GenerationTask], on_steps: list[StepCallback]) -> list[Any]:
        """Runs tasks of one `batch_key` as one pipeline call per stage; returns, per task, its image or
        the exception that ended it (JobCancelled, JobFailed). A task whose callback raises JobCancelled
        is no longer told of steps; the call stops once every task is cancelled. Out of memory, the
        tasks run again one by one."""
        from gpu_worker.engines.stages import run_plan
        from gpu_worker.memory import OUT_OF_MEMORY, free_device_memory

        self.ran_on.add(threading.get_ident())
        if len(tasks) == 1 or len({self.batch_key(t) for t in tasks}) != 1 or self.batch_key(tasks[0]) is None:
            return [self._alone(task, on_step) for task, on_step in zip(tasks, on_steps)]
        self._loras.select(self._base, tasks[0].loras)
        try:
            return run_plan(self, tasks, on_steps)
        except JobFailed as exc:
            return [exc for _ in tasks]
        except OUT_OF_MEMORY:
            log.debug("batch of %d: out of memory; freeing it", len(tasks))
        free_device_memory()
        log.warning("batch of %d (%s): out of GPU memory; running its jobs one by one", len(tasks), tasks[0].job_id)
        return [self._alone(task, on_step) for task, on_step in zip(tasks, on_steps)]

    def _alone(self, task: GenerationTask, on_step: StepCallback) -> Any:
        from gpu_worker.errors import JobCancelled

        try:
            return self.generate(task, on_step)
        except (JobCancelled, JobFailed) as exc:
            return exc

    def _derived_pipe(self, kind: str) -> Any:
        """The base's `img2img` or `inpaint` pipeline, or the refiner's `refiner-inpaint` one, made on first
        use around the loaded modules (shared, not copied: LoRA selection, offload hooks and compiled UNets
        carry over)."""
        pipe = self._derived.get(kind)
        if pipe is not None:
            return pipe
        import inspect

        from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline

        source = self._refiner if kind == "refiner-inpaint" else self._base
        cls = StableDiffusionXLImg2ImgPipeline if kind == "img2img" else StableDiffusionXLInpaintPipeline
        accepted = inspect.signature(cls.__init__).parameters
        parts = {name: module for name, module in source.components.items() if name in accepted}
        options = {
            name: source.config[name]
            for name in ("force_zeros_for_empty_prompt", "requires_aesthetics_score")
            if name in source.config and name in accepted
        }
        pipe = cls(**parts, **options, add_watermarker=False)  # the decoder applies the watermark
        pipe.set_progress_bar_config(disable=True)
        self._derived[kind] = pipe
        log.info("built the %s pipeline from the loaded components", kind)
        return pipe
