"""Counters and the handler-duration histogram, kept in Redis so that every worker process on every
host adds to the same figures and the ops server reads them at scrape time (no per-process
registry, no port per worker). Everything here is staged into a pipeline or MULTI the caller
already sends, or (a step's success: :class:`Counters`) added up in the worker process and written
once per MESH_COUNTER_FLUSH_S."""

from __future__ import annotations

import atexit
import bisect
import logging
import os
import threading
import uuid
import weakref
from typing import Any

import redis
from dramatiq.middleware import Middleware

from .claims import script_source
from .keys import Keys

logger = logging.getLogger(__name__)

COUNTERS_LUA = script_source("counters.lua")

#: How long a process's last written batch number is kept after its last batch (s): a batch sent again
#: within it (its answer lost) is not added twice.
FLUSHED_TTL_S = 24 * 3600

#: Upper bounds (s) of the handler-duration histogram's buckets; the last bucket is +Inf.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def bucket_of(seconds: float) -> str:
    i = bisect.bisect_left(BUCKETS, seconds)
    return "+Inf" if i == len(BUCKETS) else repr(BUCKETS[i])


def observe_duration(pipe: Any, keys: Keys, agent: str, seconds: float) -> None:
    """Count one handler run of ``seconds`` in its bucket and add it to the sum: two commands. The
    count of runs is the buckets' total (the metrics reader's cumulative ``+Inf``), not a field of its own."""
    key = keys.histogram(agent)
    pipe.hincrby(key, bucket_of(seconds), 1)
    pipe.hincrbyfloat(key, "sum", seconds)


#: ``{ns}:stats`` fields a job's control counts (ops/metrics.py), from the trace events written with it.
UNWIND_STATS = ("unwound:halted", "unwound:failed", "unwound:cancelled", "compensations_sent",
                "compensations_failed", "jobs_compensated")


def unwind_counts(events: Any) -> list[str]:
    """The ``{ns}:stats`` fields the trace events of one job write add 1 to: a job that began undoing
    its effects, by cause (``compensating``, ``cancelled``); a compensation sent; one dead-lettered
    (``compensation_failed``); a job whose compensations all ran (``compensated``)."""
    out = []
    for ev in events:
        kind, step = ev.get("event"), str(ev.get("step_id") or "")
        if kind == "compensating":
            out.append(f"unwound:{ev.get('cause')}")
        elif kind == "cancelled" and not ev.get("step_id"):
            out.append("unwound:cancelled")
        elif kind == "compensation_sent":
            out.append("compensations_sent")
        elif kind == "compensation_failed" or (kind == "dead_lettered" and step.startswith("undo:")):
            out.append("compensations_failed")
        elif kind == "compensated":
            out.append("jobs_compensated")
    return out


def count_outcome(pipe: Any, keys: Keys, agent: str, outcome: str) -> None:
    pipe.hincrby(keys.outcomes, f"{agent}:{outcome}", 1)


def running_member(job_id: str, step_id: str) -> str:
    return f"{job_id}/{step_id}"


