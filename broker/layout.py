"""The key layout's upgrade: from ``NS:rest`` (every mesh before Redis Cluster support) to
``{NS}:rest``, the namespace a hash tag, same ``rest``.

Data written under the old names is found cheaply (:func:`layout_state`: one EXISTS over keys
every deployment that ever ran has), moved by :func:`migrate` (``mesh migrate``) and, once moved,
marked by ``{NS}:layout`` (the string :data:`VERSION`). A worker refuses to start on a namespace
holding old-layout keys and no marker (:func:`check_layout`, one round trip at start): it would
serve an empty mesh while the old one's messages, claims and dead letters wait unseen.

The move is RENAMENX, key by key: atomic per key, keeping its type, value and TTL. A run killed
midway leaves each key under one name or the other, and the next run moves the rest. A key whose
new name exists already is a conflict: reported, never overwritten. Old-layout data lives on a
standalone Redis or one behind Sentinel, never on a Cluster (the old names did not fit one), so
the rename never crosses slots.

No value holds a full key name: sets, zsets and hashes name jobs, queues, agents, workers and
limits, never keys, so every key moves as it is and nothing is rewritten.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.cluster import RedisCluster

from mesh.broker.keys import Keys, prefix
from mesh.contracts import ConfigError

#: The layout the marker names: 2, the namespace a hash tag.
VERSION = "2"

#: Keys a deployment that ever ran has and keeps (``rest`` of ``NS:rest``): a worker publishes its
#: agents (registry.*), heartbeats, and every claim takes a fencing token in ``stats``; the others
#: stay once anything was submitted, dead-lettered, timed, counted or registered.
LONG_LIVED = ("__heartbeats__", "stats", "jobs", "registry.agents", "registry.workers", "dlq", "dlq.jobs.since",
              "timers", "outcomes", "pipelines", "breakers", "routes", "tokens", "limits.declared")

#: Keys renamed per round trip; SCAN's COUNT.
BATCH = 1000


def marker(namespace: str) -> str:
    """The key saying the namespace's data is in layout :data:`VERSION`."""
    return Keys(namespace).layout


def kind(rest: str) -> str:
    """What a key is, by the part of its name after the prefix: up to the first ':' or '.'
    (``job:123`` -> ``job``, ``planner.msgs`` -> ``planner``, ``dlq.audit`` -> ``dlq``)."""
    for n, char in enumerate(rest):
        if char in ":.":
            return rest[:n] or rest
    return rest


def layout_state(client: redis.Redis, namespace: str) -> tuple[int, bool]:
    """How many of the :data:`LONG_LIVED` keys the namespace holds under the old layout's names (0:
    none), and whether the marker is set: one round trip."""
    pipe = client.pipeline(transaction=False)
    pipe.exists(*(f"{namespace}:{rest}" for rest in LONG_LIVED))
    pipe.exists(marker(namespace))
    old, marked = pipe.execute()
    return int(old), bool(marked)


def refusal(namespace: str) -> str:
    return (f"namespace {namespace} holds data in the key layout of an older mesh: stop its workers and "
            f"run `mesh migrate` (docs/guides/upgrading.md)")


def check_layout(client: redis.Redis, namespace: str) -> int:
    """Refuse (ConfigError) to serve a namespace holding old-layout data that was never migrated. Else
    how many of the older layout's lasting keys (:data:`LONG_LIVED`) a migrated namespace holds
    again: written since its migration by something of the older release still running (0: none)."""
    old, marked = _state(client, namespace)
    if old and not marked:
        raise ConfigError(refusal(namespace), namespace=namespace)
    return old


def unmigrated(client: redis.Redis, namespace: str) -> str | None:
    """:func:`refusal` when the namespace holds old-layout data that was never migrated, else None (one
    round trip; none on a Cluster)."""
    old, marked = _state(client, namespace)
    return refusal(namespace) if old and not marked else None


#: What :func:`unmigrated_and` answers for the key it did not read.
UNREAD: Any = object()


