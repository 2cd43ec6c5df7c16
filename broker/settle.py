"""How a processed message leaves its queue. The router decides; the consumer applies it atomically."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from dramatiq.broker import MessageProxy
from dramatiq.common import current_millis, dq_name
from dramatiq.message import Message

from dlq.entry import DeadLetter


@dataclass(frozen=True)
class RetryLater:
    """Put ``message`` (a fresh copy) on the delay queue and settle the original, in one step."""

    message: Message
    delay_ms: int
    stat: str = "retried"
    #: ``{failure class}:{route}``, counted in ``{ns}:routes``.
    route: str = "unknown:retry"


@dataclass(frozen=True)
class DeadLetterIt:
    """Move the original into the mesh DLQ as ``entry``, in one step."""

    entry: DeadLetter
    stat: str = "dead_lettered"
    route: str = "unknown:dead_letter"


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


def delayed_copy(message: Message, delay_ms: int, *, args: tuple[Any, ...] | None = None, **options: Any) -> Message:
    """A fresh copy of ``message`` for its queue's delay queue, due in ``delay_ms``."""
    return message.copy(
        queue_name=dq_name(message.queue_name),
        args=message.args if args is None else args,
        options={"redis_message_id": str(uuid.uuid4()), "eta": current_millis() + delay_ms, **options},
    )