class Counters:
    """A worker process's counters of its steps' successes (``{ns}:outcomes`` and ``{ns}:hist:{agent}``),
    added up in memory and written every ``interval_s`` (MESH_COUNTER_FLUSH_S) by a thread of their own,
    one script call for all of them (``scripts/counters.lua``), and when the worker stops
    (:meth:`close`), instead of a ``HINCRBY`` or ``HINCRBYFLOAT`` per field with each step's write. It
    stages as a pipeline does (``hincrby``, ``hincrbyfloat``), so :func:`count_outcome` and
    :func:`observe_duration` add to it as to a pipeline.

    What that trades: the figures in Redis trail the steps by up to one interval, and a process killed
    (SIGKILL, the host lost) loses what it added since its last write; a stop (SIGTERM, SIGINT) writes
    everything, as does a normal exit of the process (``atexit``). A child forked from the process
    starts afresh (its own batch key and numbers, none of the parent's held counts). A batch whose
    write fails is sent again, with its number, at the next interval: one that had landed (its answer
    lost) is not added twice."""

    def __init__(self, client: redis.Redis, keys: Keys, interval_s: float) -> None:
        self.client = client
        self.interval_s = interval_s
        self.keys = keys
        self._script = client.register_script(COUNTERS_LUA)
        self._start_afresh()
        _LIVE.add(self)

    def _start_afresh(self) -> None:
        """A process's own batch numbers, under a key of its own, with nothing held and no thread yet:
        at creation, and in a child forked from the process that holds these counters (see
        :func:`_forked`)."""
        self.flushed_key = self.keys.outcomes_flushed(uuid.uuid4().hex)
        self._sums: dict[tuple[str, str, str], float] = {}
        self._lock = threading.Lock()
        self._writing = threading.Lock()
        self._pending: list[Any] | None = None
        self._seq = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def hincrby(self, key: str, field: str, by: int) -> None:
        self._add("i", key, field, by)

    def hincrbyfloat(self, key: str, field: str, by: float) -> None:
        self._add("f", key, field, by)

    def _add(self, kind: str, key: str, field: str, by: float) -> None:
        with self._lock:
            at = (kind, key, field)
            self._sums[at] = self._sums.get(at, 0) + by
            if self._thread is None and not self._stop.is_set():
                self._start_thread()

    def _start_thread(self) -> None:
        self._thread = threading.Thread(target=self._loop, args=(self._stop,), name="mesh-counters", daemon=True)
        self._thread.start()

    def _loop(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval_s):
            try:
                self.flush()
            except Exception as exc:  # the thread must live on: the counts are kept for the next interval
                logger.warning("could not write the step counters; trying again next interval",
                               extra={"error": repr(exc)})

    def flush(self) -> None:
        """Write what was added since the last write (and a batch whose write failed, first); a failure
        raises, and its counts are sent again at the next call."""
        with self._writing:
            if self._pending is not None:
                self._send(self._pending)
                self._pending = None
            with self._lock:
                sums, self._sums = self._sums, {}
            if not sums:
                return
            self._seq += 1
            args: list[Any] = [self._seq, FLUSHED_TTL_S]
            for (kind, key, field), by in sums.items():
                # an integer's digits, or a float's in full (as step.lua writes them)
                args += [kind, key, field, str(int(by)) if kind == "i" else repr(float(by))]
            self._pending = args
            self._send(args)
            self._pending = None

    def _send(self, args: list[Any]) -> None:
        self._script(keys=[self.keys.prefix, self.flushed_key], args=args)

    def close(self) -> None:
        """Stop the thread and write what is left. A count added afterwards (a step that outlived its
        worker's stop) starts the thread again, and is written at the interval or at the process's exit."""
        with self._lock:
            self._stop.set()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=10)
        try:
            self.flush()
        except redis.RedisError as exc:
            logger.warning("could not write the step counters at shutdown", extra={"error": repr(exc)})
        with self._lock:
            if self._thread is thread:
                self._stop, self._thread = threading.Event(), None
                if self._sums:
                    self._start_thread()

    def _at_exit(self) -> None:
        """Write what is held as the process exits: a process that ends without stopping its worker (an
        app's own script, a test's in-process worker) would lose it with its daemon thread."""
        with self._lock:
            self._stop.set()
            held = bool(self._sums) or self._pending is not None
        if not held:
            return
        try:
            self.flush()
        except redis.RedisError as exc:
            logger.warning("could not write the step counters at exit", extra={"error": repr(exc)})


#: Every live :class:`Counters` of this process, for :func:`_forked` and :func:`_at_exit`.
_LIVE: weakref.WeakSet[Counters] = weakref.WeakSet()


def _forked() -> None:
    """In a child forked from a process holding counters (an app or server forking after it built a
    runtime, multiprocessing's 'fork'), each starts afresh: the parent writes what it held before the
    fork (the child writing it too would count it twice), the child numbers its batches under a key of
    its own (sharing the parent's, one's batch would be refused as already written and its counts
    lost), and its thread, which a fork does not carry over, starts with its first count."""
    for counters in list(_LIVE):
        counters._start_afresh()


os.register_at_fork(after_in_child=_forked)


@atexit.register
def _at_exit() -> None:
    for counters in list(_LIVE):
        counters._at_exit()


class FlushCounters(Middleware):
    """Writes what :class:`Counters` holds once the worker has stopped (its threads' last steps written)."""

    def __init__(self, counters: Counters) -> None:
        self.counters = counters

    def after_worker_shutdown(self, broker: Any, worker: Any) -> None:
        self.counters.close()
