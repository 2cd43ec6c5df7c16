"""orjson everywhere: the dramatiq message encoder and the helpers for records."""

from __future__ import annotations

from typing import Any

import orjson
from dramatiq.encoder import Encoder, MessageData
from dramatiq.errors import DecodeError
from pydantic import BaseModel


def dumps(value: Any) -> bytes:
    """Serialise a contract, a dict of plain data, or a mix of both."""
    if isinstance(value, BaseModel):
        return orjson.dumps(value.model_dump(mode="json"))
    return orjson.dumps(value, default=_default)


def loads(data: bytes | str) -> Any:
    return orjson.loads(data)


def _default(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    raise TypeError(f"cannot encode {type(value).__name__}")


class OrjsonEncoder(Encoder):
    """dramatiq ``Encoder`` over orjson; never pickle."""

    def encode(self, data: MessageData) -> bytes:
        return dumps(data)

    def decode(self, data: bytes) -> MessageData:
        try:
            decoded = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise DecodeError(f"message is not JSON: {exc}", data, exc) from None
        if not isinstance(decoded, dict):
            raise DecodeError("message is not a JSON object", data, TypeError(type(decoded).__name__))
        return decoded
