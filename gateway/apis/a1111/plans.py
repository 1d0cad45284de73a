"""AUTOMATIC1111's hires fix (`enable_hr`) and its ControlNet extension's units
(`alwayson_scripts.controlnet.args`), read into this service's `hires` and `controlnet` request fields.

The hires fix takes A1111's fields and defaults: `hr_scale` (2), or `hr_resize_x` / `hr_resize_y` (one of
them alone keeps the aspect), `hr_second_pass_steps` (0: the first pass's steps), `denoising_strength`
(0.7) and `hr_upscaler` (Latent and its bilinear, bicubic and nearest variants upscale the latents; None,
Lanczos and Nearest the pixels; a model upscaler such as ESRGAN is refused by name). `hr_checkpoint_name`,
`hr_sampler_name`, `hr_scheduler`, `hr_prompt` and `hr_negative_prompt` are taken only when they say
"the same as the first pass".

A ControlNet unit takes the extension's fields: `enabled`, `model` (a ControlNet the workers loaded; a
trailing " [hash]" and a file suffix are dropped), `module` (none or canny; other preprocessors need
models and are refused by name), `image` (base64, or {"image": ...}), `weight`, `guidance_start`,
`guidance_end`, and for canny `threshold_a` / `threshold_b` (low and high, 1-255; absent or -1: 100 and 200).
One enabled unit per request.
"""

from __future__ import annotations

import re
from typing import Any, Callable

LATENT_UPSCALERS = {"Latent": "bilinear", "Latent (antialiased)": "bilinear", "Latent (bicubic)": "bicubic",
                    "Latent (bicubic antialiased)": "bicubic", "Latent (nearest)": "nearest-exact", "Latent (nearest-exact)": "nearest-exact"}
PIXEL_UPSCALERS = {"None": "lanczos", "Lanczos": "lanczos", "Nearest": "nearest"}
HR_DENOISE = 0.7  # A1111's denoising_strength for the hires fix when a request leaves it out
SAME = (None, "", "Use same checkpoint", "Use same sampler", "Use same scheduler")
MODULES = {"none": "none", "None": "none", "canny": "canny"}
HASH = re.compile(r"\s*\[[0-9a-fA-F]+\]$")
UPSCALER_NAMES = [*LATENT_UPSCALERS, *PIXEL_UPSCALERS]

Fail = Callable[[str, str], Exception]


def hires_of(ask: Any, fail: Fail) -> tuple[dict | None, dict]:
    """(the `hires` field, A1111's infotext entries for it) for a txt2img request; (None, {}) without enable_hr."""
    if not ask.enable_hr:
        return None, {}
    for field in ("hr_checkpoint_name", "hr_sampler_name", "hr_scheduler"):
        value = getattr(ask, field, None)
        if value not in SAME:
            raise fail(field, f"the hires fix's second pass runs with the first pass's model, sampler and schedule here, got {value!r}")
    for field, first in (("hr_prompt", ask.prompt), ("hr_negative_prompt", ask.negative_prompt)):
        value = getattr(ask, field, None)
        if value not in (None, "", first):
            raise fail(field, "the hires fix's second pass takes the first pass's prompt here; leave it empty")
    upscaler = ask.hr_upscaler or "Latent"
    if upscaler not in UPSCALER_NAMES:
        raise fail("hr_upscaler", f"{upscaler!r} is not offered here (upscaler models are not loaded); use one of {', '.join(UPSCALER_NAMES)}")
    latent = upscaler in LATENT_UPSCALERS
    hires: dict[str, Any] = {
        "space": "latent" if latent else "pixel",
        "upscaler": LATENT_UPSCALERS[upscaler] if latent else PIXEL_UPSCALERS[upscaler],
        "denoise": ask.denoising_strength if ask.denoising_strength is not None else HR_DENOISE,
    }
    width, height = ask.width or 512, ask.height or 512
    x, y = ask.hr_resize_x or 0, ask.hr_resize_y or 0
    if x or y:
        if not x:
            x = round(width * y / height / 8) * 8
        if not y:
            y = round(height * x / width / 8) * 8
        hires.update(width=x, height=y)
        label = {"Hires resize": f"{x}x{y}"}
    else:
        scale = ask.hr_scale if ask.hr_scale is not None else 2.0
        if scale <= 1:
            raise fail("hr_scale", f"must be above 1, got {scale!r}")
        hires["scale"] = scale
        label = {"Hires upscale": f"{scale:g}"}
    if ask.hr_second_pass_steps:
        hires["steps"] = ask.hr_second_pass_steps
    params = {**label, "Hires steps": ask.hr_second_pass_steps or None, "Hires upscaler": upscaler,
              "Denoising strength": f"{hires['denoise']:g}"}
    return hires, {k: v for k, v in params.items() if v is not None}


