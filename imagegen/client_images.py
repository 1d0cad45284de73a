"""The images a client sends and gets: an init or mask image as the request's base64 text, and the
bytes of a finished image as a PIL image."""

from __future__ import annotations

import base64
import io
import os
from typing import Any

from PIL import Image

from imagegen.client_errors import ImagegenError

INLINE_TEXT = 1024  # a str this long (or a data: URL) is the image itself, shorter ones name a file


def upload_text(field: str, value: Any) -> str | None:
    """An init or mask image as the request's base64 text: from a PIL image (sent as PNG), bytes, a file
    path, or a base64 / data URL text as it is."""
    if value is None:
        return None
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        value = buffer.getvalue()
    elif isinstance(value, str) and (value.startswith("data:") or len(value) >= INLINE_TEXT):
        return value
    elif isinstance(value, (str, os.PathLike)):
        try:
            with open(value, "rb") as file:
                value = file.read()
        except OSError as exc:
            raise ImagegenError(f"{field}: cannot read {os.fspath(value)!r}: {exc.strerror}", field=field) from None
    if not isinstance(value, (bytes, bytearray)):
        raise ImagegenError(f"{field}: expected a PIL image, bytes, a file path or base64 text", field=field)
    return base64.b64encode(bytes(value)).decode("ascii")


def open_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image
