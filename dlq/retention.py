"""DLQ retention (MESH_DLQ_RETENTION_S; 0 keeps dead letters until an operator removes them).

Entries dead-lettered longer ago than the retention leave the DLQ oldest first, each with its
indexes and an ``expire`` audit record in one transaction, counted in ``dlq_expired``: nothing
leaves silently. It runs in the retention sweep (ops/sweeper.py) on its own schedule, whether or
not anything fails, and never on the dead-letter path itself.
"""

from __future__ import annotations

import redis

from .audit import Audit
from .store import DeadLetterStore, Filter, Stored


def expire_dead_letters(store: DeadLetterStore, audit: Audit, retention_s: float, now: float) -> int:
    """Remove every entry dead-lettered at or before ``now - retention_s`` (``now`` in s, the Redis
    server's clock); returns how many left. Safe beside replay, drain and purge: an entry one of
    them took meanwhile is neither removed nor counted here."""
    if retention_s <= 0:
        return 0
    removed = 0
    for batch in store.iter(Filter(until=now - retention_s)):
        removed += _expire(store, audit, batch, retention_s)
    return removed


def _expire(store: DeadLetterStore, audit: Audit, batch: list[Stored], retention_s: float) -> int:
    keys = [store.keys.dead_letter(s.entry.entry_id) for s in batch]
    with store.client.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(*keys)
                # Read on another connection: WATCH still voids the EXEC if an entry goes meanwhile.
                reads = store.client.pipeline(transaction=False)
                for key in keys:
                    reads.exists(key)
                entries = [s.entry for s, here in zip(batch, reads.execute(), strict=True) if here]
                pipe.multi()
                store.remove(entries, pipe)
                for entry in entries:
                    audit.stage(pipe, "expire", entry.entry_id, dead_lettered_at=entry.dead_lettered_at,
                                retention_s=retention_s, agent=entry.agent, failure_class=entry.failure_class)
                if entries:
                    pipe.hincrby(store.keys.stats, "dlq_expired", len(entries))
                pipe.execute()
                return len(entries)
            except redis.WatchError:
                continue
