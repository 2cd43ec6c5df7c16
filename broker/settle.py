"""How a processed message leaves its queue. The router decides; the consumer applies it atomically."""

from __future__ import annotations

from dataclasses import dataclass

from dramatiq.broker import MessageProxy
from dramatiq.message import Message

from dlq.entry import DeadLetter


@dataclass(frozen=True)
class RetryLater:
    """Put ``message`` (a fresh copy) on the delay queue and settle the original, in one step."""

    message: Message
    delay_ms: int


@dataclass(frozen=True)
class DeadLetterIt:
    """Move the original into the mesh DLQ as ``entry``, in one step."""

    entry: DeadLetter
    stat: str = "dead_lettered"


Decision = RetryLater | DeadLetterIt

_ATTR = "mesh_decision"


def decide(message: MessageProxy, decision: Decision) -> None:
    setattr(message, _ATTR, decision)


def decision_of(message: MessageProxy) -> Decision | None:
    return message.__dict__.get(_ATTR)


def raw_of(message: MessageProxy) -> bytes:
    """The bytes the message was fetched as (re-encoded if it was built in memory)."""
    raw = message.__dict__.get("mesh_raw")
    return raw if raw is not None else message._message.encode()
