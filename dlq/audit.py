"""Who did what to which dead letter, and when: a capped Redis stream written in the same
transaction as the operation it records."""

from __future__ import annotations

import time
from typing import Any

import redis

from mesh.broker.keys import Keys
from mesh.broker.trace import operator
from mesh.contracts import dumps, loads

#: The audit log keeps about this many records (oldest trimmed first).
AUDIT_MAXLEN = 100_000


class Audit:
    def __init__(self, client: redis.Redis, keys: Keys, who: str | None = None) -> None:
        self.client = client
        self.keys = keys
        self.who = who or operator()

    def stage(self, pipe: Any, op: str, entry_id: str, **detail: Any) -> None:
        """Add one record to ``pipe`` (a MULTI that also does the operation)."""
        pipe.xadd(self.keys.dlq_audit, {"op": op, "entry_id": entry_id, "who": self.who, "at": f"{time.time():.3f}",
                                        "detail": dumps(detail)}, maxlen=AUDIT_MAXLEN, approximate=True)

    def records(self, entry_id: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Newest first; only ``entry_id``'s when given (scans at most the whole capped log)."""
        out: list[dict[str, Any]] = []
        last = "+"
        while len(out) < limit:
            rows: Any = self.client.xrevrange(self.keys.dlq_audit, max=last, count=1000)
            if not rows:
                break
            for stream_id, fields in rows:
                f = {k.decode(): v.decode() for k, v in fields.items()}
                if entry_id is None or f["entry_id"] == entry_id:
                    out.append({"id": stream_id.decode(), "op": f["op"], "entry_id": f["entry_id"],
                                "who": f["who"], "at": float(f["at"]), "detail": loads(f["detail"])})
            last = "(" + rows[-1][0].decode()
        return out[:limit]
