"""msgpack on the wire, with a schema version in every message."""

from __future__ import annotations

from enum import Enum
from typing import Any, TypeVar

import msgpack
from pydantic import BaseModel, ValidationError

SCHEMA_VERSION = 1

M = TypeVar("M", bound=BaseModel)


class DecodeError(ValueError):
    """Bytes that are not a message of the expected type and version; the text says why."""


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    raise TypeError(f"cannot encode {type(value).__name__}")


def encode(model: BaseModel) -> bytes:
    body = model.model_dump(mode="python", exclude_none=True)
    body["v"] = SCHEMA_VERSION
    return msgpack.packb(body, use_bin_type=True, default=_plain)


def decode(data: bytes, model: type[M]) -> M:
    try:
        body: Any = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise DecodeError(f"not msgpack: {exc.__class__.__name__}: {exc}") from None
    if not isinstance(body, dict):
        raise DecodeError(f"expected a msgpack map, got {type(body).__name__}")
    version = body.pop("v", None)
    if version != SCHEMA_VERSION:
        raise DecodeError(f"unsupported schema version {version!r}, this side speaks {SCHEMA_VERSION}")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        fields = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'message'}: {e['msg']}" for e in exc.errors()
        )
        raise DecodeError(f"invalid {model.__name__}: {fields}") from None
