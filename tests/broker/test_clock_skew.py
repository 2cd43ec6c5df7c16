"""One host's skewed clock cannot re-deliver the fleet's work, nor keep a dead worker's work from
being recovered: heartbeats and reaping use the Redis server's clock. The skewed host is a real
broker whose clock is injected (``MeshBroker(clock=...)``), over the real Redis."""

from __future__ import annotations

import os
import signal

from conftest import push_raw, wait_for
from dramatiq.common import current_millis

from mesh.broker import MeshClient
from mesh.broker.mesh_broker import MeshBroker
from mesh.contracts import State
from tests.httpserver import RecordingServer

#: As reported: one host 16 s off, with the default 15 s heartbeat timeout.
SKEW_MS = 16_000


def skewed(settings, skew_ms: int) -> MeshBroker:
    return MeshBroker(settings, clock=lambda: current_millis() + skew_ms, middleware=[])


def stat(client: MeshClient, name: str) -> int:
    return int(client.redis.hget(client.keys.stats, name) or 0)


def test_a_host_16s_ahead_does_not_recover_a_live_workers_in_flight_message(make_settings, rclient, start_worker):
    with RecordingServer(hold=True) as server:
        settings = make_settings(http_allow=server.host_port, http_timeout_s=60)
        client = MeshClient(settings, client=rclient)
        start_worker(settings, ("executor",))
        ref = client.send("executor", {"tool": "http_post", "args": {"url": server.url()}}, key="skew-ahead")
        wait_for(lambda: len(server.requests) == 1)  # the live worker holds the message, mid-call

        ahead = skewed(settings, SKEW_MS)
        try:
            ahead.settle("heartbeat", "executor")  # what the skewed host's idle and busy consumers run
            ahead.settle("fetch", "planner", 1)
        finally:
            ahead.close()
        assert stat(client, "recovered") == 0
        assert client.queues()["executor"] == {"ready": 0, "delayed": 0, "in_flight": 1}

        server.release()
        record = client.wait(ref.id, timeout_s=30)

    assert record.state is State.SUCCEEDED
    assert len(server.requests) == 1  # delivered once
    assert (stat(client, "recovered"), stat(client, "deferred_in_flight"), stat(client, "duplicates")) == (0, 0, 0)


def test_an_ack_and_an_enqueue_from_a_host_16s_behind_do_not_make_its_worker_look_dead(make_settings, rclient):
    """dramatiq's own dispatch script (ack, enqueue) writes the heartbeat too, after the fetch."""
    settings = make_settings()
    client = MeshClient(settings, client=rclient)
    first = push_raw(client, "executor", b"one")
    push_raw(client, "executor", b"two")
    behind, honest = skewed(settings, -SKEW_MS), MeshBroker(settings, middleware=[])
    try:
        assert len(behind.settle("fetch", "executor", 2)) == 4  # it holds both
        behind.do_ack("executor", first)
        behind.do_enqueue("planner", "m-1", b"{}")
        honest.settle("heartbeat", "executor")  # every worker's beat reaps the dead
    finally:
        behind.close()
        honest.close()

    assert stat(client, "recovered") == 0
    assert client.queues()["executor"] == {"ready": 0, "delayed": 0, "in_flight": 1}


def test_a_killed_worker_is_still_recovered_within_the_bound_by_a_host_16s_behind(
        make_settings, rclient, worker_process, start_worker):
    timeout_s = 3
    with RecordingServer(hold=True) as server:
        settings = make_settings(http_allow=server.host_port, http_timeout_s=60, heartbeat_timeout_s=timeout_s)
        client = MeshClient(settings, client=rclient)
        victim = worker_process("--agents", "executor", "--threads", "1", MESH_HTTP_ALLOW=server.host_port,
                                MESH_HTTP_TIMEOUT_S="60", MESH_HEARTBEAT_TIMEOUT_S=str(timeout_s))
        ref = client.send("executor", {"tool": "http_post", "args": {"url": server.url()}}, key="skew-dead")
        wait_for(lambda: len(server.requests) == 1, timeout_s=30)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()

        behind = skewed(settings, -SKEW_MS)
        try:
            def beat() -> int:
                behind.settle("heartbeat", "executor")
                return stat(client, "recovered")

            # The bound: the heartbeat timeout after the victim's last beat (plus pick-up slack).
            assert wait_for(beat, timeout_s=timeout_s + 3, interval_s=0.1) == 1
        finally:
            behind.close()
        assert client.queues()["executor"]["ready"] == 1

        server.release()
        start_worker(settings, ("executor",))
        record = client.wait(ref.id, timeout_s=30)

    # Recovered and run again: the victim's POST went out and its outcome was never written, and
    # http_post without verify_url has no check, so the step is unknown, the POST never made twice.
    assert record.state is State.UNKNOWN, record
    assert len(server.requests) == 1
