"""How a processed message leaves its queue. The router decides; the consumer applies it atomically."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dramatiq.broker import MessageProxy
from dramatiq.common import dq_name
from dramatiq.message import Message
from pydantic import ValidationError

from mesh.contracts.deadletter import Attempt, DeadLetter

if TYPE_CHECKING:
    from .jobs import Change


@dataclass(frozen=True)
class JobWrite:
    """The job-record change an attempt's failure makes, applied by the settle script in the same
    atomic step as the message's fate: the record and the message can never tell different stories,
    however long Redis is away (the consumer retries the whole settlement until it goes through)."""

    job_id: str
    change: Change
    #: The failed attempt's step and fencing token: a step this attempt already recorded as succeeded
    #: (the failure struck after the record's EXEC, e.g. a time limit) settles as done, not failed.
    step_id: str | None = None
    token: int | None = None
    #: Trace events (JSON objects) written with it; ``change`` may append to them (a join's decision),
    #: so they are read after it ran.
    events: Sequence[dict[str, Any]] = ()
    #: ``{job_id}/{step_id}``: leaves the index of running steps.
    running_member: str | None = None
    #: ``(claim key, owner)`` of a claim whose release did not go through: freed in the same step.
    release: tuple[str, str] | None = None


@dataclass(frozen=True)
class RetryLater:
    """Put ``message`` (a fresh copy) on the delay queue and settle the original, in one step."""

    message: Message
    delay_ms: int
    stat: str = "retried"
    #: ``{failure class}:{route}``, counted in ``{ns}:routes``.
    route: str = "unknown:retry"
    job: JobWrite | None = None


@dataclass(frozen=True)
class DeadLetterIt:
    """Move the original into the mesh DLQ as ``entry``, in one step."""

    entry: DeadLetter
    stat: str = "dead_lettered"
    route: str = "unknown:dead_letter"
    job: JobWrite | None = None


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


def delayed_copy(message: Message, delay_ms: int, *, now_ms: int, args: tuple[Any, ...] | None = None,
                 **options: Any) -> Message:
    """A fresh copy of ``message`` for its queue's delay queue, due ``delay_ms`` after ``now_ms``:
    the Redis server's time (:func:`~mesh.broker.clock.server_now_ms`), so the due time means the
    same on every host whatever this one's clock says (see :class:`~mesh.broker.clock.DelayClock`)."""
    return message.copy(
        queue_name=dq_name(message.queue_name),
        args=message.args if args is None else args,
        options={"redis_message_id": str(uuid.uuid4()), "eta": now_ms + delay_ms, **options},
    )


#: The options the mesh writes on a message, and the JSON type each must have.
MESH_OPTIONS: dict[str, type | tuple[type, ...]] = {
    "mesh_defers": int, "mesh_waits": int, "mesh_replays": int, "mesh_attempts": list, "mesh_output": dict,
    "mesh_flow": dict, "mesh_flow_waits": int,
}


def options_problem(options: dict[str, Any], queue_name: str | None = None) -> str | None:
    """Why the options on a message fetched from ``queue_name`` are malformed (a foreign or corrupted
    producer), or None.

    Checked when the message is fetched: a message the mesh's own hooks could not route is poison,
    dead-lettered with its bytes, never a hook error that dramatiq would log and ack away. So is one
    dramatiq's worker would mishandle: ``throws`` (an actor option; a string there crashes the worker
    thread that ran the message) and an ``eta`` on a ready queue (dramatiq would hold the message in
    memory until then, out of the queue's counts, taking a prefetch slot; the mesh only puts delayed
    messages on delay queues)."""
    if "throws" in options:
        return f"option throws is {type(options['throws']).__name__}: an actor's option, not a message's"
    if "eta" in options and queue_name is not None and not queue_name.endswith(".DQ"):
        return f"option eta {str(options['eta'])[:40]!r} on ready queue {queue_name!r}: only delay queues hold etas"
    for name, kind in MESH_OPTIONS.items():
        if name not in options:
            continue
        value = options[name]
        if not isinstance(value, kind) or isinstance(value, bool) or (isinstance(value, int) and value < 0):
            return f"option {name} is {type(value).__name__} {str(value)[:40]!r}, not {kind.__name__}"  # type: ignore[union-attr]
    for i, attempt in enumerate(options.get("mesh_attempts", ())):
        try:
            Attempt.model_validate(attempt)
        except ValidationError as exc:
            return f"option mesh_attempts[{i}] is not an attempt record ({exc.error_count()} error(s))"
    return None
