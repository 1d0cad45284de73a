"""Images a request brings along: image-to-image's init image, inpainting's mask, a plan's ControlNet
control image.

They arrive as base64 or a `data:image/...;base64,` URL (as mflux-server takes `init_image`), and each
must decode, be a PNG, JPEG or WEBP picture (only those decoders run: an ICO or TIFF may hold a bomb that
PIL decodes while merely opening it), hold at most `Limits.max_pixels` pixels (read from the header,
before any decoding) and `Limits.max_upload_bytes` bytes; a mask must be as large as its init image. A
problem raises `RequestInvalid` naming the field.

They never ride inside a job message: the submitter stores the bytes in object store `imagegen-uploads`
and the job message names the object (`UploadRef`). The gateway checks an upload before it stores it;
the worker checks again what it fetches, so an upload from a NATS publisher meets the same rules.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from schemas import jobstore
from schemas.job import JobEnvelope, group_job_ids
from schemas.jetstream import MAX_BYTES_FLAG
from schemas.names import UPLOADS_BUCKET
from schemas.plan import control_image_text, controlnet_names, without_control_image
from schemas.request import GenerateRequest, Limits, RequestInvalid, limit_problems
from schemas.status import JobStatus, UploadRef
from schemas.storage import StoreFull, is_full

OBJECT_SUFFIX = {"init_image": "init", "mask_image": "mask", "control_image": "control"}
DATA_URL = re.compile(r"^data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*),", re.IGNORECASE)
BASE64_SLACK = 1.05  # base64 text may carry line breaks (MIME: one per 76 characters) and a data: prefix
FORMATS = ("PNG", "JPEG", "WEBP")  # the only decoders an upload meets


@dataclass(frozen=True)
class Upload:
    """One checked upload: its bytes as sent and the picture they hold."""

    field: str
    data: bytes
    image: Image.Image

    @property
    def dimensions(self) -> tuple[int, int]:
        """Width and height in pixels."""
        return self.image.size


def problem(field: str, message: str) -> RequestInvalid:
    return RequestInvalid([{"field": field, "message": message}])


def max_text_chars(limits: Limits) -> int:
    """The longest base64 text (or data URL) an upload of `max_upload_bytes` may arrive as."""
    return int(((limits.max_upload_bytes + 2) // 3 * 4 + 256) * BASE64_SLACK)


def decode_text(field: str, text: str, limits: Limits) -> bytes:
    """The bytes of a base64 text or base64 data URL; refuses a text too long for the upload limit
    before decoding it."""
    if len(text) > max_text_chars(limits):
        raise problem(field, f"exceeds the upload limit of {limits.max_upload_bytes} bytes")
    body = text.strip()
    match = DATA_URL.match(body)
    if match:
        mime, params = match["mime"].strip().lower(), match["params"].lower()
        if mime and not mime.startswith("image/"):
            raise problem(field, f"a data URL of {mime!r}; expected data:image/...;base64,")
        if ";base64" not in params:
            raise problem(field, "a data URL must be base64-encoded (data:image/...;base64,...)")
        body = body[match.end():]
    body = re.sub(r"\s+", "", body)
    if not body:
        raise problem(field, "is empty")
    try:
        return base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise problem(field, "is not valid base64 (nor a data:image/...;base64, URL)") from None


def sniffed_format(data: bytes) -> str | None:
    """The format PIL would take `data` for, judged from its first bytes alone (no decoder runs)."""
    Image.init()
    head = data[:64]
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        try:
            if accept is not None and accept(head):
                return name
        except Exception:  # a plug-in's check that trips on a short prefix: not that format
            continue
    return None


def read_image(field: str, data: bytes, limits: Limits) -> Image.Image:
    """The picture in `data`, fully loaded, turned upright by its EXIF orientation; refuses bytes over
    the upload limit, formats other than PNG, JPEG and WEBP (named, without opening them), what PIL
    cannot read, and pictures over the pixel budget (from the header, before decoding them)."""
    if len(data) > limits.max_upload_bytes:
        raise problem(field, f"is {len(data)} bytes, over the upload limit of {limits.max_upload_bytes} bytes")
    if not data:
        raise problem(field, "is empty")
    kind = sniffed_format(data)
    if kind is not None and kind not in FORMATS:
        raise problem(field, f"is {kind}; this server takes {', '.join(FORMATS[:-1])} or {FORMATS[-1]} images")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = image.size
            if width * height > limits.max_pixels:
                raise problem(
                    field, f"is {width}x{height} = {width * height} pixels, over the pixel budget of {limits.max_pixels}"
                )
            image.load()
            return ImageOps.exif_transpose(image)
    except RequestInvalid:
        raise
    except Image.DecompressionBombError as exc:  # PIL's own ceiling, met in the header while opening
        counted = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"is {counted[1]} pixels, " if counted else "has more pixels than "
        raise problem(field, f"{size}over the pixel budget of {limits.max_pixels}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        detail = "not an image PIL can read as PNG, JPEG or WEBP" if isinstance(exc, UnidentifiedImageError) else f"a broken image ({exc})"
        raise problem(field, detail) from None


def decode_upload(field: str, value: str | bytes, limits: Limits) -> Upload:
    data = value if isinstance(value, bytes) else decode_text(field, value, limits)
    return Upload(field=field, data=data, image=read_image(field, data, limits))


def transparency(image: Image.Image) -> Image.Image | None:
    """The alpha channel of a picture with transparency (a pixel not fully opaque), else None."""
    if "A" not in image.getbands() and not (image.mode == "P" and "transparency" in image.info):
        return None
    alpha = image.convert("RGBA").getchannel("A")
    return alpha if alpha.getextrema()[0] < 255 else None


def check_mask(init: Image.Image, mask: Image.Image) -> None:
    if mask.size != init.size:
        raise problem(
            "mask_image",
            f"is {mask.width}x{mask.height}, but the init image is {init.width}x{init.height}; they must be the same size",
        )


def fitted_size(request: GenerateRequest, init: Image.Image, limits: Limits) -> dict[str, int]:
    """Width and height for a request that left them out: the init image's size (or, with one of the
    two given, the other from its aspect ratio), in multiples of 8 within the side limits."""
    given = request.model_fields_set & {"width", "height"}
    if given == {"width", "height"}:
        return {}
    width, height = init.size
    if given == {"width"}:
        width, height = request.width, round(request.width * height / width)
    elif given == {"height"}:
        width, height = round(request.height * width / height), request.height

    def side(value: int) -> int:
        return min(limits.max_side, max(limits.min_side, value // 8 * 8))

    return {"width": side(width), "height": side(height)}


@dataclass(frozen=True)
class Prepared:
    """A request made ready for the queue: the images taken out (checked) and the size settled."""

    request: GenerateRequest
    init: Upload | None = None
    mask: Upload | None = None
    control: Upload | None = None

    @property
    def uploads(self) -> list[Upload]:
        return [u for u in (self.init, self.mask, self.control) if u is not None]


def prepare(request: GenerateRequest, limits: Limits) -> Prepared:
    """Decodes and checks the request's init and mask images, and returns the request without them,
    its size taken from the init image when it gave none; RequestInvalid naming width or height when
    that size is over the limits. (A mask without an init image never gets here: GenerateRequest
    refuses it.) Decoding is CPU work: call it in a thread from an event loop."""
    control = None
    if controlnet_names(request) and control_image_text(request) is None:
        raise problem("stages" if request.stages else "controlnet", "a ControlNet needs a control image: send it as base64 in the unit's image")
    if (text := control_image_text(request)) is not None:
        checked = decode_upload("controlnet", text, limits)
        control = Upload(field="control_image", data=checked.data, image=checked.image)
        request = without_control_image(request)
    if request.init_image is None:
        return Prepared(request=request, control=control)
    init = decode_upload("init_image", request.init_image, limits)
    mask = decode_upload("mask_image", request.mask_image, limits) if request.mask_image is not None else None
    if mask is not None:
        check_mask(init.image, mask.image)
    fitted = fitted_size(request, init.image, limits)
    prepared = request.model_copy(update={"init_image": None, "mask_image": None, **fitted})
    problems = limit_problems(prepared, limits)
    if problems:
        note = f" (the size follows the init image's {init.image.width}x{init.image.height})" if fitted else ""
        sized = ("width", "height")
        raise RequestInvalid([{**p, "message": p["message"] + (note if p["field"] in sized else "")} for p in problems])
    return Prepared(request=prepared, init=init, mask=mask, control=control)


def object_name(prefix: str, field: str) -> str:
    """Where an upload of job (or group) `prefix` lies: `<prefix>/init` or `<prefix>/mask`."""
    return f"{prefix}/{OBJECT_SUFFIX[field]}"


async def put_checked(obs: Any, name: str, data: bytes, *, timeout_s: float = 30.0) -> None:
    """Puts bytes into object store `imagegen-uploads` (`obs`) under `name`; StoreFull when it is full."""
    try:
        await asyncio.wait_for(obs.put(name, data), timeout_s)
    except Exception as exc:
        if is_full(exc):
            raise StoreFull(UPLOADS_BUCKET, None, MAX_BYTES_FLAG[UPLOADS_BUCKET]) from None
        raise


async def store(obs: Any, name: str, upload: Upload, *, timeout_s: float = 30.0) -> UploadRef:
    """Puts the upload's bytes into object store `imagegen-uploads` (`obs`) under `name`."""
    await put_checked(obs, name, upload.data, timeout_s=timeout_s)
    width, height = upload.dimensions
    return UploadRef(name=name, size=len(upload.data), width=width, height=height)


