"""Retention of per-job keys: the part TTLs cannot do by themselves.

A job's record and trace expire MESH_JOB_RETENTION_S after the job ends (the TTL is set by the write
that ends it, broker/jobs.py); a note expires MESH_NOTE_RETENTION_S after it is written. Members of
the sorted sets that index them (``jobs``, ``running``, ``notes``) cannot expire, so a sweep
(:class:`Retention`, run by ops/sweeper.py) removes each member whose key is gone, and gives a TTL
to records written before retention existed. Running and waiting jobs have no TTL and are never
removed. What the sweep removes is counted in ``{ns}:stats`` (``swept_jobs``, ``swept_running``,
``swept_notes``), never as workload.

Why tombstones: job ids are ``uuid5`` of the message key (broker/client.py), deterministic so that
the same key is always the same job; they carry no creation time, so an id alone cannot tell a job
that expired from one that never existed. The sweep therefore records each job id it removes from
``jobs`` in ``jobs.expired`` (id -> time), trimmed to the newest TOMBSTONES_MAX and to one more
retention period: about 60 bytes per job instead of the ~10 KB its record and trace held.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

from mesh.contracts import TERMINAL

from .claims import script_source
from .keys import Keys
from .settings import MeshSettings

RETENTION_LUA = script_source("retention.lua")

#: Index members looked at per script call.
BATCH = 500
#: Tombstones of swept jobs kept at most (the newest).
TOMBSTONES_MAX = 100_000

_TERMINAL_STATES = ",".join(sorted(str(s) for s in TERMINAL))


@dataclass(frozen=True)
class Swept:
    """Index members one sweep removed."""

    jobs: int = 0
    running: int = 0
    notes: int = 0


class Retention:
    """Sweeps a deployment's job and note indexes; every call is safe to run concurrently with
    workers, clients and another sweep."""

    def __init__(self, client: redis.Redis, settings: MeshSettings) -> None:
        self.client = client
        self.settings = settings
        self.keys = Keys(settings.namespace, settings.shard)
        self._script = client.register_script(RETENTION_LUA)

    def sweep(self, now: float) -> Swept:
        """One sweep at ``now`` (s, the Redis server's clock)."""
        jobs = self._walk("jobs", self.keys.jobs, now, self.settings.job_retention_s)
        running = self._walk("running", self.keys.running, now, self.settings.job_retention_s, everything=True)
        notes = self._walk("notes", self.keys.notes, now, self.settings.note_retention_s)
        pipe = self.client.pipeline(transaction=False)
        pipe.zremrangebyscore(self.keys.jobs_expired, "-inf", now - self.settings.job_retention_s)
        pipe.zremrangebyrank(self.keys.jobs_expired, 0, -(TOMBSTONES_MAX + 1))
        pipe.execute()
        return Swept(jobs=jobs, running=running, notes=notes)

    def _walk(self, command: str, index: str, now: float, retention_s: float, *, everything: bool = False) -> int:
        """Offer the script every member of ``index`` scored at least ``retention_s`` before ``now``
        (every member with ``everything``): none younger can have expired, since a key's TTL is
        counted from a time no earlier than its member's score."""
        removed = offset = 0
        hi: Any = "+inf" if everything else now - retention_s
        while True:
            members = self.client.zrangebyscore(index, "-inf", hi, start=offset, num=BATCH)
            if not members:
                return removed
            n = int(self._script(keys=[self.keys.prefix],
                                 args=[command, now, int(retention_s * 1000), _TERMINAL_STATES, *members]))
            removed += n
            offset += len(members) - n  # the removed left the index; the kept are skipped next time


def expired(client: redis.Redis, keys: Keys, job_id: str) -> bool:
    """Whether ``job_id``, whose record is gone, names a job that ended and expired: still in the
    ``jobs`` index (not swept yet) or tombstoned by the sweep. False for an id never seen, or one
    whose tombstone was trimmed too."""
    pipe = client.pipeline(transaction=False)
    pipe.zscore(keys.jobs, job_id)
    pipe.zscore(keys.jobs_expired, job_id)
    return any(score is not None for score in pipe.execute())
