"""Secret values known to this process, and their redaction from anything the mesh keeps.

Tools read their secrets at run time (``agents/context.py``) and the model provider its API key
(``MESH_MODEL_API_KEY``); each value is registered here. Every error text and traceback the mesh
writes (dead letters, trace events, job records), every step output before it is recorded or handed
on (job record, claim, trace, the next steps' messages and so their dead letters and drain files)
and every log line the mesh's formatters write (``ops/logs.py``) goes through :func:`redact` or
:func:`redact_value`. A secret therefore never reaches Redis or a log.

Values are masked before they are serialised (:func:`redact_value` walks the data), never in the
serialised text, so masking cannot break JSON; and a secret must be at least :data:`MIN_LENGTH`
characters long, so masking cannot eat ordinary words or numbers. A value registered with ``until``
(a credential minted for one call, ``agents/credentials.py``) is masked until then and forgotten
after, so a worker minting one per call does not mask an ever-growing list.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Mapping
from typing import Any

MASK = "[secret]"
#: Secrets shorter than this are refused: masking them would mask ordinary words and numbers.
MIN_LENGTH = 8

_values: set[str] = set()
#: Values masked until a time (Unix s), and a heap of those times to forget them in order.
_until: dict[str, float] = {}
_expiring: list[tuple[float, str]] = []
#: ``_values``, longest first: what :func:`redact` reads (replaced whole, so a reader never sees it change).
_ordered: tuple[str, ...] = ()
_lock = threading.Lock()


class SecretTooShort(ValueError):
    """A secret value shorter than :data:`MIN_LENGTH`: the mesh could not keep it out of what it stores."""


def register(value: str, name: str = "a secret", *, until: float | None = None) -> None:
    """Mask ``value`` from now on (``until``: until that Unix time, s). SecretTooShort (naming
    ``name``, never the value) when it is shorter than :data:`MIN_LENGTH`: masking it would corrupt
    ordinary text, and not masking it would let it reach Redis and the logs."""
    if len(value) < MIN_LENGTH:
        raise SecretTooShort(f"{name} is {len(value)} characters long; the mesh masks secrets of "
                             f"{MIN_LENGTH} characters or more and refuses shorter ones")
    with _lock:
        _forget_expired(time.time())
        if until is None:
            _until.pop(value, None)  # masked for good, whatever it was registered with before
        elif value not in _values or value in _until:
            _until[value] = max(until, _until.get(value, until))
            heapq.heappush(_expiring, (_until[value], value))
        _values.add(value)
        _reorder()


def _reorder() -> None:
    global _ordered
    _ordered = tuple(sorted(_values, key=len, reverse=True))


def _forget_expired(now: float) -> None:
    while _expiring and _expiring[0][0] < now:
        at, value = heapq.heappop(_expiring)
        if _until.get(value) == at:
            del _until[value]
            _values.discard(value)


def redact(text: str) -> str:
    """``text`` with every registered secret value masked."""
    ordered = _ordered
    if not ordered or not text:
        return text
    for value in ordered:
        if value in text:
            text = text.replace(value, MASK)
    return text


def redact_value(data: Any) -> Any:
    """``data`` (JSON-shaped: mappings, lists, strings, numbers) with every registered secret masked
    in its strings and mapping keys; numbers, booleans and None are kept as they are (a secret is a
    string: a number that happens to contain its digits is not it). Anything else becomes its
    masked ``str``."""
    if not _ordered:
        return data
    if isinstance(data, str):
        return redact(data)
    if data is None or isinstance(data, (bool, int, float)):
        return data
    if isinstance(data, Mapping):
        return {redact_value(k) if isinstance(k, str) else k: redact_value(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [redact_value(v) for v in data]
    return redact(str(data))
