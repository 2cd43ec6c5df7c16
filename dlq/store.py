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
from typing import TYPE_CHECKING, Any, Literal, overload

import redis

from mesh.broker.keys import Keys
from mesh.broker.shards import Shards
from mesh.contracts import FailureClass, dumps, loads

from .entry import DeadLetter

if TYPE_CHECKING:
    from mesh.broker.settings import MeshSettings

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
        return index_of(self.keys, flt)

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
        found = _entries(self.client, [(self.keys, entry_id) for entry_id in ids])
        return found if keep_missing else [s for s in found if s is not None]

    def _counts(self, keys: list[str], names: list[str]) -> dict[str, int]:
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.zcard(key)
        return {n: int(c) for n, c in zip(names, pipe.execute(), strict=True) if c}


def _entries(client: redis.Redis, ids: list[tuple[Keys, Any]]) -> list[Stored | None]:
    """The entries of ``ids`` (each with the keys of the shard it is in), in order, in one round trip;
    None for one gone meanwhile."""
    pipe = client.pipeline(transaction=False)
    for keys, entry_id in ids:
        pipe.hmget(keys.dead_letter(entry_id.decode()), "entry", "raw")
    return [None if data is None else Stored(DeadLetter.model_validate(loads(data)), _bytes(raw))
            for data, raw in pipe.execute()]


def index_of(keys: Keys, flt: Filter) -> str:
    """The index of ``keys``' DLQ that ``flt`` reads."""
    if flt.failure_class is not None:
        return keys.dlq_by_class(flt.failure_class)
    if flt.agent is not None:
        return keys.dlq_by_agent(flt.agent)
    return keys.dlq


def _bytes(value: Any) -> bytes:
    return b"" if value is None else value if isinstance(value, bytes) else str(value).encode()

