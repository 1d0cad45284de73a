"""An A1111 body read into its shape, and the fields of features this service does not offer refused by
name unless at their "off" values, as A1111's own clients send them: face restoration, tiling, variation
seeds, styles, scripts, sampler noise settings, and img2img's beyond one init image, resize modes 0 and 1
and A1111's mask settings."""

from __future__ import annotations

from pydantic import ValidationError

from gateway.apis.a1111.failures import invalid
from gateway.http.views.a1111 import A1111Img2ImgRequest, A1111Txt2ImgRequest

# Fields of features not offered, and the values that leave them off.
OFF_VALUES: dict[str, tuple] = {
    "subseed_strength": (None, 0),
    "seed_resize_from_h": (None, -1, 0),
    "seed_resize_from_w": (None, -1, 0),
    "styles": (None, []),
    "restore_faces": (None, False),
    "tiling": (None, False),
    "s_min_uncond": (None, 0),
    "s_churn": (None, 0),
    "s_tmax": (None, 0),
    "s_tmin": (None, 0),
    "s_noise": (None, 1),
    "script_name": (None, ""),
    "script_args": (None, []),
    "infotext": (None, ""),
    "firstpass_image": (None, ""),
}
WHY_OFF = {
    "restore_faces": "face restoration is not offered here",
    "tiling": "tiling is not offered here",
    "subseed_strength": "variation seeds are not offered here",
    "styles": "saved styles are not offered here; put the style in the prompt",
    "script_name": "scripts are not offered here",
    "script_args": "scripts are not offered here",
    "infotext": "reading settings from an infotext is not offered here; send the fields",
}
MAX_MASK_BLUR, MAX_PADDING = 64, 256  # pixels, the ranges of A1111's own controls


def parse_body(body: object, kind: type[A1111Txt2ImgRequest]) -> A1111Txt2ImgRequest:
    if not isinstance(body, dict):
        raise invalid("body", "the body must be a JSON object")
    try:
        return kind.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "body"
        if err["type"] == "extra_forbidden":
            what = "img2img" if kind is A1111Img2ImgRequest else "txt2img"
            raise invalid(field, f"not a field of {what} here (see /openapi.json)") from None
        raise invalid(field, err["msg"].removeprefix("Value error, ")) from None


def refuse_unoffered(ask: A1111Txt2ImgRequest) -> None:
    for field, off in OFF_VALUES.items():
        value = getattr(ask, field)
        if value not in off:
            why = WHY_OFF.get(field, "only its default is accepted here")
            raise invalid(field, f"{why} (got {value!r})")


def refuse_unoffered_img2img(ask: A1111Img2ImgRequest) -> None:
    if ask.include_init_images:
        raise invalid("include_init_images", "only false: the answer carries the generated images only")
    if ask.resize_mode not in (None, 0, 1):
        raise invalid("resize_mode", f"only 0 (just resize) and 1 (crop and resize) are offered here, got {ask.resize_mode!r}")
    if len(ask.init_images or []) != 1:
        raise invalid("init_images", f"exactly one image is needed here, got {len(ask.init_images or [])}")
    if ask.mask is None:  # the mask settings are unused without a mask, as in A1111
        return
    if ask.inpainting_fill not in (None, 0, 1):
        raise invalid(
            "inpainting_fill",
            f"only 0 (fill) and 1 (original) are offered here, got {ask.inpainting_fill!r}; "
            "for new content where the mask is, send one of them with denoising_strength 1",
        )
    if ask.inpainting_mask_invert not in (None, 0, 1):
        raise invalid("inpainting_mask_invert", f"0 (inpaint the white part) or 1 (the black part), got {ask.inpainting_mask_invert!r}")
    for field, most in (("mask_blur", MAX_MASK_BLUR), ("mask_blur_x", MAX_MASK_BLUR), ("mask_blur_y", MAX_MASK_BLUR),
                        ("inpaint_full_res_padding", MAX_PADDING)):
        value = getattr(ask, field)
        if value is not None and not 0 <= value <= most:
            raise invalid(field, f"pixels, 0..{most}, got {value!r}")
    if ask.initial_noise_multiplier not in (None, 1, 1.0):
        raise invalid("initial_noise_multiplier", f"only 1 (the noise as the sampler draws it) is offered here, got {ask.initial_noise_multiplier!r}")
    if ask.latent_mask is not None:
        raise invalid("latent_mask", "a second mask for the latents is not offered here; the mask serves both")
