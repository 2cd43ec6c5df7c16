"""Durable timers: a sorted set of due times on the Redis clock, fired by whichever worker holds a lock.

A timer is a member ``{kind}|{ref}`` of ``{ns}:timers`` scored by its due time in ms of Redis's
``TIME``. It lives in Redis, not in a sleeping thread, so it survives every worker's restart, and a
Redis restart too where Redis persists. Every worker runs :class:`mesh.ops.timer_loop.TimerLoop`:
each tick, the one that takes ``{ns}:timers.lock`` reads the timers due by the server's clock
(:func:`due`, in a script, so none is ever read early) and calls the handler registered for each
kind. A handler returns True when the timer is done: it is removed unless it was rescheduled
meanwhile (:func:`done`); a handler that raises has its timer looked at again a little later.
Handlers must be idempotent: a worker that dies after the handler's write and before the removal
leaves the timer to fire again, and the handler then finds nothing to do.

Kinds in use: ``approval`` (an approval's timeout) and ``approval.warn`` (its warning); ``wait``,
``wait.check``, ``wait.emit`` and ``wait.signal`` (durable waits: :mod:`mesh.broker.waits`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from .connection import stage_eval
from .keys import Keys

logger = logging.getLogger(__name__)

#: Adds a timer ``delay_ms`` after the server's now, unless it is set already (NX): a timer's due
#: time is fixed when it is first scheduled. KEYS[1] timers; ARGV member, delay (ms).
_SCHEDULE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZADD', KEYS[1], 'NX', now + tonumber(ARGV[2]), ARGV[1])
"""

#: The timers due by the server's clock, at most ARGV[1]: {now, member, score, member, score, ...}.
_DUE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local found = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[1]))
table.insert(found, 1, now)
return found
"""

#: Removes ARGV[1] when its score is still ARGV[2] (not rescheduled since it was read); else moves it
#: to ARGV[3] when that is given (a failed handler's retry).
_SETTLE = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) ~= tonumber(ARGV[2]) then return 0 end
if ARGV[3] == '' then return redis.call('ZREM', KEYS[1], ARGV[1]) end
return redis.call('ZADD', KEYS[1], 'XX', tonumber(ARGV[3]), ARGV[1])
"""

#: Releases the lock only if ARGV[1] still holds it.
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

#: How long a failed handler's timer waits before it is tried again (ms).
RETRY_MS = 5_000


def member(kind: str, ref: str) -> str:
    """The timer's member: its kind and what it refers to."""
    if "|" in kind:
        raise ValueError(f"a timer kind has no '|': {kind!r}")
    return f"{kind}|{ref}"


def stage_schedule(pipe: Any, keys: Keys, kind: str, ref: str, delay_ms: int) -> None:
    """Stage a timer due ``delay_ms`` after the server's time when the staged commands run (into a
    MULTI, so the timer comes with the write that needs it); one already set keeps its due time."""
    stage_eval(pipe, _SCHEDULE, 1, keys.timers, member(kind, ref), max(0, int(delay_ms)))


def stage_cancel(pipe: Any, keys: Keys, kind: str, ref: str) -> None:
    """Stage the removal of a timer (none set: nothing happens)."""
    pipe.zrem(keys.timers, member(kind, ref))


def due_at(client: Any, keys: Keys, kind: str, ref: str) -> int | None:
    """A timer's due time (ms, Redis clock); None when it is not set."""
    score = client.zscore(keys.timers, member(kind, ref))
    return None if score is None else int(score)


@dataclass(frozen=True)
class Due:
    kind: str
    ref: str
    due_ms: int
    #: The server's time when it was read (ms): never before ``due_ms``.
    now_ms: int

    @property
    def member(self) -> str:
        return member(self.kind, self.ref)


def due(client: redis.Redis, keys: Keys, limit: int = 100) -> list[Due]:
    """The timers due now by the server's clock (at most ``limit``, the earliest first)."""
    found: Any = client.eval(_DUE, 1, keys.timers, limit)
    now = int(found[0])
    out = []
    for raw, score in zip(found[1::2], found[2::2], strict=True):
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        kind, _, ref = text.partition("|")
        out.append(Due(kind, ref, int(float(score)), now))
    return out


#: A kind's handler: True when the timer is done (removed), False to leave it as it is.
Handler = Callable[[Due], bool]


class Timers:
    """Fires due timers by kind under ``{ns}:timers.lock``; one instance per worker process."""

    def __init__(self, client: redis.Redis, keys: Keys, owner: str, handlers: dict[str, Handler] | None = None,
                 lock_ms: int = 10_000) -> None:
        self.client = client
        self.keys = keys
        self.owner = owner
        self.handlers: dict[str, Handler] = dict(handlers or {})
        self.lock_ms = lock_ms

    def on(self, kind: str, handler: Handler) -> None:
        """Register what fires a timer of ``kind``."""
        self.handlers[kind] = handler

    def tick(self) -> int:
        """Fire the timers due now if this process takes the lock; how many fired (0 without the lock).
        It takes no new timer past half its lock's life: the rest wait for the next tick, which takes
        the lock again, rather than for another worker to take the lock this one still acts under and
        fire the same timers alongside it."""
        if not self.client.set(self.keys.timers_lock, self.owner, nx=True, px=self.lock_ms):
            return 0
        stop = time.monotonic() + self.lock_ms / 2000
        fired = 0
        try:
            for d in due(self.client, self.keys):
                if time.monotonic() > stop:
                    break
                fired += self._fire(d)
            return fired
        finally:
            self.client.eval(_UNLOCK, 1, self.keys.timers_lock, self.owner)

    def _fire(self, d: Due) -> bool:
        handler = self.handlers.get(d.kind)
        if handler is None:
            return False  # a kind another release (or process type) fires: left for it
        try:
            finished = handler(d)
        except redis.RedisError:
            raise
        except Exception:
            logger.exception("timer handler failed; trying again later", extra={"timer": d.member})
            self.client.eval(_SETTLE, 1, self.keys.timers, d.member, d.due_ms, d.now_ms + RETRY_MS)
            return False
        if finished:
            self.client.eval(_SETTLE, 1, self.keys.timers, d.member, d.due_ms, "")
        return finished
