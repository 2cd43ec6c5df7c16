"""The DLQ in Redis: entries written atomically by the consumer's settle script, indexed by time,
agent and failure class, so listing and counting never scan everything.

Operations that take entries out (replay, drain, purge) walk an index oldest first in batches, in
constant memory, by a cursor that does not depend on when they remove what they were handed, and
remove each entry with its indexes in one transaction.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase
from importlib import resources
from typing import Any, Literal, overload

import redis

from mesh.broker.keys import Keys
from mesh.contracts import FailureClass, dumps, loads

from .entry import DeadLetter

PUT_LUA = resources.files("mesh.dlq").joinpath("scripts/put.lua").read_text()
WALK_LUA = resources.files("mesh.dlq").joinpath("scripts/walk.lua").read_text()

#: Entries read per round trip when walking the DLQ.
BATCH = 500


@dataclass(frozen=True)
class Filter:
    """Which entries an operation takes: all of them, or by agent, class and dead-lettered time (s),
    and by what the entry says: ``grep`` (a substring of its error, any case), ``key`` (a glob on its
    message key, as fnmatch reads it) and ``dependency`` (the dependency its failure names, exactly;
    an entry that recorded none matches when its error names it).

    Agent, class and time choose an index; the rest is checked on each entry the walk reads.
    """

    agent: str | None = None
    failure_class: str | None = None
    since: float | None = None
    until: float | None = None
    grep: str | None = None
    key: str | None = None
    dependency: str | None = None

    def matches(self, entry: DeadLetter) -> bool:
        return ((self.agent is None or (entry.agent or "-") == self.agent)
                and (self.failure_class is None or entry.failure_class == self.failure_class)
                and (self.grep is None or self.grep.casefold() in entry.error.casefold())
                and (self.key is None or (entry.key is not None and fnmatchcase(entry.key, self.key)))
                and (self.dependency is None or entry.dependency == self.dependency
                     # an entry written before dead letters recorded it: its error names the dependency
                     or (entry.dependency is None and self.dependency in entry.error)))

    @property
    def exact(self) -> bool:
        """True when the chosen index alone decides membership (no entry needs checking)."""
        return ((self.agent is None or self.failure_class is None)
                and self.grep is None and self.key is None and self.dependency is None)


@dataclass(frozen=True)
class Stored:
    """An entry with the bytes of the message as it was sent."""

    entry: DeadLetter
    raw: bytes


class DeadLetterStore:
    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self._put = client.register_script(PUT_LUA)
        self._walk = client.register_script(WALK_LUA)

    # -- reading ------------------------------------------------------------------------------

    def count(self, flt: Filter | None = None) -> int:
        """Entries matching ``flt``: exact from one index, or an upper bound when ``flt`` is not
        :attr:`Filter.exact` (use :meth:`iter` to count those exactly)."""
        flt = flt or Filter()
        return int(self.client.zcount(self._index(flt), *self._range(flt)))

    def get(self, entry_id: str) -> DeadLetter | None:
        data = self.client.hget(self.keys.dead_letter(entry_id), "entry")
        return None if data is None else DeadLetter.model_validate(loads(data))

    def raw(self, entry_id: str) -> bytes | None:
        data = self.client.hget(self.keys.dead_letter(entry_id), "raw")
        return None if data is None else _bytes(data)

    def load(self, entry_id: str) -> Stored | None:
        data, raw = self.client.hmget(self.keys.dead_letter(entry_id), "entry", "raw")
        if data is None:
            return None
        return Stored(DeadLetter.model_validate(loads(data)), _bytes(raw))

    def newest(self, limit: int = 100) -> list[DeadLetter]:
        return self.entries(Filter(), limit=limit)

    def entries(self, flt: Filter, *, limit: int = 100) -> list[DeadLetter]:
        """Newest first, at most ``limit``."""
        out: list[DeadLetter] = []
        lo, hi = self._range(flt)
        offset = 0
        while len(out) < limit:
            ids = self.client.zrevrangebyscore(self._index(flt), hi, lo, start=offset, num=BATCH)
            if not ids:
                break
            offset += len(ids)
            out += [s.entry for s in self._fetch(ids) if flt.matches(s.entry)]
        return out[:limit]

    def page(self, flt: Filter, *, limit: int = 50, budget: int = 2_000,
             offset: int = 0) -> tuple[list[DeadLetter], int, bool]:
        """Newest first from the ``offset``-th entry of the chosen index, at most ``limit``, reading at
        most ``budget`` entries (a page's Redis work does not grow with the DLQ): (entries, entries
        read, whether the budget cut the walk short: the next page starts at ``offset`` + read)."""
        out: list[DeadLetter] = []
        lo, hi = self._range(flt)
        start, end = offset, offset + budget
        while len(out) < limit and offset < end:
            # an index alone decides membership: one page's worth; else a batch of entries to check
            want = limit - len(out) if flt.exact else BATCH
            ids = self.client.zrevrangebyscore(self._index(flt), hi, lo, start=offset, num=min(want, end - offset))
            if not ids:
                return out, offset - start, False
            for stored in self._fetch(ids, keep_missing=True):
                offset += 1  # the next page starts after the last entry this one looked at
                if stored is not None and flt.matches(stored.entry):
                    out.append(stored.entry)
                    if len(out) == limit:
                        break
        return out, offset - start, len(out) < limit and offset >= end

    def iter(self, flt: Filter, *, batch: int = BATCH) -> Iterator[list[Stored]]:
        """Batches of matching entries, oldest first, in constant memory: each entry that was in range
        when the walk started, once, unless it left the DLQ before the walk reached it.

        The walk keeps its place by the (time, id) of the last entry it read, never by an offset, so
        whether and when the caller removes (or keeps) what it was handed changes nothing. It ends at
        the newest entry in range at its start: an entry dead-lettered meanwhile (a replay whose cause
        is not fixed yet) is not taken again, and the walk ends.
        """
        index = self._index(flt)
        lo, hi = self._range(flt)
        newest = self.client.zrevrangebyscore(index, hi, lo, start=0, num=1, withscores=True)
        if not newest:
            return
        end_id, end_score = newest[0][0], newest[0][1]
        after: tuple[Any, Any] = (lo, "")
        while True:
            rows = self._walk(keys=[index], args=[*after, end_score, end_id, batch])
            if not rows:
                return
            after = (rows[-1], rows[-2])  # (score, id) of the last entry read
            matching = [s for s in self._fetch(rows[0::2]) if flt.matches(s.entry)]
            if matching:
                yield matching
            if len(rows) < 2 * batch:
                return

    def of_job(self, job_id: str) -> list[Stored]:
        """The job's dead letters, oldest first, from the job's index: what it costs depends on the
        job's own entries, never on the DLQ's size. Entries written before the index was kept (by an
        older mesh) are not in it: see :meth:`indexed_since`."""
        return self._fetch(self.client.zrange(self.keys.dlq_by_job(job_id), 0, -1))

    def indexed_since(self) -> float | None:
        """When (UNIX s) the DLQ began indexing entries by job; None: no entry was indexed yet."""
        since = self.client.get(self.keys.dlq_jobs_since)
        return None if since is None else int(since) / 1000

    def stats(self) -> dict[str, Any]:
        """Counts by agent and by class, the total, and the oldest and newest dead-lettered times."""
        total = self.count()
        agents = sorted(a.decode() for a in self.client.smembers(self.keys.dlq_agents))  # type: ignore[union-attr]
        by_agent = self._counts([self.keys.dlq_by_agent(a) for a in agents], agents)
        by_class = self._counts([self.keys.dlq_by_class(c) for c in FailureClass], [str(c) for c in FailureClass])
        oldest = self.client.zrange(self.keys.dlq, 0, 0, withscores=True)
        newest = self.client.zrange(self.keys.dlq, -1, -1, withscores=True)
        return {"total": total, "by_agent": by_agent, "by_class": by_class,
                "oldest_at": float(oldest[0][1]) / 1000 if oldest else None,
                "newest_at": float(newest[0][1]) / 1000 if newest else None}

    # -- writing ------------------------------------------------------------------------------

    def remove(self, entries: list[DeadLetter], pipe: Any = None) -> None:
        """Delete entries with their indexes (staged into ``pipe`` when given, else one MULTI)."""
        own = pipe is None
        pipe = self.client.pipeline(transaction=True) if own else pipe
        for e in entries:
            pipe.delete(self.keys.dead_letter(e.entry_id))
            pipe.zrem(self.keys.dlq, e.entry_id)
            pipe.zrem(self.keys.dlq_by_agent(e.agent or "-"), e.entry_id)
            pipe.zrem(self.keys.dlq_by_class(e.failure_class), e.entry_id)
            if e.job_id:
                pipe.zrem(self.keys.dlq_by_job(e.job_id), e.entry_id)
        if own:
            pipe.execute()

    def put(self, entry: DeadLetter, raw: bytes) -> bool:
        """Write ``entry`` back with its indexes unless its id is already in the DLQ."""
        keys = [self.keys.dlq, self.keys.dead_letter(entry.entry_id), self.keys.dlq_by_agent(entry.agent or "-"),
                self.keys.dlq_by_class(entry.failure_class), self.keys.dlq_agents,
                self.keys.dlq_by_job(entry.job_id or ""), self.keys.dlq_jobs_since]
        args: list[str | bytes | int] = [entry.entry_id, int(entry.dead_lettered_at * 1000), dumps(entry), raw,
                                         entry.agent or "-", entry.failure_class, "1" if entry.job_id else ""]
        return bool(self._put(keys=keys, args=args))

    # -- internals ----------------------------------------------------------------------------

    def _index(self, flt: Filter) -> str:
        if flt.failure_class is not None:
            return self.keys.dlq_by_class(flt.failure_class)
        if flt.agent is not None:
            return self.keys.dlq_by_agent(flt.agent)
        return self.keys.dlq

    @staticmethod
    def _range(flt: Filter) -> tuple[float | str, float | str]:
        lo = "-inf" if flt.since is None else int(flt.since * 1000)
        hi = "+inf" if flt.until is None else int(flt.until * 1000)
        return lo, hi

    @overload
    def _fetch(self, ids: list[Any]) -> list[Stored]: ...

    @overload
    def _fetch(self, ids: list[Any], keep_missing: Literal[True]) -> list[Stored | None]: ...

    def _fetch(self, ids: list[Any], keep_missing: bool = False) -> list[Any]:
        """The entries of ``ids``, in order; one gone meanwhile is left out (None with ``keep_missing``)."""
        pipe = self.client.pipeline(transaction=False)
        for entry_id in ids:
            pipe.hmget(self.keys.dead_letter(entry_id.decode()), "entry", "raw")
        found = [None if data is None else Stored(DeadLetter.model_validate(loads(data)), _bytes(raw))
                 for data, raw in pipe.execute()]
        return found if keep_missing else [s for s in found if s is not None]

    def _counts(self, keys: list[str], names: list[str]) -> dict[str, int]:
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.zcard(key)
        return {n: int(c) for n, c in zip(names, pipe.execute(), strict=True) if c}



def _bytes(value: Any) -> bytes:
    return b"" if value is None else value if isinstance(value, bytes) else str(value).encode()
