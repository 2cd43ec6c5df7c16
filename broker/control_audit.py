"""Who changed a fleet-wide control by hand, when, and how: a breaker closed (``mesh breakers
reset``), a flow limit set or reset (``mesh limits set/reset``). One capped Redis stream per control
(``{ns}:breakers.audit``, ``{ns}:limits.audit``), each record written in the same transaction as the
change it records, as the DLQ's audit log is (:mod:`mesh.dlq.audit`); the CLI records the operator
(``user@host``, or ``--by``), the console its logged-in user."""

from __future__ import annotations

import time
from typing import Any

import redis

from mesh.contracts import dumps, loads

#: Each stream keeps about this many records (oldest trimmed first).
AUDIT_MAXLEN = 10_000


def stage(pipe: Any, stream: str, op: str, target: str, who: str, **detail: Any) -> None:
    """Add one record to ``pipe`` (a MULTI that also makes the change): ``op`` done to ``target``
    (a breaker's dependency, a limit's name) by ``who``, with ``detail`` (JSON)."""
    pipe.xadd(stream, {"op": op, "target": target, "who": who, "at": f"{time.time():.3f}", "detail": dumps(detail)},
              maxlen=AUDIT_MAXLEN, approximate=True)


def records(client: redis.Redis, stream: str, limit: int = 100) -> list[dict[str, Any]]:
    """The newest ``limit`` records of ``stream``, newest first (one XREVRANGE)."""
    rows: Any = client.xrevrange(stream, count=limit)
    out = []
    for stream_id, fields in rows:
        f = {k.decode(): v.decode() for k, v in fields.items()}
        out.append({"id": stream_id.decode(), "op": f["op"], "target": f["target"], "who": f["who"],
                    "at": float(f["at"]), "detail": loads(f["detail"])})
    return out
