"""Worker settings: keyword-only, built from flags and IMAGEGEN_* environment variables."""

from __future__ import annotations

import os
import socket
import secrets
from dataclasses import dataclass, field

from gpu_worker.engines.speedups import DEFAULT_BUCKETS
from schemas.jetstream import Topology
from schemas.request import DEFAULT_REFINER_SPLIT, Limits
from schemas.workers import DEFAULT_FAIRNESS


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


@dataclass(frozen=True, kw_only=True)
class WorkerSettings:
    nats_url: str = "nats://127.0.0.1:4222"
    worker_id: str = field(default_factory=default_worker_id)
    model: str = "auto"  # auto: SDXL base on CUDA, tiny-sdxl without CUDA
    refiner: str | None = None
    device: str = "auto"  # auto: cuda:0 when available, else cpu
    dtype: str = "auto"
    threads: int = 1
    refiner_split: float = DEFAULT_REFINER_SPLIT  # with the refiner: the fraction of the noise schedule the base denoises
    vae: str | None = None  # another VAE (hub id or folder), e.g. an fp16-fixed one
    vae_dtype: str = "auto"  # auto: bf16 for a float16 model (fp32 without bf16), fp32 on CPU
    vae_tiling: str = "auto"  # auto: tiled decode above 1536x1536 pixels; on; off
    loras: tuple[str, ...] = ()  # LoRA adapters loaded at start, NAME=FOLDER|FILE|HUB_ID each
    controlnets: tuple[str, ...] = ()  # ControlNets loaded at start, NAME=FOLDER|HUB_ID|tiny-controlnet each
    offload: bool = False  # model CPU offload: for GPUs too small to hold the pipeline (slower)
    channels_last: str = "auto"  # auto, on, off; auto: on with CUDA
    fuse_qkv: str = "auto"  # fused QKV projections; auto: on with CUDA unless LoRAs are loaded
    compile: str = "auto"  # torch.compile of the UNets; auto: on with CUDA unless offloading
    compile_mode: str = "default"  # torch.compile mode
    compile_buckets: str = DEFAULT_BUCKETS  # WIDTHxHEIGHT,...: compiled and warmed up at start
    quantize: str = "none"  # none or fp8 (float8 linear layers in the UNets; Ada/Hopper GPUs with torchao)
    compile_cache: str = ""  # Inductor's artifacts, reused by the next start; empty: <data_dir>/compile-cache
    max_batch: int = 1  # most images one engine call makes: compatible queued jobs (a request's n images first) taken together; 1: each alone
    data_dir: str = ""
    heartbeat_s: float = 5.0  # in_progress() and worker-registry refresh period
    progress_write_s: float = 0.5  # at most this often a running job's step goes to the status record
    preview_every: int = 5  # a preview event every N steps (0: none)
    safety_checker: str | None = None  # NSFW check: StableDiffusionSafetyChecker folder or hub id, or module:factory
    nsfw_action: str = "blank"  # a flagged image: blank (black image, status nsfw) or reject (the job fails)
    max_gpu_temp: float = 85.0  # degrees C: above this no new job is taken (0: guard off)
    resume_gpu_temp: float = 75.0  # degrees C: at or below this jobs are taken again
    gpu_temp_poll_s: float = 2.0  # how often a paused worker reads the temperature
    metrics_port: int = 0  # Prometheus /metrics on this port (0: not served)
    metrics_host: str = "127.0.0.1"  # address the metrics port listens on
    fairness: int = DEFAULT_FAIRNESS  # jobs in a row from higher tiers while a lower one waits, before its turn
    sim_step_s: float = 0.05
    sim_step_s_per_mpx: float = 0.0
    sim_fixed_s: float = 0.0
    sim_refiner_step_factor: float = 1.0  # simulated engine: a refiner step's time over a base step's
    sim_refiner_fixed_s: float = 0.0  # simulated engine: the hand-over to the refiner
    sim_fail_marker: str = ""  # simulated engine: prompts containing this crash it (tests of retries)
    limits: Limits = field(default_factory=Limits)
    topology: Topology = field(default_factory=Topology)
