"""orjson everywhere: the dramatiq encoder and the helpers for records."""

from __future__ import annotations

from typing import Any

import orjson
from dramatiq.encoder import Encoder, MessageData
from dramatiq.errors import DecodeError
from pydantic import BaseModel
from pydantic_core import PydanticSerializationError

#: Each digit made ``0``, every other byte ``x``: 19 zeros in a row in ``data.translate(_DIGITS)`` are
#: 19 digits in a row, so the JSON may hold an integer orjson refuses (past -2**63 .. 2**64-1), which
#: pydantic's serialiser writes and orjson would read back as a float. (Two C passes: a regex search
#: for the digits costs several times more.)
_DIGITS, _LONG = bytes(48 if 48 <= b <= 57 else 120 for b in range(256)), b"0" * 19


#: Model class -> whether it is stored without its null fields (its ``stored_without_nulls``).
_BARE: dict[type, bool] = {}


def dumps(value: Any) -> bytes:
    """Serialise a contract, a dict of plain data, or a mix of both. A contract goes straight to JSON
    (pydantic's serialiser: the bytes orjson writes of its ``model_dump(mode="json")``, without the
    Python dict in between). What the two might not agree on (a long integer; a value the serialiser
    refuses, such as a lone surrogate) goes through ``model_dump`` and orjson: refused as orjson
    refuses it (a ``TypeError``), never written as something orjson cannot read back. A model whose class
    says ``stored_without_nulls`` (a job record, :class:`~mesh.contracts.jobs.Record`) is written without
    its fields whose value is None."""
    if isinstance(value, BaseModel):
        cls = type(value)
        bare = _BARE.get(cls)
        if bare is None:  # a pydantic model's missing attribute costs an AttributeError each time it is asked
            # as the attribute reads: the nearest class of the MRO that sets it (a subclass may say False)
            bare = _BARE[cls] = bool(next((base.__dict__["stored_without_nulls"] for base in cls.__mro__
                                           if "stored_without_nulls" in base.__dict__), False))
        try:
            data = value.__pydantic_serializer__.to_json(value, exclude_none=bare)
        except PydanticSerializationError:
            data = None
        if data is None or _LONG in data.translate(_DIGITS):
            return orjson.dumps(value.model_dump(mode="json", exclude_none=bare))
        return data
    return orjson.dumps(value, default=_default)


def loads(data: bytes | str) -> Any:
    return orjson.loads(data)


def depth_exceeds(data: bytes, value: Any, limit: int) -> bool:
    """Whether ``value`` (decoded from ``data``) nests objects and arrays deeper than ``limit``.

    Nesting cannot be deeper than the number of opening brackets in the bytes: when they are few
    (the common case) two C-speed counts answer without walking the value."""
    if data.count(b"[") + data.count(b"{") <= limit:
        return False
    return nests_deeper(value, limit)


def nests_deeper(value: Any, limit: int) -> bool:
    """Whether ``value`` nests objects and arrays deeper than ``limit``, walked level by level (no
    recursion: a value too deep to encode is answered too)."""
    level: list[Any] = [value] if isinstance(value, _CONTAINERS) else []
    for _ in range(limit):
        level = [child for node in level for child in (node.values() if type(node) is dict else node)
                 if isinstance(child, _CONTAINERS)]
        if not level:
            return False
    return True


_CONTAINERS = (dict, list, tuple)


def _default(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    raise TypeError(f"cannot encode {type(value).__name__}")


class OrjsonEncoder(Encoder):
    """dramatiq ``Encoder`` over orjson; never pickle.

    dramatiq has one encoder per process, used for messages and by its result backends alike, so
    this takes any JSON value, as dramatiq's ``JSONEncoder`` does: a result may be ``42`` or
    ``None``. A queue message must still be an object: ``Message.decode`` fails on anything else
    with a ``DecodeError``, and the mesh's consumer dead-letters it as poison.
    """

    def encode(self, data: MessageData) -> bytes:
        # Keys that are not strings become strings, as with the stdlib json dramatiq uses by default.
        return orjson.dumps(data, default=_default, option=orjson.OPT_NON_STR_KEYS)

    def decode(self, data: bytes) -> MessageData:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise DecodeError(f"not JSON: {exc}", data, exc) from None
