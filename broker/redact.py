"""Secret values known to this process, and their redaction from any text the mesh keeps.

Tools read their secrets at run time (``agents/context.py``); each value read is registered here,
and every error text and traceback the mesh writes (dead letters, trace events, job records) and
every log line the mesh's formatters write (``ops/logs.py``) goes through :func:`redact`. A secret
therefore never reaches Redis or a log.
"""

from __future__ import annotations

import threading

MASK = "[secret]"
#: Values shorter than this are not masked: they would mask ordinary words.
MIN_LENGTH = 6

_values: set[str] = set()
_lock = threading.Lock()


def register(value: str) -> None:
    if len(value) >= MIN_LENGTH:
        with _lock:
            _values.add(value)


def redact(text: str) -> str:
    """``text`` with every registered secret value masked."""
    if not _values or not text:
        return text
    for value in sorted(_values, key=len, reverse=True):
        if value in text:
            text = text.replace(value, MASK)
    return text