async def fetch(obs: Any, ref: UploadRef, field: str, limits: Limits, *, timeout_s: float = 30.0) -> Image.Image:
    """Reads an upload back and checks it as the gateway did; RequestInvalid naming `field` when it is
    missing, too large (known before reading it) or not a picture within the limits."""
    from nats.js.errors import NotFoundError, ObjectNotFoundError

    try:
        info = await asyncio.wait_for(obs.get_info(ref.name), timeout_s)
        if (info.size or 0) > limits.max_upload_bytes:
            raise problem(field, f"upload {ref.name!r} is {info.size} bytes, over the upload limit of {limits.max_upload_bytes} bytes")
        result = await asyncio.wait_for(obs.get(ref.name), timeout_s)
    except (ObjectNotFoundError, NotFoundError):
        raise problem(
            field, f"upload {ref.name!r} is not in object store {UPLOADS_BUCKET} (never stored, deleted, or expired)"
        ) from None
    return await asyncio.to_thread(read_image, field, result.data, limits)  # decoding off the event loop


async def fetch_inputs(obs: Any, envelope: JobEnvelope, limits: Limits) -> tuple[Image.Image | None, Image.Image | None]:
    """The init image and mask a job references (None, None for text-to-image), checked as on submit."""
    if envelope.init_image is None:
        return None, None
    init = await fetch(obs, envelope.init_image, "init_image", limits)
    mask = await fetch(obs, envelope.mask_image, "mask_image", limits) if envelope.mask_image is not None else None
    if mask is not None:
        check_mask(init, mask)
    return init, mask


