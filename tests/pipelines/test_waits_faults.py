"""Durable waits under faults, with real worker processes and a Redis of the test's own (append-only,
on its own port): a sleep, a wait_for's timeout and a wait_for's event each end a step after the
worker was SIGKILLed and Redis restarted while they waited — the timers are in Redis, not in a
thread — and the job goes on to succeed; a worker SIGSTOPped around the due time ends no wait twice;
a wait released on the failure path (the consumer's settle script) is indexed and timed."""

from __future__ import annotations

import os
import signal

import pytest
import redis

from mesh import MeshClient
from mesh.agents.pipelines import Pipeline
from mesh.broker import timers, trace, waits
from mesh.broker.clock import server_ms
from mesh.broker.keys import prefix
from mesh.contracts import State
from mesh.ops.local_redis import PrivateRedis, redis_binary
from tests.conftest import wait_for
from tests.pipelines.agents import app
from tests.pipelines.test_engine import runs

APP = "tests.pipelines.agents:app"


@pytest.mark.slow
def test_a_sleep_and_a_wait_for_end_after_the_worker_was_killed_and_redis_restarted(tmp_path, make_settings,
                                                                                    worker_process):
    binary = redis_binary()
    assert binary is not None, "no redis-server binary"
    server = PrivateRedis(binary, folder=tmp_path / "redis", args=("--appendonly", "yes", "--appendfsync", "always"))
    try:
        settings = make_settings(redis_url=server.url)
        mesh = MeshClient(settings, client=redis.Redis.from_url(server.url), app=app)
        first = worker_process("--app", APP, "--threads", "1", MESH_REDIS_URL=server.url)
        goal = {"goal": "input.goal"}
        spec = (Pipeline("waits").step("nap", sleep="5s")
                .step("quiet", wait_for={"event": "never.comes", "timeout": "5s", "on_timeout": "continue"})
                .step("pay", wait_for={"event": "payment.settled", "match": "event.order == input.order",
                                       "timeout": "1h"})
                .step("researcher", depends_on=["nap", "quiet", "pay"], input=goal).build())
        ref = mesh.run(spec, {"goal": "g", "order": 7})
        record = mesh.status(ref.id)
        assert {s: record.steps[s].state for s in ("nap", "quiet", "pay")} == dict.fromkeys(
            ("nap", "quiet", "pay"), State.WAITING)
        started = server_ms(mesh.redis)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
        server.restart()  # every key back from the append-only file
        assert mesh.status(ref.id).steps["nap"].state is State.WAITING
        worker_process("--app", APP, "--threads", "1", MESH_REDIS_URL=server.url)  # no thread of the old one
        assert mesh.emit("payment.settled", {"order": 7, "paid": True}).resumed == [(ref.id, "pay")]
        record = wait_for(lambda: (r := mesh.status(ref.id)).state is State.SUCCEEDED and r, timeout_s=30)
        assert record.steps["nap"].result == {"slept_s": 5.0}
        assert record.steps["quiet"].result == {"timed_out": True}
        assert record.steps["pay"].result == {"order": 7, "paid": True}
        assert record.steps["researcher"].state is State.SUCCEEDED
        assert server_ms(mesh.redis) - started >= 4500  # never before its due time
        assert mesh.redis.zcard(mesh.keys_of(ref.id).timers) == 0 and mesh.redis.zcard(mesh.keys_of(ref.id).waits) == 0
    finally:
        server.stop()


@pytest.mark.slow
def test_a_wait_released_by_a_failed_item_joining_is_indexed_and_timed(mesh, run_workers):
    """A join decided on the failure path (the consumer's settle script writes that record) releases
    a waiting step: its index entry and timer are there, so an emit finds it."""
    spec = (Pipeline("fan-wait").step("scout")
            .step("fetch", depends_on=["scout"], for_each="scout.sources", max_parallel=1,
                  join={"min_success": 1}, retry_policy={"max_attempts": 1})
            .step("pay", depends_on=["fetch"], wait_for={"event": "paid", "timeout": "1h"}).build())
    mesh.redis.sadd(f"{prefix(mesh.settings.namespace)}:test.fail", "fw-1/fetch/fetch/1")  # the last item fails
    run_workers()
    ref = mesh.run(spec, {"goal": "g", "count": 2}, key="fw-1")
    wait_for(lambda: mesh.status(ref.id).steps["pay"].state is State.WAITING, timeout_s=30)
    assert mesh.status(ref.id).steps["fetch[1]"].state is State.DEAD_LETTERED
    wait_for(lambda: [w.job_id for w in mesh.waits("paid")] == [ref.id])
    assert mesh.redis.zcard(mesh.keys_of(ref.id).timers) >= 1
    assert mesh.emit("paid", {"ok": True}).resumed == [(ref.id, "pay")]
    assert mesh.status(ref.id).steps["pay"].result == {"ok": True}


@pytest.mark.slow
def test_a_worker_paused_around_the_due_time_ends_no_wait_twice(mesh, worker_process):
    """Two workers fire the timers; the one holding the timers' lock at the sleeps' due time (or the
    first) is SIGSTOPped: the other ends every sleep once its lock expires, and the paused one,
    resumed, ends none of them again (each sleep ends once, each next step runs once)."""
    first = worker_process("--app", APP, "--threads", "1")
    second = worker_process("--app", APP, "--threads", "1")
    wait_for(lambda: mesh.registry.listing(), timeout_s=30)
    spec = Pipeline("paused").step("nap", sleep="2s").step("researcher", depends_on=["nap"],
                                                           input={"goal": "input.goal"}).build()
    refs = [mesh.run(spec, {"goal": "g"}, key=f"paused-{i}") for i in range(4)]
    due = max(timers.due_at(mesh.redis, mesh.keys, waits.TIMER, waits.wait_ref(r.id, "nap", 1)) or 0 for r in refs)
    wait_for(lambda: server_ms(mesh.redis) >= due - 50, timeout_s=10, interval_s=0.005)
    holder = mesh.redis.get(mesh.keys.timers_lock)
    pids = {str(p.pid): p for p in (first, second)}
    paused = pids.get(holder.decode().rsplit(":", 1)[-1], first) if holder else first
    os.kill(paused.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: all(mesh.status(r.id).state is State.SUCCEEDED for r in refs), timeout_s=30)
    finally:
        os.kill(paused.pid, signal.SIGCONT)
    after = mesh.run(Pipeline("after").step("nap", sleep="300ms").build(), {}, key="after")
    wait_for(lambda: mesh.status(after.id).state is State.SUCCEEDED, timeout_s=30)
    for ref in refs:
        kinds = [e["event"] for e in trace.read(mesh.redis, mesh.keys_of(ref.id), ref.id)]
        assert kinds.count("slept") == 1 and kinds.count("succeeded") == 1, kinds
    assert sorted(runs(mesh).values()) == [1, 1, 1, 1]
