"""One reader of job traces for the whole server, fanned out to every browser that follows a job.

A browser on a job's page opens ``/jobs/{id}/events`` (server-sent events). Each such stream
registers a :class:`Follower` with the server's :class:`TraceHub`; the hub's one thread reads every
followed job's trace with a single ``XREAD BLOCK`` over all their streams and hands each event to
the job's followers. A new follower is caught up by the same thread (from the event id it has,
``0`` for all) before it joins, so it neither misses nor repeats an event. When a job ends, its
followers get what is left and an end, and the hub stops reading its stream. A job that has ended
before anyone follows it is read through :func:`mesh.broker.trace.read_since`, wherever the trace is
kept. With several shards (MESH_SHARDS) a job's trace is in its shard: one XREAD per shard with
followed jobs (a Redis Cluster serves one slot per read), each waiting its share of BLOCK_MS.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from mesh.broker import MeshClient, trace
from mesh.broker.connection import is_cluster
from mesh.broker.jobs import JobStore
from mesh.broker.keys import Keys
from mesh.broker.shards import Shards
from mesh.contracts import TERMINAL

logger = logging.getLogger(__name__)

#: How long one XREAD waits for news (also how long a new follower may wait to be caught up).
BLOCK_MS = 250

#: How often a followed job's record is read to see whether it ended without an event saying so.
RECHECK_S = 2.0

#: Events said while a step runs, none of which ends its job: news of only these does not send the
#: hub to read the job's record (megabytes for a job of thousands of steps, a third of a second to
#: read and parse, on the one thread every follower waits on) — the RECHECK_S look still does.
WITHIN_A_STEP = frozenset({"progress", "tool_call", "model_call", "picked_up", "tool_replayed", "tool_refused",
                           "loop_restarted", "fenced", "approval_warning"})

#: Events one XREAD takes at most.
BATCH = 500

#: Events a slow browser may have waiting before it is cut off (it reconnects from its last id).
QUEUE_MAX = 5_000

#: The job has ended: the stream says so (``event: end``) and closes.
END = {"end": True}

#: The stream is closed without an end (the job goes on): a slow browser cut off, or the server
#: stopping. A browser's EventSource reconnects with its Last-Event-ID and goes on from there; an
#: ``end`` here would tell it, and any script following the stream, that the job had ended.
CUT = {"cut": True}


@dataclass(eq=False)
class Follower:
    """One browser's stream: events arrive on ``queue`` as (id, event); ``END`` or ``CUT`` closes it."""

    job_id: str
    last_id: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[tuple[str, dict[str, Any]]] = field(default_factory=lambda: asyncio.Queue(QUEUE_MAX))

    def put(self, item: tuple[str, dict[str, Any]]) -> None:
        """Hand over one event (from the hub's thread); one this follower already has is left out."""
        event_id = item[0]
        if event_id:
            if not _before(self.last_id, event_id):
                return
            self.last_id = event_id
        self.loop.call_soon_threadsafe(self._put, item)

    def _put(self, item: tuple[str, dict[str, Any]]) -> None:
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:  # cut off: drop what waits and close it; the browser resumes from its last id
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(("", CUT))


@dataclass
class _Job:
    cursor: str
    followers: set[Follower] = field(default_factory=set)
    checked_at: float = 0.0


