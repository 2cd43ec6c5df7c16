"""What a dead letter keeps: enough to understand the failure and to replay the message as sent."""

from __future__ import annotations

import socket
import time
import traceback as tb
from typing import Any

from pydantic import Field

from .envelope import Frozen

#: The latest time a record may name (UNIX s, year 5138): in ms it is still an exact Redis score.
MAX_TIME_S = 1e11


class Attempt(Frozen):
    """One delivery of the message and how it ended."""

    attempt: int
    outcome: str = Field(description="retried, dead_lettered, ...")
    failure_class: str | None = None
    error: str | None = None
    at: float
    worker: str | None = None


class DeadLetter(Frozen):
    entry_id: str
    queue: str
    agent: str | None = None
    failure_class: str
    error: str
    traceback: str | None = None
    envelope: dict[str, Any] | None = None
    key: str | None = None
    job_id: str | None = None
    trace_id: str | None = None
    attempts: tuple[Attempt, ...] = ()
    worker: str
    host: str = Field(default_factory=socket.gethostname)
    #: UNIX seconds; bounded, as the DLQ's indexes score entries by it in ms (an export file is input).
    dead_lettered_at: float = Field(default_factory=time.time, ge=0, le=MAX_TIME_S, allow_inf_nan=False)
    replay_count: int = 0
    replay_of: str | None = None
    #: The dependency the failure names (``host:port``), when it names one: ``mesh dlq --dependency``.
    dependency: str | None = None
    #: Set when only a prefix of the message was kept (it was over MESH_MAX_MESSAGE_BYTES): its full
    #: length and sha256 (hex), so the original can be recognised.
    raw_bytes: int | None = None
    raw_sha256: str | None = None


def format_traceback(exc: BaseException | None) -> str | None:
    if exc is None:
        return None
    return "".join(tb.format_exception(type(exc), exc, exc.__traceback__))