async def fetch_control(obs: Any, envelope: JobEnvelope, limits: Limits) -> Image.Image | None:
    """The control image a job's ControlNet stages read, if it has one."""
    if envelope.control_image is None:
        return None
    return await fetch(obs, envelope.control_image, "control_image", limits)


async def delete(obs: Any, names: list[str]) -> None:
    """Removes uploads; one already gone is no error."""
    from nats.js.errors import NotFoundError, ObjectNotFoundError

    for name in names:
        try:
            await obs.delete(name)
        except (ObjectNotFoundError, NotFoundError):
            pass


async def release(kv: Any, obs: Any, status: JobStatus) -> None:
    """Removes the uploads of a job being deleted (after its tombstone is written), unless another job
    of its group that is not deleted still reads them. Uploads of jobs never deleted expire with the
    bucket's TTL, the same as status records."""
    stored = [ref.name for ref in (status.init_image, status.mask_image, status.control_image) if ref is not None]
    if not stored:
        return
    for sibling in group_job_ids(status.group_id, status.group_size) if status.group_id else []:
        other = await jobstore.read_status(kv, sibling) if sibling != status.job_id else None
        shared = [ref for ref in (other.init_image, other.control_image) if ref is not None] if other is not None else []
        if other is not None and not other.deleted and any(ref.name in stored for ref in shared):
            return
    await delete(obs, stored)
