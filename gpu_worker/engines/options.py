"""The engine's options a worker is started with (--dtype, --vae, --lora, --compile, ...), declared once:
the worker's settings (gpu_worker.settings) and the SDXL engine's (engines.sdxl) both extend them, so a
flag, its default and its help live here only."""

from __future__ import annotations

from dataclasses import dataclass

from gpu_worker.engines.speedups import DEFAULT_BUCKETS
from schemas.request import DEFAULT_REFINER_SPLIT
from schemas.settings_fields import at_least_one, setting


@dataclass(frozen=True, kw_only=True)
class EngineOptions:
    refiner: str | None = setting(None, group="engine", help="refiner hub id or folder (tiny-sdxl-refiner with tiny-sdxl)")
    dtype: str = setting("auto", group="engine", choices=("auto", "fp32", "fp16", "bf16"), help="weights' dtype; auto: fp16 with CUDA, fp32 on a CPU")
    threads: int = setting(1, group="engine", help="torch CPU threads")
    refiner_split: float = setting(DEFAULT_REFINER_SPLIT, group="engine", help="with the refiner: fraction of the noise schedule the base denoises before handing over")
    vae: str | None = setting(None, group="engine", help="another VAE, hub id or folder, e.g. madebyollin/sdxl-vae-fp16-fix")
    vae_dtype: str = setting("auto", group="engine", choices=("auto", "fp32", "fp16", "bf16"), help="dtype of the VAE decode; auto: bf16 for an fp16 model whose VAE overflows in fp16")
    vae_tiling: str = setting("auto", group="engine", choices=("auto", "on", "off"), help="tiled VAE decode; auto: above 1536x1536 pixels")
    loras: tuple[str, ...] = setting((), group="engine", kind="list", flag="--lora", env="LORAS", metavar="NAME=SOURCE", help="load a LoRA adapter at start, from a folder, a .safetensors file or a hub id (owner/repo[:file]); repeatable; requests pick it by NAME")
    controlnets: tuple[str, ...] = setting((), group="engine", kind="list", flag="--controlnet", env="CONTROLNETS", metavar="NAME=SOURCE", help="load an SDXL ControlNet at start, from a folder or a hub id (tiny-controlnet: a small one built from tiny-sdxl); repeatable; plans pick it by NAME")
    offload: bool = setting(False, group="engine", kind="switch", help="model CPU offload, only for GPUs too small for the pipeline; slower")
    channels_last: str = setting("auto", group="engine", choices=("auto", "on", "off"), help="channels-last memory layout; auto: on with CUDA")
    fuse_qkv: str = setting("auto", group="engine", choices=("auto", "on", "off"), help="fused QKV attention projections; auto: on with CUDA unless LoRAs are loaded")
    compile: str = setting("auto", group="engine", choices=("auto", "on", "off"), help="torch.compile the UNets; auto: on with CUDA")  # auto: also off when offloading
    compile_mode: str = setting("default", group="engine", choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"), help="torch.compile's mode")
    compile_buckets: str = setting(DEFAULT_BUCKETS, group="engine", metavar="WxH,...", help="sizes compiled and warmed up at start; other sizes run uncompiled, never recompiling")
    quantize: str = setting("none", group="engine", choices=("none", "fp8"), help="fp8: the UNets' attention and feed-forward layers in float8 (torchao; GPUs of compute capability 8.9+, e.g. H100); refused elsewhere")
    compile_cache: str = setting("", group="engine", metavar="DIR", help="folder for torch.compile's artifacts, reused at the next start; default: <data dir>/compile-cache")
    max_batch: int = setting(1, group="engine", parse=at_least_one, help="most images one engine call makes: up to this many compatible queued jobs (same size, steps, sampler, refiner, LoRAs; a request's n images are) run together; 1: one at a time")