def controlnet_of(scripts: dict | None, fail: Fail) -> tuple[dict | None, dict]:
    """(the `controlnet` field, its infotext entry) from `alwayson_scripts`; scripts other than ControlNet refused."""
    if not scripts:
        return None, {}
    others = sorted(name for name in scripts if name.lower() != "controlnet")
    if others:
        raise fail("alwayson_scripts", f"only the ControlNet extension's units are taken here, not {others[0]!r}")
    script = next(iter(scripts.values()))
    args = script.get("args") if isinstance(script, dict) else None
    if not isinstance(args, list):
        raise fail("alwayson_scripts", "controlnet: send {\"args\": [unit, ...]}")
    units = [u for u in args if isinstance(u, dict) and u.get("enabled", True)]
    if any(not isinstance(u, dict) for u in args):
        raise fail("alwayson_scripts", "controlnet: every unit must be an object")
    if not units:
        return None, {}
    if len(units) > 1:
        raise fail("alwayson_scripts", f"controlnet: one enabled unit per request here, got {len(units)}")
    unit = units[0]
    module = unit.get("module", "none")
    if module not in MODULES:
        raise fail("alwayson_scripts", f"controlnet: the preprocessor {module!r} is not offered here; use none or canny")
    model = unit.get("model")
    if not isinstance(model, str) or not model or model == "None":
        raise fail("alwayson_scripts", "controlnet: name the unit's model")
    name = HASH.sub("", model).replace("\\", "/").rsplit("/", 1)[-1]
    for suffix in (".safetensors", ".pth", ".pt", ".bin", ".ckpt"):
        name = name.removesuffix(suffix)
    image = unit.get("image") if "image" in unit else unit.get("input_image")
    if isinstance(image, dict):
        image = image.get("image")
    if not isinstance(image, str) or not image:
        raise fail("alwayson_scripts", "controlnet: the unit needs an image (base64)")
    field = {"model": name, "image": image, "preprocessor": MODULES[module], "weight": unit.get("weight", 1.0),
             "start": unit.get("guidance_start", 0.0), "end": unit.get("guidance_end", 1.0)}
    if MODULES[module] == "canny":
        field |= canny_thresholds(unit, fail)
    label = (f"Module: {MODULES[module]}, Model: {model}, Weight: {field['weight']}, "
             f"Guidance Start: {field['start']}, Guidance End: {field['end']}")
    return field, {"ControlNet 0": f'"{label}"'}


def canny_thresholds(unit: dict, fail: Fail) -> dict:
    """The extension's `threshold_a` / `threshold_b` as canny's low and high thresholds (-1: its default)."""
    out = {}
    for key, field in (("threshold_a", "low_threshold"), ("threshold_b", "high_threshold")):
        value = unit.get(key, -1)
        if value == -1:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise fail("alwayson_scripts", f"controlnet: {key} must be a whole number from 1 to 255 (canny's threshold), got {value!r}")
        out[field] = int(value)
    return out
