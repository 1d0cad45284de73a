"""Inpainting as AUTOMATIC1111's img2img does it, around this service's own (an init image and a mask
of its size; the engine keeps the init image where the mask is black and blends by the mask's grey).

What A1111 does to the mask and the image before and after its model runs is done here, in the
gateway, with PIL:

- the mask: its alpha channel when it has transparency, else its grey; rounded to black and white
  (`mask_round`, the default); inverted (`inpainting_mask_invert`); blurred (`mask_blur_x`,
  `mask_blur_y`, or `mask_blur` for both: a Gaussian blur of that many pixels);
- "fill" (`inpainting_fill` 0, A1111's default): the masked part of the image is first painted over
  with its surroundings' colours, blurred in from the edges, so the model starts from them instead of
  from what was there ("original", 1);
- "only masked" (`inpaint_full_res`, A1111's default): the mask's bounding box, grown by
  `inpaint_full_res_padding` and then to the aspect ratio of width x height, is cut out, scaled to
  width x height and inpainted there; the result is scaled back and pasted into the init image, which
  stays as it was wherever the mask is black. "Whole picture" (false) inpaints the whole image at
  width x height, sized as the init image is (resize modes 0 and 1).

A mask that is black all over is refused: there is nothing to inpaint (A1111 then quietly runs plain
img2img instead).
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

from PIL import Image, ImageFilter, ImageOps

from schemas.request import Limits
from schemas.uploads import check_mask, decode_upload, problem, transparency

FILL_PASSES = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))  # (blur radius, times laid on)


@dataclass(frozen=True, kw_only=True)
class MaskSettings:
    invert: bool = False
    round: bool = True
    blur_x: int = 4
    blur_y: int = 4
    fill: bool = True  # "fill" (0); False: "original" (1)
    only_masked: bool = True
    padding: int = 0


@dataclass(frozen=True)
class PasteBack:
    """Puts a result made from the `region` cut out of `original` back into it."""

    original: Image.Image  # RGB, the init image as sent
    mask: Image.Image  # L, its size: where the result shows
    region: tuple[int, int, int, int]  # x1, y1, x2, y2

    def apply(self, data: bytes) -> bytes:
        """The PNG of `original` with the result (`data`, any format) in its region, where the mask says."""
        x1, y1, x2, y2 = self.region
        made = Image.open(io.BytesIO(data), formats=("PNG", "JPEG", "WEBP")).convert("RGB").resize((x2 - x1, y2 - y1), Image.Resampling.LANCZOS)
        pasted = self.original.copy()
        pasted.paste(made, (x1, y1))
        return png(Image.composite(pasted, self.original, self.mask))


@dataclass(frozen=True)
class Inpainting:
    fields: dict  # init_image and mask_image (base64 PNG); width and height when they were set here
    paste_back: PasteBack | None  # "only masked": how the answer's images are made from the jobs'


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def b64png(image: Image.Image) -> str:
    return base64.b64encode(png(image)).decode("ascii")


def read_mask(image: Image.Image, settings: MaskSettings) -> Image.Image:
    """The mask as A1111 reads it: white where to paint, blurred at the edges."""
    alpha = transparency(image)
    mask = alpha if alpha is not None else image.convert("L")
    if settings.round:
        mask = mask.point(lambda v: 255 if v > 128 else 0)
    if settings.invert:
        mask = ImageOps.invert(mask)
    if settings.blur_x or settings.blur_y:
        mask = mask.filter(ImageFilter.GaussianBlur((settings.blur_x, settings.blur_y)))
    return mask


def filled(image: Image.Image, mask: Image.Image) -> Image.Image:
    """`image` with its masked part painted over by its surroundings' colours: the kept part, with the
    mask as transparency, blurred less and less and laid on itself, so that colours reach in from the
    mask's edges (A1111's "fill")."""
    kept = image.convert("RGBA")
    kept.putalpha(ImageOps.invert(mask))
    premultiplied = kept.convert("RGBa")
    layers = Image.new("RGBA", image.size)
    for radius, times in FILL_PASSES:
        layer = premultiplied.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA") if radius else kept
        for _ in range(times):
            layers.alpha_composite(layer)
    return layers.convert("RGB")


def crop_region(mask: Image.Image, padding: int, width: int, height: int) -> tuple[int, int, int, int]:
    """The mask's bounding box grown by `padding`, then to the aspect ratio of width x height (about
    its centre, moved inside the image where it would cross an edge, cut at the edges where it cannot)."""
    box = mask.getbbox()
    if box is None:
        raise problem("mask_image", "is black all over: there is nothing to inpaint")
    w, h = mask.size
    x1, y1, x2, y2 = max(box[0] - padding, 0), max(box[1] - padding, 0), min(box[2] + padding, w), min(box[3] + padding, h)
    if (x2 - x1) * height > (y2 - y1) * width:  # wider than width x height: grow its height
        y1, y2 = grown(y1, y2, -(-(x2 - x1) * height // width), h)
    else:
        x1, x2 = grown(x1, x2, -(-(y2 - y1) * width // height), w)
    return x1, y1, x2, y2


def grown(start: int, end: int, size: int, limit: int) -> tuple[int, int]:
    """[start, end) grown to `size` about its centre, kept within [0, limit)."""
    extra = size - (end - start)
    start, end = start - extra // 2, end + extra - extra // 2
    if end > limit:
        start, end = start - (end - limit), limit
    if start < 0:
        start, end = 0, min(end - start, limit)
    return start, end


def prepare(
    init_text: str, mask_text: str, settings: MaskSettings, *, width: int, height: int, stretch: bool, limits: Limits
) -> Inpainting:
    """The init image and mask to queue for an A1111 inpainting request. `width` x `height`: the size to
    inpaint at; `stretch`: whether the whole picture is stretched to it here (resize mode 0 with both
    sides given; otherwise the engine fits it, or keeps the image's size). In a thread: tens of
    milliseconds of image work."""
    init = decode_upload("init_image", init_text, limits).image.convert("RGB")
    raw_mask = decode_upload("mask_image", mask_text, limits).image
    check_mask(init, raw_mask)
    mask = read_mask(raw_mask, settings)
    if settings.only_masked:
        region = crop_region(mask, settings.padding, width, height)
        part = init.crop(region).resize((width, height), Image.Resampling.LANCZOS)
        part_mask = mask.crop(region).resize((width, height), Image.Resampling.LANCZOS)
        if settings.fill:
            part = filled(part, part_mask)
        fields = {"init_image": b64png(part), "mask_image": b64png(part_mask), "width": width, "height": height}
        return Inpainting(fields, PasteBack(init, mask, region))
    if mask.getbbox() is None:
        raise problem("mask_image", "is black all over: there is nothing to inpaint")
    if settings.fill:
        init = filled(init, mask)
    if stretch:
        init = init.resize((width, height), Image.Resampling.LANCZOS)
        mask = mask.resize((width, height), Image.Resampling.LANCZOS)
    return Inpainting({"init_image": b64png(init), "mask_image": b64png(mask)}, None)
