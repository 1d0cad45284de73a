"""Picks and loads the engine that `--model` names.

The SDXL engine is loaded, warmed up and run on one thread of its own (`engine.executor`, a
single-thread executor the worker hands every job to): torch keeps CUDA-graph state per thread, so
graphs recorded at warm-up (`--compile-mode reduce-overhead` / `max-autotune`) replay only there.
"""

from __future__ import annotations

import logging
import os
from dataclasses import fields
from pathlib import Path

from gpu_worker.engines.base import Engine
from gpu_worker.engines.options import EngineOptions
from gpu_worker.job_context import ContextThreadPool
from gpu_worker.settings import WorkerSettings
from gpu_worker.engines.simulated import SIMULATED, SimulatedEngine

log = logging.getLogger("imagegen.worker")

TINY_SDXL = "tiny-sdxl"
TINY_REFINER = "tiny-sdxl-refiner"


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    return "cuda:0" if cuda_available() else "cpu"


def resolve_model(model: str) -> str:
    if model != "auto":
        return model
    if cuda_available():
        from gpu_worker.engines.sdxl import SDXL_BASE

        return SDXL_BASE
    log.warning("no CUDA device: serving tiny-sdxl (random weights, it draws noise); pass --model for SDXL")
    return TINY_SDXL


def quiet_libraries() -> None:
    """Keeps the log to the service's own lines: transformers' and diffusers' notices (a missing
    torchvision, dtype casts) and progress bars go, unless the log level is DEBUG."""
    if logging.getLogger().isEnabledFor(logging.DEBUG):
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (transformers_logging, diffusers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()


def load_engine(settings: WorkerSettings) -> Engine:
    model = resolve_model(settings.model)
    if model == SIMULATED:
        return SimulatedEngine(
            step_s=settings.sim_step_s,
            step_s_per_mpx=settings.sim_step_s_per_mpx,
            fixed_s=settings.sim_fixed_s,
            refiner_step_factor=settings.sim_refiner_step_factor,
            refiner_fixed_s=settings.sim_refiner_fixed_s,
            fail_marker=settings.sim_fail_marker,
        )
    quiet_libraries()
    from gpu_worker.engines.sdxl import SdxlEngine, SdxlSettings

    device = resolve_device(settings.device)
    path, refiner, name = model, settings.refiner, model
    if model == TINY_SDXL:
        from gpu_worker.engines import tiny_sdxl

        root = Path(settings.data_dir or ".") / "models"
        path = str(tiny_sdxl.build_tiny_sdxl(root / TINY_SDXL))
        if refiner in (None, TINY_REFINER):
            refiner = str(tiny_sdxl.build_tiny_refiner(root / TINY_REFINER))
    elif refiner == TINY_REFINER:
        raise ValueError("--refiner tiny-sdxl-refiner goes only with --model tiny-sdxl")
    cache = settings.compile_cache or (str(Path(settings.data_dir) / "compile-cache") if settings.data_dir else "")
    options = {field.name: getattr(settings, field.name) for field in fields(EngineOptions)}
    sdxl = SdxlSettings(
        **{**options, "refiner": refiner, "compile_cache": cache},
        model=path,
        device=device,
        default_steps=4 if model == TINY_SDXL else 30,
        models_dir=str(Path(settings.data_dir or ".") / "models"),
    )
    thread = engine_thread()
    try:
        engine = thread.submit(SdxlEngine.load, sdxl, name=name).result()
    except BaseException:
        thread.shutdown(wait=False, cancel_futures=True)
        raise
    engine.executor = thread
    return engine


def engine_thread() -> ContextThreadPool:
    """The one thread an engine is loaded, warmed up and run on."""
    return ContextThreadPool(max_workers=1, thread_name_prefix="imagegen-engine")
