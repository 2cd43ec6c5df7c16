"""The claim on a message key as stored: one string ``state|token|expires_ms|owner|result`` (see
``scripts/claim_lib.lua``, which every script touching claims runs first). Python reads it here."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis

_LIB = resources.files("mesh.broker").joinpath("scripts/claim_lib.lua").read_text()


def script_source(name: str, *libs: str) -> str:
    """The text of ``scripts/{name}`` with the claim library (and ``libs``, other libraries' text) before it."""
    return "\n".join((_LIB, *libs, resources.files("mesh.broker").joinpath(f"scripts/{name}").read_text()))


@dataclass(frozen=True)
class ClaimState:
    """One claim as read: state claimed|free|done (None: no claim), fencing token, lease end (ms on
    the server's clock), owner, and the stored result of a done key."""

    state: str | None
    token: int = 0
    expires_ms: int = 0
    owner: str = ""
    result: bytes = b""


def parse(value: bytes | None) -> ClaimState:
    """A stored claim string as a :class:`ClaimState`."""
    if not value:
        return ClaimState(None)
    parts = value.split(b"|", 4)
    if len(parts) != 5:
        return ClaimState(None)
    state, token, expires, owner, result = parts
    return ClaimState(state.decode(), int(token or 0), int(expires or 0), owner.decode(), result)


def read(client: Any, key: str) -> ClaimState:
    """The claim at ``key``; a hash left by an earlier release is read too."""
    try:
        return parse(client.get(key))
    except redis.ResponseError:  # WRONGTYPE: the hash an earlier release wrote
        state, owner, token, expires, result = client.hmget(key, "state", "owner", "token", "expires", "result")
        return ClaimState(state.decode() if state else None, int(token or 0), int(expires or 0),
                          owner.decode() if owner else "", result or b"")
