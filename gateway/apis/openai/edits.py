"""OpenAI's image edits and variations on the gateway, mapped onto this service's image-to-image and
inpainting: `POST /v1/images/edits` and `POST /v1/images/variations`, multipart forms as OpenAI's
clients send them.

- An edit with a `mask` inpaints: the mask's transparent area is redrawn (its alpha inverted becomes
  this service's mask, white where redrawn; half-transparent pixels blend), the rest of the image is
  kept. The mask must be the image's size and have transparency.
- An edit without a mask whose image has transparency inpaints the same way with the image's own
  alpha (OpenAI's rule for dall-e-2).
- An edit of an opaque image without a mask is image-to-image from it, at strength 0.75.
- A variation is image-to-image from the image at strength 0.6 with a neutral prompt (OpenAI's
  variations take none; `prompt` in `extra_body` replaces it).

One image only (`image` or a one-element `image[]`). The size is the image's own unless `size` names
one (the image is then scaled and centre-cropped to it). `strength`, `seed`, `steps`, `guidance` and
`negative_prompt` may come in `extra_body`. Answers and errors are those of
`gateway.apis.openai.images`, `response_format` defaulting as OpenAI's does for the model named.
"""

from __future__ import annotations

import asyncio
import base64
import io

from aiohttp import web
from aiohttp.web_request import FileField
from PIL import ImageOps
from pydantic import BaseModel

from gateway.http import forms
from gateway.core.caller import SERVICE
from gateway.apis.openai.images import answered, answer_images, bad, from_invalid, parse_size, quality_steps, resolve_model, validated
from gateway.http.views.openai import OpenAIEditRequest, OpenAIVariationRequest
from schemas.job import new_seed
from schemas.request import Limits, RequestInvalid, parse_request
from schemas.uploads import decode_upload, problem, transparency

routes = web.RouteTableDef()

EDIT_STRENGTH = 0.75  # an opaque image without a mask
MASKED_STRENGTH = 1.0  # where a mask says: redrawn
VARIATION_STRENGTH = 0.6
VARIATION_PROMPT = "a variation of this picture, same subject, same style"
IMAGE_FIELDS = ("image", "image[]")


async def read_form(request: web.Request, files: tuple[str, ...]) -> tuple[dict[str, str], dict[str, list[bytes]]]:
    """(text fields, {file field: [contents]}) of a multipart form, within the gateway's body limit."""
    if not request.content_type.startswith("multipart/") and request.content_type != "application/x-www-form-urlencoded":
        raise bad(None, "send a multipart/form-data body, with the image as a file")
    try:
        form = await forms.read_form(request)
    except RequestInvalid as exc:
        raise bad(None, f"unreadable multipart body: {exc.errors[0]['message']}") from None
    texts: dict[str, str] = {}
    found: dict[str, list[bytes]] = {}
    for name, value in form.items():
        if isinstance(value, FileField):
            if name not in files:
                raise bad(name, "unrecognized file field", "unknown_parameter")
            found.setdefault(name, []).append(value.file.read())
        elif name in files:
            raise bad(name, "send it as a file, not as text")
        else:
            texts[name] = str(value)
    return texts, found


def parse_fields(texts: dict[str, str], kind: type[BaseModel]) -> BaseModel:
    return validated(kind, texts)


def the_image(found: dict[str, list[bytes]]) -> bytes:
    images = [data for name in IMAGE_FIELDS for data in found.get(name, [])]
    if not images:
        raise bad("image", "Missing required parameter: send the image as a file", "missing_required_parameter")
    if len(images) > 1:
        raise bad("image", f"one image is edited here, got {len(images)}")
    return images[0]


