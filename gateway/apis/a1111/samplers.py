"""A1111's samplers and schedules (Automatic, Uniform, Karras) as this service's schedulers, and its
`eta` as the samplers here take it."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.apis.a1111.failures import invalid
from gateway.http.views.a1111 import A1111Txt2ImgRequest


@dataclass(frozen=True)
class Sampler:
    name: str
    aliases: tuple[str, ...]
    uniform: str  # this service's scheduler for the Uniform schedule
    karras: str | None = None  # and for Karras, where it has one
    automatic: str | None = ""  # for Automatic: "" the uniform one, None not available


SAMPLERS = (
    Sampler("Euler", ("k_euler",), "euler"),
    Sampler("Euler a", ("k_euler_a", "k_euler_ancestral"), "euler_a"),
    # A1111 runs DPM++ 2M on the Karras schedule when the schedule is Automatic.
    Sampler("DPM++ 2M", ("k_dpmpp_2m",), "dpmpp_2m", "dpmpp_2m_karras", automatic="dpmpp_2m_karras"),
    # ... and DPM++ 2M SDE on the exponential one, which is not available here.
    Sampler("DPM++ 2M SDE", ("k_dpmpp_2m_sde",), "dpmpp_2m_sde", "dpmpp_2m_sde_karras", automatic=None),
    Sampler("DDIM", ("ddim",), "ddim"),
    Sampler("UniPC", ("unipc",), "unipc"),
    Sampler("DEIS", ("deis",), "deis"),
)
OLD_KARRAS_NAMES = {"dpm++ 2m karras": "DPM++ 2M", "dpm++ 2m sde karras": "DPM++ 2M SDE"}  # before A1111 1.9
SCHEDULES = {"automatic": "Automatic", "uniform": "Uniform", "karras": "Karras"}


# Samplers whose noise A1111 scales by eta: DDIM's (eta 0 by default) and the ancestral ones (1). Here
# DDIM takes any eta, the ancestral ones run at 1 only; the others ignore it, as A1111 does.
ETA_ANCESTRAL = {"euler_a": "Euler a", "dpmpp_2m_sde": "DPM++ 2M SDE", "dpmpp_2m_sde_karras": "DPM++ 2M SDE"}


def scheduler_of(ask: A1111Txt2ImgRequest) -> tuple[str, str, str]:
    """(this service's scheduler, the sampler's A1111 name, the schedule's label)."""
    asked = ask.sampler_name or ask.sampler_index or "Euler"
    field = "sampler_name" if ask.sampler_name else "sampler_index" if ask.sampler_index else "sampler_name"
    schedule = (ask.scheduler or "automatic").strip().lower()
    key = asked.strip().lower()
    if key in OLD_KARRAS_NAMES:
        key, schedule = OLD_KARRAS_NAMES[key].lower(), "karras"
    sampler = next((s for s in SAMPLERS if key == s.name.lower() or key in s.aliases), None)
    if sampler is None:
        names = ", ".join(s.name for s in SAMPLERS)
        raise invalid(field, f"{asked!r} is not available here; one of {names} (GET /sdapi/v1/samplers)")
    if schedule not in SCHEDULES:
        raise invalid("scheduler", f"{ask.scheduler!r} is not available here; one of {', '.join(SCHEDULES.values())}")
    if schedule == "karras":
        if sampler.karras is None:
            raise invalid("scheduler", f"Karras is not available with {sampler.name} here; use Automatic or Uniform")
        return sampler.karras, sampler.name, SCHEDULES[schedule]
    if schedule == "automatic":
        if sampler.automatic is None:
            raise invalid(
                "scheduler", f"{sampler.name}'s automatic schedule (exponential) is not available here; ask for Karras or Uniform"
            )
        return sampler.automatic or sampler.uniform, sampler.name, SCHEDULES[schedule]
    return sampler.uniform, sampler.name, SCHEDULES[schedule]


def eta_of(eta: float | None, scheduler: str) -> float | None:
    """The request's eta for `scheduler`, as A1111 uses it: DDIM's noise; an ancestral sampler's, which
    runs at 1 here (A1111's default for them); ignored by the other samplers, as in A1111."""
    if eta is None:
        return None
    if scheduler == "ddim":
        return eta
    if scheduler in ETA_ANCESTRAL and eta != 1:
        raise invalid("eta", f"{ETA_ANCESTRAL[scheduler]} runs with eta 1 here (A1111's default for it), got {eta!r}; "
                             "DDIM takes any eta from 0 to 1")
    return None
