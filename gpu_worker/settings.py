"""Worker settings: keyword-only, each field with its flag and IMAGEGEN_* variable (schemas.settings_fields)."""

from __future__ import annotations

import os
import socket
import secrets
from dataclasses import dataclass

from gpu_worker.engines.speedups import DEFAULT_BUCKETS
from schemas.jetstream import Topology
from schemas.request import DEFAULT_REFINER_SPLIT, Limits
from schemas.settings_fields import at_least_one, nats_url_setting, nested, setting
from schemas.workers import DEFAULT_FAIRNESS


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


@dataclass(frozen=True, kw_only=True)
class WorkerSettings:
    nats_url: str = nats_url_setting()
    worker_id: str = setting(default_factory=default_worker_id, group="operations", flag_default=None, help="name in the worker registry")
    model: str = setting("auto", group="engine", help="hub id, local folder, tiny-sdxl or simulated; auto: SDXL base with CUDA, tiny-sdxl without")
    refiner: str | None = setting(None, group="engine", help="refiner hub id or folder (tiny-sdxl-refiner with tiny-sdxl)")
    device: str = setting("auto", group="engine", help="cuda:N or cpu; one worker process per GPU")
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
    data_dir: str = setting("", group="operations", help="where built models (and up's server store) live")  # the command's default: imagegen.paths
    heartbeat_s: float = 5.0  # in_progress() and worker-registry refresh period
    progress_write_s: float = 0.5  # at most this often a running job's step goes to the status record
    preview_every: int = setting(5, group="engine", help="a preview image every N steps, 0 for none")
    safety_checker: str | None = setting(None, group="safety", metavar="PATH|HUB_ID|MODULE:FACTORY", help="NSFW check of every image: a StableDiffusionSafetyChecker folder or hub id (e.g. CompVis/stable-diffusion-safety-checker), or a plug-in factory; off when unset")
    nsfw_action: str = setting("blank", group="safety", choices=("blank", "reject"), help="a flagged image: blank (a black image, status nsfw: true) or reject (the job fails)")
    max_gpu_temp: float = setting(85.0, group="operations", help="degrees C at which the worker takes no new job (NVML); 0: no guard")
    resume_gpu_temp: float = setting(75.0, group="operations", help="degrees C at or below which a paused worker takes jobs again")
    gpu_temp_poll_s: float = 2.0  # how often a paused worker reads the temperature
    metrics_port: int = setting(0, group="operations", help="serve the worker's Prometheus /metrics on this port; 0: off")
    metrics_host: str = setting("127.0.0.1", group="operations", help="address the worker's metrics port listens on")
    fairness: int = setting(DEFAULT_FAIRNESS, group="operations", parse=at_least_one, help="after this many jobs in a row taken from higher tiers while a lower one waited, the next comes from the lowest tier with work")
    sim_step_s: float = setting(0.05, group="testing", flag="--sim-step-s", help="simulated engine: seconds per step")
    sim_step_s_per_mpx: float = 0.0
    sim_fixed_s: float = 0.0
    sim_refiner_step_factor: float = 1.0  # simulated engine: a refiner step's time over a base step's
    sim_refiner_fixed_s: float = 0.0  # simulated engine: the hand-over to the refiner
    sim_fail_marker: str = setting("", group="testing", help="simulated engine: a prompt containing this text crashes it, for testing retries")
    limits: Limits = nested(Limits)
    topology: Topology = nested(Topology)