def unmigrated_and(client: redis.Redis, namespace: str, key: str) -> tuple[str | None, Any]:
    """:func:`unmigrated`, and the value of ``key`` (a fleet-wide key: the client's ``{ns}:shards``) read
    in the same round trip; the value is :data:`UNREAD` where no round trip is made (a Cluster) or the
    read was refused (a user held to the new layout's keys): read it on its own then, if it must be."""
    if isinstance(client, RedisCluster):
        return None, UNREAD
    pipe = client.pipeline(transaction=False)
    pipe.exists(*(f"{namespace}:{rest}" for rest in LONG_LIVED))
    pipe.exists(marker(namespace))
    pipe.get(key)
    try:
        old, marked, value = pipe.execute()
    except (redis.exceptions.NoPermissionError, redis.exceptions.ClusterCrossSlotError):  # as _state
        return None, UNREAD
    return (refusal(namespace) if old and not marked else None), value


def _state(client: redis.Redis, namespace: str) -> tuple[int, bool]:
    """:func:`layout_state`, or (0, True) where no old-layout key can be: on a Cluster (no round trip)."""
    if isinstance(client, RedisCluster):  # the older layout's keys never fitted a Cluster: none can be there
        return 0, True
    try:
        return layout_state(client, namespace)
    except redis.exceptions.NoPermissionError:  # a user held to the new layout's keys: it holds no old ones
        return 0, True
    except redis.exceptions.ClusterCrossSlotError:  # a Cluster node reached as a single Redis: likewise
        return 0, True


@dataclass(frozen=True)
class Alive:
    """Workers whose heartbeat is newer than the timeout, in either layout."""

    count: int
    #: The newest heartbeat among them (ms, Redis TIME); None when there are none.
    newest_ms: int | None
    #: The oldest heartbeat among them (ms): alive since at least then.
    oldest_ms: int | None
    now_ms: int


def alive_workers(client: redis.Redis, namespace: str, timeout_s: float) -> Alive:
    """Workers heartbeating within ``timeout_s`` (MESH_HEARTBEAT_TIMEOUT_S), under either layout's
    heartbeat zset (worker id -> last heartbeat, ms)."""
    now = client.time()
    now_ms = int(now[0]) * 1000 + int(now[1]) // 1000
    low = now_ms - int(timeout_s * 1000)
    count, beats = 0, []
    for key in (f"{namespace}:__heartbeats__", Keys(namespace).heartbeats):
        found: list[Any] = client.zrangebyscore(key, low, "+inf", withscores=True)
        count += len(found)
        beats += [int(pair[1]) for pair in found]
    return Alive(count, max(beats, default=None), min(beats, default=None), now_ms)


@dataclass
class Migration:
    """What :func:`migrate` did, or would do (``dry_run``)."""

    namespace: str
    dry_run: bool
    #: Keys moved (or to move), by kind (:func:`kind`).
    moved: Counter[str] = field(default_factory=Counter)
    #: (old name, new name) of keys left where they are: their new name exists already.
    conflicts: list[tuple[str, str]] = field(default_factory=list)
    #: Keys gone between the scan and their move (expired, or moved by another run).
    vanished: int = 0
    #: Keys found under the older layout's names by the check after the move (moved too): something
    #: of the older release wrote them during the run, and still writes; the namespace is left unmarked.
    rewritten: int = 0
    #: Whether the marker was written (by this run).
    marked: bool = False

    @property
    def total(self) -> int:
        return sum(self.moved.values())


def count_old(client: redis.Redis, namespace: str) -> int:
    """Every old-layout key of the namespace, by a full SCAN (the progress bar's total)."""
    return sum(1 for _ in client.scan_iter(match=f"{namespace}:*", count=BATCH))


