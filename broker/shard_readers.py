"""Readers of many jobs across a namespace's shards (MESH_SHARDS): what ``mesh jobs``, ``mesh stats``, the
DLQ's listings, the metrics and the console read from every shard, added up.

A job's keys are its shard's (broker/shards.py), so a listing or a count over jobs reads each shard's
index or counter, one key (one slot) a command, and adds them up: counters summed, listings merged by
their index's score (newest first) so that ``--limit N`` gives the N newest of all shards, not N of
each. With one shard every reader sends the commands it always sent.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from .keys import Keys
from .shards import Shards

if TYPE_CHECKING:
    import redis

    from .client import MeshClient
    from .settings import MeshSettings


def every(settings: MeshSettings) -> tuple[Keys, ...]:
    """Each shard's keys, in shard order (one, with one shard)."""
    return Shards.of(settings).keys


def summed_hash(client: redis.Redis, keys: Sequence[Keys], key: Callable[[Keys], str]) -> dict[str, Any]:
    """The hash ``key(k)`` of every shard, its fields added up: ints, or floats (a histogram's sum);
    fields decoded, in the first shard's order then the others'. One HGETALL with one shard."""
    if len(keys) == 1:
        found: list[Any] = [client.hgetall(key(keys[0]))]
    else:
        pipe = client.pipeline(transaction=False)
        for k in keys:
            pipe.hgetall(key(k))
        found = pipe.execute()
    out: dict[str, Any] = {}
    for fields in found:
        for field, value in fields.items():
            name = field.decode() if isinstance(field, bytes) else str(field)
            text = value.decode() if isinstance(value, bytes) else str(value)
            try:
                n: int | float = int(text)
            except ValueError:
                n = float(text)
            out[name] = out.get(name, 0) + n
    return out


def summed(client: redis.Redis, keys: Sequence[Keys], command: Callable[[Any, Keys], Any]) -> int:
    """``command(pipe, k)`` staged for every shard (one integer reply each), added up."""
    if len(keys) == 1:
        return int(command(client, keys[0]))
    pipe = client.pipeline(transaction=False)
    for k in keys:
        command(pipe, k)
    return sum(int(n) for n in pipe.execute())


def zcard(client: redis.Redis, keys: Sequence[Keys], key: Callable[[Keys], str]) -> int:
    """How many members the zset ``key(k)`` holds in all shards."""
    return summed(client, keys, lambda c, k: c.zcard(key(k)))


def live_members(client: redis.Redis, keys: Sequence[Keys], key: Callable[[Keys], str], since: float) -> int:
    """How many distinct members the zset ``key(k)`` scores at ``since`` or later in any shard (a worker
    beats in every shard it consumes: counted once)."""
    if len(keys) == 1:
        return int(client.zcount(key(keys[0]), since, "+inf"))
    pipe = client.pipeline(transaction=False)
    for k in keys:
        pipe.zrangebyscore(key(k), since, "+inf")
    return len({m for found in pipe.execute() for m in found})


class _Walk:
    """One shard's zset, highest score first, read ``batch`` members at a time (by offset: a member added
    meanwhile shifts the offsets by one, and what it pushes down is given once only)."""

    def __init__(self, client: redis.Redis, keys: Keys, key: str, lo: Any, hi: Any, batch: int) -> None:
        self.client, self.keys, self.key = client, keys, key
        self.lo, self.hi, self.batch = lo, hi, batch
        self.offset, self.done = 0, False
        self.buffer: deque[tuple[float, bytes]] = deque()
        self.seen: set[bytes] = set()

    def head(self) -> tuple[float, bytes] | None:
        while not self.buffer and not self.done:
            rows: Any = self.client.zrevrangebyscore(self.key, self.hi, self.lo, start=self.offset, num=self.batch,
                                                     withscores=True)
            self.offset += len(rows)
            self.done = len(rows) < self.batch
            for member, score in rows:
                if member not in self.seen:
                    self.seen.add(member)
                    self.buffer.append((float(score), member))
        return self.buffer[0] if self.buffer else None


class NewestFirst:
    """The members of one zset per shard (``key(k)``), highest score first across all shards, between
    ``lo`` and ``hi``: each comes with the shard's keys it is in. Reads each shard ``batch`` members at
    a time, only as far as taken."""

    def __init__(self, client: redis.Redis, keys: Sequence[Keys], key: Callable[[Keys], str], *,
                 lo: Any = "-inf", hi: Any = "+inf", batch: int = 200) -> None:
        self.walks = [_Walk(client, k, key(k), lo, hi, batch) for k in keys]

    def take(self, n: int) -> list[tuple[Keys, bytes]]:
        """The next ``n`` members at most (fewer: none is left)."""
        out: list[tuple[Keys, bytes]] = []
        while len(out) < n:
            heads = [(head[0], i) for i, w in enumerate(self.walks) if (head := w.head()) is not None]
            if not heads:
                break
            _, i = max(heads)  # the highest score; a tie goes to the later shard, as any order would do
            walk = self.walks[i]
            out.append((walk.keys, walk.buffer.popleft()[1]))
        return out

    def more(self) -> bool:
        """Whether any member is left."""
        return any(w.head() is not None for w in self.walks)


