"""Pinned tool definitions: what an MCP server's tool said it was the first time the mesh saw it.

The first time a tool of an MCP server is seen (a worker starting to serve an agent that uses it,
or its first call), its name, description, input schema and the annotations the mesh acts on
(``destructiveHint``, ``readOnlyHint``: a server that drops its ``destructiveHint`` would have the
model's calls of the tool made without an approval) are stored with their sha256
(``{ns}:pins:tools``). A server that later presents another description or schema has that tool
refused (``ToolRefused``, permanent, naming what changed): a tool whose description changes under
the agent is how a server turns a model against its user. What it presented is kept beside the pin
(``{ns}:pins:presented``) until an operator compares (``mesh tools diff``) and accepts it
(``mesh tools accept``), which makes it the pin.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
import redis

from mesh.broker.keys import Keys
from mesh.contracts import ToolRefused, dumps, loads

#: The parts of a definition that are pinned, in the order a refusal names them.
PARTS = ("name", "description", "input_schema", "annotations")
#: The tool annotations (MCP's ``ToolAnnotations``) a definition keeps: the ones the mesh acts on.
HINTS = ("destructiveHint", "readOnlyHint")


@dataclass(frozen=True)
class Definition:
    """A tool as a server presents it: its name on the server, description, input JSON Schema and
    the annotations of :data:`HINTS` it gave (by their wire names: ``{"destructiveHint": true}``)."""

    name: str
    description: str
    input_schema: dict[str, Any]
    annotations: dict[str, Any] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """sha256 of the canonical JSON of the pinned parts (keys sorted); a definition without
        annotations hashes as it did before they were pinned."""
        parts = asdict(self)
        if not self.annotations:
            del parts["annotations"]
        return hashlib.sha256(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)).hexdigest()

    @property
    def destructive_hint(self) -> bool:
        """The server marks the tool destructive: ``destructiveHint`` true, ``readOnlyHint`` not
        (MCP's rule: a read-only tool's ``destructiveHint`` means nothing). Only a hint given counts:
        MCP's default (true) is not assumed for a tool without annotations."""
        return self.annotations.get("destructiveHint") is True and self.annotations.get("readOnlyHint") is not True

    def to_json(self, **extra: Any) -> bytes:
        return dumps({**asdict(self), "sha256": self.digest, **extra})

    @classmethod
    def from_json(cls, raw: bytes | str) -> Definition:
        data = loads(raw)
        return cls(name=data["name"], description=data.get("description", ""),
                   input_schema=data.get("input_schema") or {}, annotations=data.get("annotations") or {})

    def changed(self, other: Definition) -> list[str]:
        """Which of :data:`PARTS` differ between ``self`` and ``other``."""
        return [part for part in PARTS if getattr(self, part) != getattr(other, part)]


@dataclass(frozen=True)
class Drift:
    """A tool whose server presented another definition than its pin (what ``mesh tools diff`` shows)."""

    tool: str
    pinned: Definition
    presented: Definition

    @property
    def changed(self) -> list[str]:
        return self.pinned.changed(self.presented)


class Pins:
    """The pinned definitions of a deployment's MCP tools (tool names as declared: ``server.tool``)."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    def check(self, tool: str, presented: Definition) -> None:
        """Pin ``presented`` when ``tool`` has no pin; pass when it matches the pin; otherwise keep it
        for ``mesh tools diff`` and refuse the tool (ToolRefused naming what changed)."""
        fresh = presented.to_json()
        if self.client.hsetnx(self.keys.tool_pins, tool, fresh):
            return
        raw = self.client.hget(self.keys.tool_pins, tool)
        pinned = Definition.from_json(raw) if raw is not None else presented
        if pinned.digest == presented.digest:
            return
        self.client.hset(self.keys.tool_presented, tool, fresh)
        changed = pinned.changed(presented)
        raise ToolRefused(f"tool {tool!r}: its server now presents another {' and '.join(changed)} than the one "
                          f"pinned (sha256 {pinned.digest[:12]}, now {presented.digest[:12]}); refused until an "
                          f"operator accepts it: mesh tools diff {tool}, mesh tools accept {tool}",
                          tool=tool, changed=changed)

    def pinned(self) -> dict[str, Definition]:
        """Every pinned tool and its pinned definition."""
        raw = self.client.hgetall(self.keys.tool_pins)
        return {_text(k): Definition.from_json(v) for k, v in sorted(raw.items())}

    def drifts(self) -> list[Drift]:
        """The tools whose server presented another definition than their pin, by name."""
        presented = self.client.hgetall(self.keys.tool_presented)
        pins = self.pinned()
        found = []
        for raw_tool, raw in sorted(presented.items()):
            tool = _text(raw_tool)
            now = Definition.from_json(raw)
            if tool in pins and pins[tool].digest != now.digest:
                found.append(Drift(tool, pins[tool], now))
        return found

    def accept(self, tool: str) -> Definition | None:
        """Make what ``tool``'s server presented its pin; None when nothing is waiting."""
        raw = self.client.hget(self.keys.tool_presented, tool)
        if raw is None:
            return None
        pipe = self.client.pipeline(transaction=True)  # one MULTI on a Redis Cluster too (its default: none)
        pipe.hset(self.keys.tool_pins, tool, raw)
        pipe.hdel(self.keys.tool_presented, tool)
        pipe.execute()
        return Definition.from_json(raw)

    def forget(self, tool: str) -> bool:
        """Drop ``tool``'s pin (and what was presented): the next definition seen is pinned."""
        pipe = self.client.pipeline(transaction=True)  # one MULTI on a Redis Cluster too (its default: none)
        pipe.hdel(self.keys.tool_pins, tool)
        pipe.hdel(self.keys.tool_presented, tool)
        return bool(pipe.execute()[0])


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
