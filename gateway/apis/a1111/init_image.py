"""img2img's init image, its strength and, to inpaint, its mask, for this service's request: resize mode 0
(A1111's default, "just resize") stretches the image here, before queueing; mode 1 ("crop and resize") is
the engine's own fitting; a mask is prepared with A1111's settings (`gateway.apis.a1111.inpaint`)."""

from __future__ import annotations

import asyncio
import functools

from PIL import Image

from gateway.apis.a1111.failures import from_request_invalid
from gateway.apis.a1111.inpaint import MaskSettings, PasteBack, b64png
from gateway.apis.a1111.inpaint import prepare as prepare_inpainting
from gateway.http.views.a1111 import A1111Img2ImgRequest
from schemas.request import GenerateRequest, RequestInvalid
from schemas.uploads import decode_upload

IMG2IMG_STRENGTH = 0.75  # A1111's denoising_strength when a request leaves it out


def mask_settings(ask: A1111Img2ImgRequest) -> MaskSettings:
    """A1111's inpainting settings, its defaults for those left out."""
    blur_x = ask.mask_blur if ask.mask_blur is not None else ask.mask_blur_x
    blur_y = ask.mask_blur if ask.mask_blur is not None else ask.mask_blur_y
    return MaskSettings(
        invert=ask.inpainting_mask_invert == 1,
        round=ask.mask_round is not False,
        blur_x=4 if blur_x is None else blur_x,
        blur_y=4 if blur_y is None else blur_y,
        fill=ask.inpainting_fill in (None, 0),
        only_masked=ask.inpaint_full_res is not False,
        padding=ask.inpaint_full_res_padding or 0,
    )


def stretched(text: str, width: int, height: int, limits) -> str:
    """The init image resized to width x height regardless of its aspect ratio (A1111's resize mode 0),
    as base64 PNG. In a thread: decoding, resizing and encoding take tens of milliseconds."""
    upload = decode_upload("init_images", text, limits)
    return b64png(upload.image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS))


async def init_fields(ask: A1111Img2ImgRequest, base: GenerateRequest, limits) -> tuple[dict, PasteBack | None]:
    """The init image, its strength and, for inpainting, the mask, for `base` (the request checked without
    them), and how the answer's images are made from the jobs' when only the masked part is inpainted.
    Resize mode 0 with both sides given stretches the image to them here; otherwise the engine's own
    fitting applies (scaled and centre-cropped to both sides, or the image's own size and aspect ratio)."""
    strength = {"strength": ask.denoising_strength if ask.denoising_strength is not None else IMG2IMG_STRENGTH}
    stretch = ask.resize_mode in (None, 0) and ask.width is not None and ask.height is not None
    loop = asyncio.get_running_loop()
    try:
        if ask.mask is not None:
            inpainting = await loop.run_in_executor(None, functools.partial(
                prepare_inpainting, ask.init_images[0], ask.mask, mask_settings(ask),
                width=base.width, height=base.height, stretch=stretch, limits=limits,
            ))
            return {**inpainting.fields, **strength}, inpainting.paste_back
        init = ask.init_images[0]
        if stretch:
            init = await loop.run_in_executor(None, stretched, init, base.width, base.height, limits)
    except RequestInvalid as exc:
        raise from_request_invalid(exc) from None
    return {"init_image": init, **strength}, None
