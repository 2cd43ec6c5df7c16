"""What a dead letter must satisfy before ``mesh dlq load`` takes it from a file or a replay sends it.

A replay writes to the keys its message names: the queue name inside the raw bytes is a Redis key
(``{ns}:{queue}``), so an unchecked one writes into the mesh's own keys (``stats``, a claim), and an
entry's agent label is what ``--agent`` selects by. So a message is replayed only to an agent the
deployment knows (a built-in or a published one), on that agent's own queue, under the label its
entry carries; and an export file is read within caps, line by line, never whole.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis

from mesh.broker.keys import Keys
from mesh.broker.registry import Registry
from mesh.broker.settings import MeshSettings
from mesh.contracts import CONTRACTS, FailureClass, loads

from .entry import DeadLetter

#: A queue or agent label an entry may carry: a dramatiq queue name (no ``:``, no space or control
#: character), so no label is a key of another family or prints as a terminal escape.
LABEL = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")

_DEFAULTS = MeshSettings.model_fields


@dataclass(frozen=True)
class Limits:
    """The caps on an export file: the longest line read and the largest raw message an entry carries
    (MESH_DLQ_MAX_LINE_BYTES, MESH_DLQ_MAX_RAW_BYTES)."""

    max_line_bytes: int = 4 * int(_DEFAULTS["max_message_bytes"].default)
    max_raw_bytes: int = int(_DEFAULTS["max_message_bytes"].default)

    @classmethod
    def of(cls, settings: MeshSettings) -> Limits:
        return cls(settings.dlq_line_cap, settings.dlq_raw_cap)


def shown(value: Any) -> str:
    """A value from a file, quoted for a message: control characters escaped, at most 64 characters."""
    text = repr(value)
    return text if len(text) <= 64 else text[:61] + "..."


def entry_problem(entry: DeadLetter, raw: bytes, limits: Limits) -> str | None:
    """Why ``entry`` (from a file) cannot be stored whatever its message says; None when it can."""
    if len(raw) > limits.max_raw_bytes:
        return f"its message is {len(raw)} bytes, over MESH_DLQ_MAX_RAW_BYTES ({limits.max_raw_bytes})"
    if entry.failure_class not in set(FailureClass):
        return f"failure class {shown(entry.failure_class)} is not one of {', '.join(FailureClass)}"
    if not LABEL.match(entry.queue):
        return f"queue {shown(entry.queue)} is not a queue name"
    if entry.agent not in (None, "-") and not LABEL.match(entry.agent):
        return f"agent {shown(entry.agent)} is not an agent name"
    return None


def message_body(raw: bytes) -> dict[str, Any] | None:
    """The raw bytes as a message's JSON object, when they name a queue and an actor as one does
    (None: poison or a fragment, kept as a record, which replay refuses)."""
    try:
        body = loads(raw)
    except ValueError:
        return None
    return body if isinstance(body, dict) and "queue_name" in body and "actor_name" in body else None


@dataclass(frozen=True)
class Routes:
    """Each agent the deployment knows and its queue: the built-in agents, then every published one."""

    queues: Mapping[str, str]

    @classmethod
    def read(cls, client: redis.Redis, keys: Keys) -> Routes:
        queues = {name: name for name in CONTRACTS}
        queues.update({name: agent.queue for name, agent in Registry(client, keys, 0).agents().items()})
        return cls(queues)

    def problem(self, entry: DeadLetter, body: Mapping[str, Any]) -> str | None:
        """Why the message ``body`` must not be replayed as ``entry``; None when it goes where it says."""
        queue, actor = body.get("queue_name"), body.get("actor_name")
        if not isinstance(queue, str) or not isinstance(actor, str):
            return "its message's queue and agent are not names"
        if actor not in self.queues:
            return (f"its message is for agent {shown(actor)}, which this deployment does not know "
                    "(a worker serving it publishes it)")
        if queue.removesuffix(".DQ") != self.queues[actor]:
            return f"its message names queue {shown(queue)}, not agent {actor}'s queue {self.queues[actor]!r}"
        if entry.agent not in (None, "-", actor):
            return f"it is labelled agent {shown(entry.agent)}, but its message is for agent {actor}"
        args = body.get("args")
        envelope = args[0] if isinstance(args, list) and args and isinstance(args[0], dict) else {}
        if envelope.get("agent", actor) != actor:
            return f"its envelope names agent {shown(envelope.get('agent'))}, but its message is for agent {actor}"
        return None
