"""What a tool is given and what it must return."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import redis

from broker.keys import Keys
from broker.settings import MeshSettings
from contracts import Frozen, Receipt


@dataclass(frozen=True)
class ToolContext:
    """Everything a tool may use. ``key`` is the message key: effects are applied once per key."""

    key: str
    job_id: str
    trace_id: str
    fencing_token: int
    settings: MeshSettings
    redis: redis.Redis
    keys: Keys
    http: httpx.Client


Tool = Callable[[ToolContext, Any], Receipt]


def effect_id(key: str) -> str:
    """The id of the effect a key produces: the same key always names the same effect."""
    return hashlib.sha256(key.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class ToolSpec:
    name: str
    args: type[Frozen]
    run: Tool