def b64png(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def edit_images(image: bytes, mask: bytes | None, limits: Limits) -> tuple[str, str | None]:
    """(init image, inpainting mask or None) as base64 for the request: the redrawn area is where the
    mask (or, without one, the image) is transparent. In a thread: image decoding."""
    init = decode_upload("image", image, limits).image
    if mask is not None:
        mask_image = decode_upload("mask", mask, limits).image
        if mask_image.size != init.size:
            raise problem("mask", f"is {mask_image.width}x{mask_image.height}, but the image is {init.width}x{init.height}; "
                                  "they must be the same size")
        alpha = transparency(mask_image)
        if alpha is None:
            raise problem("mask", "is opaque all over: its transparent areas are the ones redrawn, and it has none")
    else:
        alpha = transparency(init)
        if alpha is None:  # image-to-image from the picture as sent
            return base64.b64encode(image).decode("ascii"), None
    return b64png(init.convert("RGB")), b64png(ImageOps.invert(alpha))


def sized(size: str | None) -> dict[str, int]:
    """width and height when `size` names them; none for auto or absent (the image's own size)."""
    if size is None or size.strip().lower() == "auto":
        return {}
    width, height = parse_size(size)
    return {"width": width, "height": height}


def checked(fields: dict, limits: Limits, *, steps_given: bool):
    try:
        return parse_request(fields, limits=limits)
    except RequestInvalid as exc:
        raise from_invalid(exc, steps_given=steps_given) from None


async def edit(request: web.Request) -> web.Response:
    jobs = request.app[SERVICE]
    limits = jobs.settings.limits
    texts, found = await read_form(request, (*IMAGE_FIELDS, "mask"))
    ask = parse_fields(texts, OpenAIEditRequest)
    if ask.stream:
        raise bad("stream", "streaming is not available on this server; leave stream unset or false", "unsupported_value")
    if ask.background == "transparent":
        raise bad("background", "transparent backgrounds are not available; use auto or opaque", "unsupported_value")
    image = the_image(found)
    masks = found.get("mask", [])
    if len(masks) > 1:
        raise bad("mask", f"one mask, got {len(masks)}")
    model = await resolve_model(jobs, ask.model)
    steps = ask.steps if ask.steps is not None else quality_steps(jobs, model or await jobs.current_model(), ask.quality)
    try:
        init, mask = await asyncio.to_thread(edit_images, image, masks[0] if masks else None, limits)
    except RequestInvalid as exc:
        raise from_invalid(exc, steps_given=True) from None
    strength = ask.strength if ask.strength is not None else (MASKED_STRENGTH if mask else EDIT_STRENGTH)
    fields = {
        "prompt": ask.prompt, "n": ask.n, "seed": ask.seed if ask.seed is not None else new_seed(),
        "format": {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[ask.output_format or "png"],
        "init_image": init, "strength": strength, **sized(ask.size),
    }
    optional = {
        "mask_image": mask, "model": model, "steps": steps, "negative_prompt": ask.negative_prompt, "guidance": ask.guidance,
        "quality": max(1, ask.output_compression) if ask.output_compression is not None else None,
        "cache": False if ask.seed is None else None,
    }
    fields.update({k: v for k, v in optional.items() if v is not None})
    base = checked(fields, limits, steps_given=ask.steps is not None)
    return await answer_images(
        request, base, response_format=ask.response_format, model_name=ask.model, output_format=ask.output_format, what="edits"
    )


async def vary(request: web.Request) -> web.Response:
    jobs = request.app[SERVICE]
    limits = jobs.settings.limits
    texts, found = await read_form(request, IMAGE_FIELDS)
    ask = parse_fields(texts, OpenAIVariationRequest)
    image = the_image(found)
    model = await resolve_model(jobs, ask.model)
    fields = {
        "prompt": ask.prompt if ask.prompt is not None else VARIATION_PROMPT, "n": ask.n, "format": "PNG",
        "seed": ask.seed if ask.seed is not None else new_seed(),
        "init_image": base64.b64encode(image).decode("ascii"),
        "strength": ask.strength if ask.strength is not None else VARIATION_STRENGTH, **sized(ask.size),
    }
    optional = {"model": model, "steps": ask.steps, "negative_prompt": ask.negative_prompt, "guidance": ask.guidance,
                "cache": False if ask.seed is None else None}
    fields.update({k: v for k, v in optional.items() if v is not None})
    base = checked(fields, limits, steps_given=True)
    return await answer_images(request, base, response_format=ask.response_format, model_name=ask.model, what="variations")


@routes.post("/v1/images/edits")
async def edits(request: web.Request) -> web.Response:
    return await answered(edit, request)


@routes.post("/v1/images/variations")
async def variations(request: web.Request) -> web.Response:
    return await answered(vary, request)
