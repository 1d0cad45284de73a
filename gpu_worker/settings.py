"""Worker settings: keyword-only, built from flags and IMAGEGEN_* environment variables."""

from __future__ import annotations

import os
import socket
import secrets
from dataclasses import dataclass, field

from schemas.jetstream import Topology
from schemas.request import Limits


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
    data_dir: str = ""
    heartbeat_s: float = 5.0  # in_progress() and worker-registry refresh period
    progress_write_s: float = 0.5  # at most this often a running job's step goes to the status record
    preview_every: int = 5  # a preview event every N steps (0: none)
    fairness: int = 10
    sim_step_s: float = 0.05
    sim_step_s_per_mpx: float = 0.0
    sim_fixed_s: float = 0.0
    limits: Limits = field(default_factory=Limits)
    topology: Topology = field(default_factory=Topology)
