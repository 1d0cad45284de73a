"""Worker settings: keyword-only, each field with its flag and IMAGEGEN_* variable (schemas.settings_fields)."""

from __future__ import annotations

import os
import socket
import secrets
from dataclasses import dataclass

from gpu_worker.engines.options import EngineOptions
from schemas.jetstream import Topology
from schemas.request import Limits
from schemas.settings_fields import at_least_one, nats_url_setting, nested, setting
from schemas.workers import DEFAULT_FAIRNESS


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


@dataclass(frozen=True, kw_only=True)
class WorkerSettings(EngineOptions):
    """The worker's settings; those it hands the engine come from EngineOptions."""

    nats_url: str = nats_url_setting()
    worker_id: str = setting(default_factory=default_worker_id, group="operations", flag_default=None, help="name in the worker registry")
    model: str = setting("auto", group="engine", help="hub id, local folder, tiny-sdxl or simulated; auto: SDXL base with CUDA, tiny-sdxl without")
    device: str = setting("auto", group="engine", help="cuda:N or cpu; one worker process per GPU")
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