class TraceHub:
    """The server's one trace reader (a thread with its own Redis connection, started on first use)."""

    def __init__(self, client: MeshClient) -> None:
        self.client = client
        self.shards = Shards.of(client.settings)
        # Its blocking XREAD on a connection of the client's pool; a cluster client's own (one XREAD of
        # streams in the namespace's slot goes to the node that serves it), which has no one pool.
        self.redis: redis.Redis = client.redis if is_cluster(client.redis) else \
            redis.Redis(connection_pool=client.redis.connection_pool)
        self.jobs: dict[str, _Job] = {}
        self.joining: list[Follower] = []
        self.leaving: list[Follower] = []
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None
        self.reads = 0  # XREADs made: what the tests count to show one reader serves many browsers

    def follow(self, follower: Follower) -> None:
        with self.lock:
            self.joining.append(follower)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="trace-hub", daemon=True)
                self.thread.start()
        self.wake.set()

    def leave(self, follower: Follower) -> None:
        with self.lock:
            self.leaving.append(follower)

    def stop(self) -> None:
        """Stop reading and close every follower's stream (the server is stopping; their jobs are not
        ended, so no ``end`` is said)."""
        self.stopped.set()
        self.wake.set()
        if self.thread is not None:
            self.thread.join(5)
        with self.lock:
            followers = [f for job in self.jobs.values() for f in job.followers] + self.joining
            self.jobs.clear()
            self.joining = []
        for f in followers:
            f.put(("", CUT))

    @property
    def followers(self) -> int:
        with self.lock:
            return sum(len(j.followers) for j in self.jobs.values()) + len(self.joining)

    def _keys(self, job_id: str) -> Keys:
        """The keys of the shard the job lives in (its trace and record)."""
        return self.shards.of_job(job_id)

    def _run(self) -> None:
        while not self.stopped.is_set():
            try:
                self._step()
            except redis.RedisError as exc:  # Redis away: the followers wait; reading resumes with it
                logger.warning("trace hub: redis unavailable", extra={"error": str(exc)})
                self.stopped.wait(1.0)
            except Exception:  # a bug must not leave every follower waiting for ever: say it, go on
                logger.exception("trace hub: reading failed")
                self.stopped.wait(1.0)

    def _step(self) -> None:
        self._admit()
        if not self.jobs:
            self.wake.wait(1.0)
            self.wake.clear()
            return
        names = {self._keys(job_id).trace(job_id): job_id for job_id in self.jobs}
        by_shard: dict[str, dict[str, str]] = {}  # one XREAD per shard: its streams are one slot
        for name, job_id in names.items():
            by_shard.setdefault(self._keys(job_id).prefix, {})[name] = self.jobs[job_id].cursor
        rows: list[Any] = []
        for streams in by_shard.values():
            self.reads += 1
            read: Any = self.redis.xread(streams, count=BATCH,  # type: ignore[arg-type]
                                         block=max(1, BLOCK_MS // len(by_shard)))
            rows += read or ()
        moved = set()
        for stream, entries in rows or ():
            job_id = names[stream.decode() if isinstance(stream, bytes) else stream]
            job = self.jobs.get(job_id)
            if job is None:
                continue
            for event_id, ev in trace.decode(entries):
                job.cursor = event_id
                for f in job.followers:
                    f.put((event_id, ev))
                if ev.get("event") not in WITHIN_A_STEP:
                    moved.add(job_id)
        self._end_finished(moved)

    def _admit(self) -> None:
        """Catch up and add the followers that joined, drop those that left (this thread alone moves cursors)."""
        with self.lock:
            joining, self.joining = self.joining, []
            leaving, self.leaving = self.leaving, []
        for f in leaving:
            job = self.jobs.get(f.job_id)
            if job is not None:
                job.followers.discard(f)
                if not job.followers:
                    del self.jobs[f.job_id]
        for f in joining:
            job = self.jobs.get(f.job_id)
            if job is None:
                self.jobs[f.job_id] = _Job(cursor=f.last_id, followers={f})
                continue
            if _before(f.last_id, job.cursor):  # behind the others: what they already got, from the stream
                for item in trace.decode(self.redis.xrange(self._keys(f.job_id).trace(f.job_id),
                                                           min=_after(f.last_id), max=job.cursor)):
                    f.put(item)
            job.followers.add(f)
        if joining:
            self._end_finished({f.job_id for f in joining})

    def _end_finished(self, moved: set[str]) -> None:
        """End the jobs that ended: those with news that may end them now, and the rest every RECHECK_S."""
        now = time.monotonic()
        due = [j for j, job in self.jobs.items() if j in moved or now - job.checked_at >= RECHECK_S]
        for job_id in due:
            self.jobs[job_id].checked_at = now
            keys = self._keys(job_id)
            record = JobStore(self.client.redis, keys).get(job_id)
            if record is not None and record.state not in TERMINAL:
                continue
            job = self.jobs.pop(job_id)
            rest = trace.read_since(self.redis, keys, job_id, job.cursor)
            for f in job.followers:
                for item in rest:
                    f.put(item)
                f.put(("", END))


def _after(event_id: str) -> str:
    """XRANGE's start just after ``event_id`` (``0``: from the first)."""
    return "-" if event_id in ("", "0", "0-0") else f"({event_id}"


def _before(a: str, b: str) -> bool:
    """Whether stream id ``a`` comes before ``b``."""
    def parts(x: str) -> tuple[int, int]:
        ms, _, seq = x.partition("-")
        return int(ms or 0), int(seq or 0)
    return parts(a) < parts(b)
