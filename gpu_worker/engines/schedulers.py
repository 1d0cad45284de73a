"""Samplers by name: each name in `schemas.request.SCHEDULERS` (the names a request may use) maps to a
diffusers scheduler class and its options here.

A fresh scheduler is made per job from the model's own scheduler config (so its beta schedule, timestep
spacing and prediction type stay the model's), and `split_steps` tells how a step count divides between
the SDXL base and the refiner for a given hand-over point, with the same rule diffusers applies for
`denoising_end` / `denoising_start`.
"""

from __future__ import annotations

from typing import Any

SCHEDULER_SPECS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {"use_karras_sigmas": False}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}),
    "dpmpp_2m_sde_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "ddim": ("DDIMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
}


class UnknownScheduler(ValueError):
    pass


def make_scheduler(name: str | None, model_config: Any) -> Any:
    """A new scheduler: `name`'s class built from the model's scheduler config, or the model's own class for None."""
    import diffusers

    if name is None:
        cls = getattr(diffusers, model_config["_class_name"])
        return cls.from_config(model_config)
    try:
        class_name, options = SCHEDULER_SPECS[name]
    except KeyError:
        raise UnknownScheduler(f"scheduler: {name!r} is not one of {', '.join(SCHEDULER_SPECS)}") from None
    return getattr(diffusers, class_name).from_config(model_config, **options)


def split_steps(scheduler: Any, steps: int, split: float) -> tuple[int, int]:
    """(base steps, refiner steps) when the base hands over at `split` of the noise schedule.

    Mirrors diffusers: the base keeps the timesteps >= the cutoff (`denoising_end`), the refiner runs
    those below it (`denoising_start`).
    """
    scheduler.set_timesteps(steps)
    timesteps = [int(t) for t in scheduler.timesteps.tolist()]
    train_steps = scheduler.config.num_train_timesteps
    cutoff = int(round(train_steps - split * train_steps))
    base = sum(1 for t in timesteps if t >= cutoff)
    return base, len(timesteps) - base
