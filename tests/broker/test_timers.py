"""Durable timers on real Redis: due by the server's clock and never before it, fired once per due
time by the process holding the lock, a failing handler's timer tried again later, a timer moved
meanwhile left for its new time, an unknown kind left for the process that knows it."""

from __future__ import annotations

import time
from typing import Any

from mesh.broker import timers
from mesh.broker.clock import server_ms
from mesh.broker.keys import Keys


def schedule(rclient: Any, keys: Keys, kind: str, ref: str, delay_ms: int) -> int:
    pipe = rclient.pipeline(transaction=True)
    timers.stage_schedule(pipe, keys, kind, ref, delay_ms)
    pipe.execute()
    due = timers.due_at(rclient, keys, kind, ref)
    assert due is not None
    return due


def test_a_timer_fires_once_at_its_due_time_by_the_server_clock_never_before(rclient, namespace):
    keys = Keys(namespace)
    fired: list[timers.Due] = []
    loop = timers.Timers(rclient, keys, "me", {"t": lambda d: fired.append(d) or True})
    due = schedule(rclient, keys, "t", "a", 300)
    assert schedule(rclient, keys, "t", "a", 60_000) == due  # scheduled again: keeps its due time
    early, deadline = 0, time.monotonic() + 5
    while not fired:  # ticks as fast as it can, before and after the due time
        assert time.monotonic() < deadline, "never fired"
        after = server_ms(rclient)
        if loop.tick() == 0 and after < due:
            early += 1
    [d] = fired
    assert early > 0 and (d.kind, d.ref, d.due_ms) == ("t", "a", due)
    assert d.now_ms >= due  # the tick that fired it read the server's TIME at or after the due time
    assert server_ms(rclient) - due < 1000
    assert loop.tick() == 0 and rclient.zcard(keys.timers) == 0


def test_only_the_holder_of_the_lock_fires(rclient, namespace):
    keys = Keys(namespace)
    schedule(rclient, keys, "t", "a", 0)
    rclient.set(keys.timers_lock, "someone else", px=5_000)
    assert timers.Timers(rclient, keys, "me", {"t": lambda d: True}).tick() == 0
    rclient.delete(keys.timers_lock)
    assert timers.Timers(rclient, keys, "me", {"t": lambda d: True}).tick() == 1
    assert rclient.get(keys.timers_lock) is None  # released after the tick


def test_a_failing_handler_is_tried_again_later_and_an_unknown_kind_is_left(rclient, namespace):
    keys = Keys(namespace)

    def boom(d: timers.Due) -> bool:
        raise RuntimeError("handler broke")

    due = schedule(rclient, keys, "t", "a", 0)
    schedule(rclient, keys, "other", "b", 0)
    loop = timers.Timers(rclient, keys, "me", {"t": boom})
    assert loop.tick() == 0
    moved = timers.due_at(rclient, keys, "t", "a")
    assert moved is not None and moved >= due + timers.RETRY_MS
    assert timers.due_at(rclient, keys, "other", "b") is not None


def test_a_timer_moved_while_its_handler_ran_is_kept_for_its_new_time(rclient, namespace):
    keys = Keys(namespace)

    def reschedule(d: timers.Due) -> bool:
        rclient.zadd(keys.timers, {d.member: d.due_ms + 60_000})
        return True

    due = schedule(rclient, keys, "t", "a", 0)
    assert timers.Timers(rclient, keys, "me", {"t": reschedule}).tick() == 1
    assert timers.due_at(rclient, keys, "t", "a") == due + 60_000