def newest(lists: Iterable[Sequence[Any]], when: Callable[[Any], float], limit: int) -> list[Any]:
    """Lists each sorted newest first (by ``when``), merged newest first, the first ``limit``."""
    merged = heapq.merge(*lists, key=lambda item: -when(item))
    return [item for _, item in zip(range(limit), merged, strict=False)]


def oldest(lists: Iterable[Sequence[Any]], when: Callable[[Any], float], limit: int) -> list[Any]:
    """Lists each sorted oldest first (by ``when``), merged oldest first, the first ``limit``."""
    merged = heapq.merge(*lists, key=when)
    return [item for _, item in zip(range(limit), merged, strict=False)]


def first_holding(client: redis.Redis, keys: Sequence[Keys], names: Callable[[Keys], Sequence[str]]) -> Keys | None:
    """The first shard where any key of ``names(k)`` exists (one pipelined round trip), or None."""
    pipe = client.pipeline(transaction=False)
    for k in keys:
        for name in names(k):
            pipe.exists(name)
    found = iter(pipe.execute())
    for k in keys:
        if any([bool(next(found)) for _ in names(k)]):
            return k
    return None


def per_shard(keys: Sequence[Keys], items: Iterable[Any], shard_of: Callable[[Any], Keys]) -> Iterator[
        tuple[Keys, list[Any]]]:
    """``items`` grouped by shard, in shard order (shards with none left out)."""
    groups: dict[str, list[Any]] = {}
    for item in items:
        groups.setdefault(shard_of(item).prefix, []).append(item)
    for k in keys:
        if k.prefix in groups:
            yield k, groups[k.prefix]


def queue_depths(c: MeshClient, agents: Iterable[str] | None = None, *,
                 lanes: bool = False) -> dict[str, dict[str, Any]]:
    """:meth:`MeshClient.queues` of every shard, added up: each agent's queue has a copy in each shard
    (a job's messages wait in its shard). With one shard, that method itself."""
    keys = every(c.settings)
    if len(keys) == 1:
        return c.queues(agents, lanes=lanes)
    from . import lanes as queue_lanes

    names = list(dict.fromkeys(agents)) if agents is not None else c.agent_queues()  # each once, as read back
    pipe = c.redis.pipeline(transaction=False)
    for k in keys:
        for name in names:
            pipe.hlen(k.messages(name))
            pipe.hlen(k.delayed_messages(name))
    values = iter(pipe.execute())
    out: dict[str, dict[str, Any]] = {name: {"ready": 0, "delayed": 0, "in_flight": 0} for name in names}
    for k in keys:
        for name, lane in queue_lanes.depth(c.redis, k, names).items():
            stored, delayed = next(values), next(values)
            ready = lane["ready"]
            row = out[name]
            row["ready"] += ready
            row["delayed"] += delayed
            row["in_flight"] += max(0, stored - ready)
            if lanes:
                by = row.setdefault("by_priority", dict.fromkeys(lane["by_priority"], 0))
                for priority, n in lane["by_priority"].items():
                    by[priority] += n
                row["flows"] = row.get("flows", 0) + lane["flows"]
    return out


def oldest_message_age(client: redis.Redis, keys: Sequence[Keys], queue: str, now: float) -> float:
    """Seconds since the oldest ready message of ``queue`` (its head in each shard, the oldest of them)
    was sent, by ``now`` (s); 0 when none waits."""
    from mesh.contracts import loads

    pipe = client.pipeline(transaction=False)
    for k in keys:
        pipe.lindex(k.queue(queue), 0)
    heads = pipe.execute()
    pipe = client.pipeline(transaction=False)
    for k, head in zip(keys, heads, strict=True):
        pipe.hget(k.messages(queue), head or b"-")
    age = 0.0
    for data in pipe.execute():
        try:
            age = max(age, now - loads(data)["message_timestamp"] / 1000) if data else age
        except (ValueError, KeyError, TypeError):
            continue
    return age


def approval_counts(client: redis.Redis, keys: Sequence[Keys]) -> tuple[int, float]:
    """:func:`mesh.broker.approvals.counts` of every shard: the steps waiting in all, and the oldest one's age."""
    from .approvals import counts

    found = [counts(client, k) for k in keys]
    return sum(n for n, _ in found), max(age for _, age in found)


def pending_approvals(client: redis.Redis, keys: Sequence[Keys], limit: int = 1000) -> list[Any]:
    """:func:`mesh.broker.approvals.pending` of every shard, oldest first, at most ``limit`` in all."""
    from .approvals import pending

    if len(keys) == 1:
        return pending(client, keys[0], limit=limit)
    return oldest([pending(client, k, limit=limit) for k in keys], lambda p: p.asked_at, limit)


def pending_waits(client: redis.Redis, keys: Sequence[Keys], limit: int = 1000, event: str | None = None) -> list[Any]:
    """:func:`mesh.broker.waits.pending` of every shard, oldest first, at most ``limit`` in all."""
    from .waits import pending

    if len(keys) == 1:
        return pending(client, keys[0], limit=limit, event=event)
    return oldest([pending(client, k, limit=limit, event=event) for k in keys], lambda w: w.wait.started_at, limit)