def migrate(client: redis.Redis, namespace: str, *, dry_run: bool = False,
            progress: Callable[[int], Any] | None = None, batch: int = BATCH) -> Migration:
    """Move every ``NS:rest`` key of ``namespace`` to ``{NS}:rest`` (RENAMENX: type, value and TTL
    kept; atomic per key), then write the marker, unless a key's new name exists already (a
    conflict: left as it is and reported; run again once resolved). ``dry_run``: count by kind,
    move nothing. ``progress(n)`` is called after each batch with the keys it handled.

    Names are handled as bytes: ``rest`` may be any bytes (not UTF-8, spaces, newlines, braces, glob
    characters), and moves as it is. The namespace pattern has no ':' nor glob characters, so ``NS:*``
    matches no other namespace's keys. Safe to run again at any point: a key is under one name or the
    other, never both."""
    if isinstance(client, RedisCluster):
        raise ConfigError("a Redis Cluster holds no data of the older key layout: nothing to migrate")
    result = Migration(namespace, dry_run)
    conflicts: dict[bytes, bytes] = {}
    last = {f"{namespace}:{rest}".encode() for rest in LONG_LIVED}  # moved after all others: see below
    _sweep(client, namespace, result, conflicts, dry_run, progress, batch, last)
    if not dry_run and not conflicts:
        # A sender or worker of the older release still running (--force; or a web app's client, which
        # no heartbeat shows) writes old names again behind the scan: look once more, and while it
        # does, leave the namespace refused.
        before = result.total
        _sweep(client, namespace, result, conflicts, dry_run, progress, batch, last)
        result.rewritten = result.total - before + len(conflicts)
    # The keys the guard looks for (layout_state) move last, and only once every other key has: a
    # run stopped, conflicting or written to before them leaves the namespace refused, its remaining
    # keys unserved.
    if (not conflicts and not result.rewritten) or dry_run:
        pipe = client.pipeline(transaction=False)
        for name in sorted(last):
            pipe.exists(name)
        names = [name for name, held in zip(sorted(last), pipe.execute(), strict=True) if held]
        _move(client, namespace, names, result, conflicts, dry_run)
        if progress is not None:
            progress(len(names))
    result.conflicts = sorted((shown(old), shown(new)) for old, new in conflicts.items())
    if not dry_run and not conflicts and not result.rewritten and (result.total or _holds_new(client, namespace)):
        client.set(marker(namespace), VERSION)  # last: the guard lets workers start from now on
        result.marked = True
    return result


def _sweep(client: redis.Redis, namespace: str, result: Migration, conflicts: dict[bytes, bytes], dry_run: bool,
           progress: Callable[[int], Any] | None, batch: int, skipped: set[bytes]) -> None:
    """One SCAN over ``NS:*``, moving what it finds but ``skipped``, a batch per round trip."""
    cursor = 0
    while True:
        cursor, found = client.scan(cursor, match=f"{namespace}:*", count=batch)
        names = [k if isinstance(k, bytes) else k.encode() for k in found]
        names = [k for k in names if k not in conflicts and k not in skipped]  # SCAN may return a key twice
        _move(client, namespace, names, result, conflicts, dry_run)
        if progress is not None and names:
            progress(len(names))
        if cursor == 0:
            break


def shown(name: bytes) -> str:
    """A key's name as text, one line: bytes that are not UTF-8 as ``\\xNN``, line breaks and tabs
    as ``\\n``, ``\\r``, ``\\t`` (as redis-cli reads them between double quotes)."""
    text = name.decode("utf-8", "backslashreplace")
    return text.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def _move(client: redis.Redis, namespace: str, names: list[bytes], result: Migration,
          conflicts: dict[bytes, bytes], dry_run: bool) -> None:
    """RENAMENX each of ``names`` (or, ``dry_run``, see whether its new name is free), in one round trip."""
    if not names:
        return
    new, start = prefix(namespace).encode(), len(namespace.encode()) + 1
    pipe = client.pipeline(transaction=False)
    for old in names:
        if dry_run:
            pipe.exists(new + b":" + old[start:])
        else:
            pipe.renamenx(old, new + b":" + old[start:])
    for old, outcome in zip(names, pipe.execute(raise_on_error=False), strict=True):
        if isinstance(outcome, redis.ResponseError):
            if "no such key" not in str(outcome).lower():
                raise outcome
            result.vanished += 1  # expired since the scan
            continue
        moves = not outcome if dry_run else bool(outcome)  # dry run: its new name is free; else: renamed
        if moves:
            result.moved[kind(shown(old[start:]))] += 1
        else:
            conflicts[old] = new + b":" + old[start:]


def _holds_new(client: redis.Redis, namespace: str) -> bool:
    """Whether the namespace has data in the new layout (a run before this one moved it all)."""
    return bool(client.exists(*(f"{prefix(namespace)}:{rest}" for rest in LONG_LIVED)))
