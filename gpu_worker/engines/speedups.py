"""GPU speed-ups that leave the image as it is: channels-last, fused QKV projections, torch.compile.

Each is a flag of auto, on or off; auto means on with CUDA and off elsewhere, so a CPU worker runs the
plain eager model. torch.compile specialises on shapes, so the UNets are compiled for a fixed list of
resolution buckets (and batch sizes, 1 up to `--max-batch`), warmed up at start, and then frozen: a request at another size (or one that would
need another graph, such as a LoRA mix not seen at warm-up) runs eagerly instead of recompiling.

Inductor's artifacts (FX graphs, kernels, autotuning results) are kept in a cache folder under the data
dir (`use_compile_cache`), so a restart on the same machine, torch and GPU reuses them instead of
compiling again; the warm-up log line says how long it took and how many graphs came from that cache.

The compiled graph is called through a thin wrapper that hands it the timestep as float32 whatever the
sampler made it: Euler's timesteps are floats, DPM-Solver++, DDIM, UniPC and DEIS hand out int64 ones,
and a graph traced for one dtype would fail its guard on the other (a silent eager run, once frozen).
The UNet turns the timestep into a float embedding anyway, so the cast changes no value.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("imagegen.worker.speedups")

FLAG_VALUES = ("auto", "on", "off")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DEFAULT_BUCKETS = "1024x1024"
"""SDXL's native size; each bucket costs start-up time (a graph per UNet), e.g. add 1152x896,896x1152."""


def flag_on(value: str, device: str) -> bool:
    if value not in FLAG_VALUES:
        raise ValueError(f"expected one of {', '.join(FLAG_VALUES)}, got {value!r}")
    return value == "on" or (value == "auto" and device.startswith("cuda"))


def parse_buckets(text: str) -> tuple[tuple[int, int], ...]:
    """'1024x1024,1152x896' -> ((1024, 1024), (1152, 896)) as (width, height); raises ValueError."""
    buckets: list[tuple[int, int]] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        width, sep, height = part.lower().partition("x")
        if not sep or not width.isdigit() or not height.isdigit():
            raise ValueError(f"resolution bucket {part!r}: expected WIDTHxHEIGHT, e.g. 1024x1024")
        size = (int(width), int(height))
        if size[0] % 8 or size[1] % 8 or min(size) < 64:
            raise ValueError(f"resolution bucket {part!r}: sides must be multiples of 8, at least 64")
        if size not in buckets:
            buckets.append(size)
    return tuple(buckets)


@dataclass(frozen=True, kw_only=True)
class Speedups:
    channels_last: bool = False
    fuse_qkv: bool = False
    compile: bool = False
    compile_mode: str = "default"
    compile_backend: str = "inductor"  # another Dynamo backend ("eager", "aot_eager") traces without Inductor
    buckets: tuple[tuple[int, int], ...] = ()
    batch_sizes: tuple[int, ...] = (1,)  # images per engine call compiled for (1 up to --max-batch)

    def describe(self) -> str:
        on = [name for name in ("channels_last", "fuse_qkv") if getattr(self, name)]
        if self.compile:
            on.append(
                f"compile({self.compile_mode}; buckets {' '.join(f'{w}x{h}' for w, h in self.buckets)}; "
                f"batches {','.join(map(str, self.batch_sizes))})"
            )
        return ", ".join(on) or "none"


def apply_to_modules(speedups: Speedups, *, unets: list[Any], vae: Any, has_loras: bool) -> None:
    """Layout and projection changes, done once after the weights (and any LoRA) are loaded."""
    import torch

    if speedups.channels_last:
        for module in [*unets, vae]:
            module.to(memory_format=torch.channels_last)
    if speedups.fuse_qkv:
        if has_loras:
            log.info("fused QKV projections skipped: LoRA adapters act on the separate projections")
        else:
            for module in [*unets, vae]:
                module.fuse_qkv_projections()


def compile_unets(speedups: Speedups, unets: list[Any]) -> None:
    """Compiles each UNet's forward for static shapes; one graph per bucket is made at warm-up."""
    import torch
    import torch._dynamo
    import torch._inductor.config

    limit = max(8, 2 * len(speedups.buckets) * len(speedups.batch_sizes) + 4)
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), limit))
    torch._inductor.config.conv_1x1_as_mm = True
    inductor = speedups.compile_backend == "inductor"
    for unet in unets:
        compiled = torch.compile(
            unet.forward, backend=speedups.compile_backend, mode=speedups.compile_mode if inductor else None, dynamic=False
        )
        unet.forward = _float_timestep(compiled)
        unet.imagegen_compiled = True


def _float_timestep(compiled: Any) -> Any:
    """`compiled(sample, timestep, ...)` with the timestep always a float32 tensor on the sample's device."""
    import torch

    def forward(sample: Any, timestep: Any, *args: Any, **kwargs: Any) -> Any:
        if torch.is_tensor(timestep):
            timestep = timestep.to(dtype=torch.float32)
        else:  # a Python number would be specialised on: one graph per value
            timestep = torch.tensor(float(timestep), dtype=torch.float32, device=sample.device)
        return compiled(sample, timestep, *args, **kwargs)

    return forward


def is_compiled(unet: Any) -> bool:
    return bool(getattr(unet, "imagegen_compiled", False))


def use_compile_cache(directory: str) -> str:
    """Points Inductor's on-disk caches at `directory` (empty: torch's own, or TORCHINDUCTOR_CACHE_DIR
    when set) and turns on the FX graph and AOT autograd caches; returns the folder in use."""
    import os

    import torch._functorch.config
    import torch._inductor.config
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
    except ImportError:  # torch before 2.6
        from torch._inductor.runtime.runtime_utils import cache_dir

    if directory:
        os.makedirs(directory, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.abspath(directory)  # Triton's cache lies beneath it
    torch._inductor.config.fx_graph_cache = True
    torch._inductor.config.autotune_local_cache = True
    torch._functorch.config.enable_autograd_cache = True
    return cache_dir()


def cache_counts() -> tuple[int, int]:
    """(FX graphs loaded from the cache, FX graphs compiled) so far in this process."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]


def freeze_compiled() -> None:
    """From now on a shape without a compiled graph runs eagerly instead of triggering a recompile."""
    import torch

    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None:
        log.warning("this torch has no torch.compiler.set_stance: a size outside the buckets will recompile")
        return
    set_stance("eager_on_recompile")
