"""The effect ledger: per step, the intent, outcome and verdict of each effectful tool call.

    {ns}:ledger:{job_id}:{step_id}   hash "1", "2", ... -> JSON :class:`EffectEntry`

The intent is written before the call goes out and the outcome after it returns, so a worker that
dies between the two leaves an intent without an outcome: the next attempt (a redelivery, a replay)
finds it and settles it by the tool's verifier instead of calling again (see
:mod:`mesh.agents.effects`). Calls are numbered in the order the handler makes them, so a re-run
handler meets its earlier calls again in the same order.

Every write renews the hash's life to MESH_DEDUP_TTL_S (the claims' window, which outlives dead
letters: a replayed step still finds its ledger). Effects whose verdict is ``unknown`` are indexed
in ``{ns}:effects.unknown`` (the ``mesh_effects_unknown`` gauge and its alert); an operator's
verification or settlement is written to the ``{ns}:effects.audit`` stream.
"""

from __future__ import annotations

import time
from typing import Any

import redis

from mesh.contracts import LeaseLost, dumps, loads
from mesh.contracts.effects import EffectEntry, Verdict

from .keys import Keys

#: The audit stream keeps about this many records (oldest trimmed first).
AUDIT_MAXLEN = 100_000

#: Counters in ``{ns}:stats``, one per verdict reached (``mesh_effects_<verdict>``).
STAT = "effects_{}"

#: One write of a call's entry, in one round trip. KEYS: the ledger, ``effects.unknown``, ``stats``,
#: ``effects.audit``. ARGV: call number, entry JSON, its fencing token, TTL (ms), verdict ("" none),
#: its name in the index, now (s), the index's horizon (s), the stats field, then the audit record's
#: field/value pairs (none: no audit). Refused (0) when the entry stored for that call carries a
#: higher token; 1 when written.
WRITE = """
local held = redis.call('HGET', KEYS[1], ARGV[1])
if held then
  local token = cjson.decode(held)['token']
  if token and tonumber(token) > tonumber(ARGV[3]) then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
if ARGV[5] == 'unknown' then
  redis.call('ZADD', KEYS[2], ARGV[7], ARGV[6])
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[8])
elseif ARGV[5] ~= '' then
  redis.call('ZREM', KEYS[2], ARGV[6])
end
if ARGV[5] ~= '' then
  redis.call('HINCRBY', KEYS[3], ARGV[9], 1)
end
if #ARGV > 9 then
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[10], '*', unpack(ARGV, 11))
end
return 1
"""


def member(job_id: str, step_id: str, n: int) -> str:
    """An effect's name in ``{ns}:effects.unknown``."""
    return f"{job_id}/{step_id}/{n}"


class Ledger:
    """The effect ledger of one step (see the module docstring)."""

    def __init__(self, client: redis.Redis, keys: Keys, job_id: str, step_id: str, ttl_s: float) -> None:
        self.client = client
        self.keys = keys
        self.job_id = job_id
        self.step_id = step_id
        self.key = keys.ledger(job_id, step_id)
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self._write = client.register_script(WRITE)

    def get(self, n: int) -> EffectEntry | None:
        raw: Any = self.client.hget(self.key, str(n))
        return None if raw is None else EffectEntry.model_validate(loads(raw))

    def entries(self) -> list[EffectEntry]:
        """Every call the step made, in order."""
        raw: Any = self.client.hgetall(self.key)
        found = [EffectEntry.model_validate(loads(v)) for v in raw.values()]
        return sorted(found, key=lambda e: e.n)

    def write(self, entry: EffectEntry, *, audit: dict[str, Any] | None = None) -> EffectEntry:
        """Store ``entry`` unless the ledger holds that call under a higher fencing token (a stale
        owner, paused while a takeover made the call again, never overwrites the newer owner's
        record), count its verdict, index an unknown one (a decided one leaves the index) and add
        ``audit`` to the audit stream: one script, one round trip. An index entry older than the
        ledger's own life names an effect nobody can look up any more: it is trimmed. LeaseLost when
        refused: the stale owner stops there (its intent refused, its call is never made)."""
        now = time.time()
        verdict = entry.verdict.value if entry.verdict is not None else ""
        args: list[Any] = [str(entry.n), dumps(entry.model_dump(mode="json")), entry.token, self.ttl_ms, verdict,
                           member(self.job_id, self.step_id, entry.n), now, now - self.ttl_ms / 1000,
                           STAT.format(verdict)]
        if audit is not None:
            args += [AUDIT_MAXLEN, "job_id", self.job_id, "step_id", self.step_id, "n", str(entry.n),
                     "tool", entry.tool, "at", f"{now:.3f}", "detail", dumps(audit)]
        written = self._write(keys=[self.key, self.keys.effects_unknown, self.keys.stats, self.keys.effects_audit],
                              args=args)
        if not written:
            # A newer owner holds the call: this attempt neither records nor makes it.
            raise LeaseLost(entry.key, entry.token)
        return entry

    def intent(self, n: int, tool: str, args: dict[str, Any], args_hash: str, key: str, token: int) -> EffectEntry:
        """Record that call ``n`` is about to go out: written before the call, never after."""
        entry = EffectEntry(n=n, tool=tool, args=args, args_hash=args_hash, key=key, token=token,
                            intent_at=time.time())
        return self.write(entry)

    def outcome(self, entry: EffectEntry, outcome: Any = None, *, error: str | None = None,
                verdict: Verdict | None = None, reason: str | None = None) -> EffectEntry:
        """Record what the tool answered (and, when already known, the verdict)."""
        now = time.time()
        update: dict[str, Any] = {"outcome": outcome, "outcome_at": now, "error": error}
        if verdict is not None:
            update.update(verdict=verdict, verdict_at=now, reason=reason)
        return self.write(entry.model_copy(update=update))

    def decide(self, entry: EffectEntry, verdict: Verdict, reason: str | None = None, *, by: str | None = None,
               audit: dict[str, Any] | None = None) -> EffectEntry:
        """Record ``entry``'s verdict (``by``: the operator who settled it by hand)."""
        decided = entry.model_copy(update={"verdict": verdict, "verdict_at": time.time(), "reason": reason, "by": by})
        return self.write(decided, audit=audit)


def unknown_count(client: redis.Redis, keys: Keys) -> int:
    """How many effects nobody has proven (verdict ``unknown``)."""
    return int(client.zcard(keys.effects_unknown))


def audit_records(client: redis.Redis, keys: Keys, job_id: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """The newest verifications and settlements first (only ``job_id``'s when given)."""
    rows: Any = client.xrevrange(keys.effects_audit, count=max(limit * 10, 1000))
    out = []
    for stream_id, fields in rows:
        f = {k.decode(): v.decode() for k, v in fields.items()}
        if job_id is None or f["job_id"] == job_id:
            out.append({"id": stream_id.decode(), "job_id": f["job_id"], "step_id": f["step_id"], "n": int(f["n"]),
                        "tool": f["tool"], "at": float(f["at"]), **loads(f["detail"])})
    return out[:limit]
