"""A tool loop's checkpoints in Redis: each model turn and each tool call of one step.

    {ns}:loop:{job_id}:{step_id}   hash "turn-3" -> JSON turn, "turn-3/call-1" -> JSON call result

A turn is written once the model answered it, a call once it returned; the first write of a field
wins (HSETNX), so an owner that lost its lease while another took over can never replace what the
new owner's conversation holds. A re-run of the step (a redelivery after a crash) reads them back
and replays them instead of asking again (see :mod:`mesh.agents.tool_loop`). Every write renews the
hash's life to MESH_DEDUP_TTL_S, as the effect ledger's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis

from mesh.contracts import dumps, loads

from .keys import Keys

#: Write a field unless it is there, renew the TTL, and return what the field holds.
PUT = """
redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return redis.call('HGET', KEYS[1], ARGV[1])
"""


class Transcript:
    """The checkpoints of one step's tool loop (see the module docstring)."""

    def __init__(self, client: redis.Redis, keys: Keys, job_id: str, step_id: str, ttl_s: float) -> None:
        self.client = client
        self.key = keys.loop(job_id, step_id)
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self._put = client.register_script(PUT)

    def load(self) -> dict[str, dict[str, Any]]:
        """Every checkpoint, by field."""
        raw: Any = self.client.hgetall(self.key)
        return {k.decode() if isinstance(k, bytes) else k: loads(v) for k, v in raw.items()}

    def put(self, field: str, value: dict[str, Any]) -> dict[str, Any]:
        """Checkpoint ``value`` under ``field``; what the field holds (an earlier write wins)."""
        held: Any = self._put(keys=[self.key], args=[field, dumps(value), self.ttl_ms])
        return dict(loads(held))

    def forget(self, fields: Sequence[str]) -> None:
        """Forget these checkpoints (a loop whose prompt changed starts its conversation over)."""
        if fields:
            self.client.hdel(self.key, *fields)

    def clear(self) -> None:
        """Forget the conversation: a retry of the step starts it over."""
        self.client.delete(self.key)