class DeadLetterShards:
    """The DLQ of every shard of a namespace (MESH_SHARDS): a dead letter is kept in the shard of the job
    it is of (with its indexes, its audit records and its tombstone), so each shard has a DLQ of its own
    (:class:`DeadLetterStore`, :attr:`stores`). This reads them together: counts summed, listings merged
    newest first (``limit`` is the whole DLQ's), an entry looked for in every shard (its id is its
    message's, which does not name its job). What takes entries out (replay, drain, purge) works a
    shard at a time, each transaction within one shard. With one shard, it is that shard's store."""

    def __init__(self, client: redis.Redis, shards: Shards) -> None:
        self.client = client
        self.shards = shards
        self.stores = [DeadLetterStore(client, keys) for keys in shards.keys]

    @classmethod
    def of(cls, client: redis.Redis, settings: MeshSettings) -> DeadLetterShards:
        return cls(client, Shards.of(settings))

    @property
    def home(self) -> DeadLetterStore:
        """The first shard's store (the only one, with one shard)."""
        return self.stores[0]

    def count(self, flt: Filter | None = None) -> int:
        """:meth:`DeadLetterStore.count` of every shard, added up."""
        if len(self.stores) == 1:
            return self.home.count(flt)
        flt = flt or Filter()
        pipe = self.client.pipeline(transaction=False)
        for store in self.stores:
            pipe.zcount(store._index(flt), *store._range(flt))
        return sum(int(n) for n in pipe.execute())

    def store_of(self, entry_id: str) -> DeadLetterStore:
        """The store of the shard holding entry ``entry_id`` (or its tombstone, once replayed); the first
        shard's when none does (the caller finds nothing there). No round trip with one shard."""
        if len(self.stores) == 1:
            return self.home
        from mesh.broker.shard_readers import first_holding

        keys = first_holding(self.client, self.shards.keys,
                             lambda k: [k.dead_letter(entry_id), k.dlq_replayed(entry_id)])
        return self.stores[self.shards.keys.index(keys)] if keys is not None else self.home

    def load(self, entry_id: str) -> Stored | None:
        return self.store_of(entry_id).load(entry_id)

    def get(self, entry_id: str) -> DeadLetter | None:
        return self.store_of(entry_id).get(entry_id)

    def of_job(self, job_id: str) -> DeadLetterStore:
        """The store of the shard job ``job_id`` lives in (its dead letters are there)."""
        return self.stores[self.shards.keys.index(self.shards.of_job(job_id))]

    def for_entry(self, entry: DeadLetter) -> DeadLetterStore:
        """Where ``entry`` belongs: its job's shard (the first shard for an entry of no job)."""
        return self.of_job(entry.job_id) if entry.job_id else self.home

    def put(self, entry: DeadLetter, raw: bytes) -> bool:
        """:meth:`DeadLetterStore.put` into the shard of the entry's job."""
        return self.for_entry(entry).put(entry, raw)

    def agents(self) -> list[str]:
        """Every agent that had a dead letter in any shard, sorted."""
        pipe = self.client.pipeline(transaction=False)
        for store in self.stores:
            pipe.smembers(store.keys.dlq_agents)
        return sorted({m.decode() for found in pipe.execute() for m in found})

    def entries(self, flt: Filter, *, limit: int = 100) -> list[DeadLetter]:
        """Newest first across the shards, at most ``limit`` in all."""
        if len(self.stores) == 1:
            return self.home.entries(flt, limit=limit)
        from mesh.broker.shard_readers import newest

        return newest([s.entries(flt, limit=limit) for s in self.stores], lambda e: e.dead_lettered_at, limit)

    def page(self, flt: Filter, *, limit: int = 50, budget: int = 2_000,
             offset: int = 0) -> tuple[list[DeadLetter], int, bool]:
        """:meth:`DeadLetterStore.page` over every shard: ``offset`` counts the entries of all shards,
        newest first (the ids before it are read again, not the entries)."""
        if len(self.stores) == 1:
            return self.home.page(flt, limit=limit, budget=budget, offset=offset)
        from mesh.broker.shard_readers import NewestFirst

        lo, hi = DeadLetterStore._range(flt)
        walk = NewestFirst(self.client, self.shards.keys, lambda k: index_of(k, flt), lo=lo, hi=hi, batch=BATCH)
        skip = offset
        while skip > 0 and (skipped := walk.take(min(BATCH, skip))):
            skip -= len(skipped)
        out: list[DeadLetter] = []
        read = 0
        while len(out) < limit and read < budget:
            taken = walk.take(min(limit - len(out) if flt.exact else BATCH, budget - read))
            if not taken:
                return out, read, False
            for stored in _entries(self.client, taken):
                read += 1
                if stored is not None and flt.matches(stored.entry):
                    out.append(stored.entry)
                    if len(out) == limit:
                        break
        return out, read, len(out) < limit and read >= budget

    def iter(self, flt: Filter, *, batch: int = BATCH) -> Iterator[tuple[DeadLetterStore, list[Stored]]]:
        """:meth:`DeadLetterStore.iter` of each shard in turn, each batch with its shard's store."""
        for store in self.stores:
            for found in store.iter(flt, batch=batch):
                yield store, found

    def stats(self) -> dict[str, Any]:
        """:meth:`DeadLetterStore.stats` of every shard, added up."""
        if len(self.stores) == 1:
            return self.home.stats()
        parts = [s.stats() for s in self.stores]
        by_agent: dict[str, int] = {}
        by_class: dict[str, int] = {}
        for p in parts:
            for name, n in p["by_agent"].items():
                by_agent[name] = by_agent.get(name, 0) + n
            for name, n in p["by_class"].items():
                by_class[name] = by_class.get(name, 0) + n
        oldest = [p["oldest_at"] for p in parts if p["oldest_at"] is not None]
        newest = [p["newest_at"] for p in parts if p["newest_at"] is not None]
        return {"total": sum(p["total"] for p in parts), "by_agent": dict(sorted(by_agent.items())),
                "by_class": {str(c): by_class[str(c)] for c in FailureClass if str(c) in by_class},
                "oldest_at": min(oldest, default=None), "newest_at": max(newest, default=None)}
