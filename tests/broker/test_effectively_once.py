"""Effectively-once effects over at-least-once delivery, with real worker processes, a real
loopback HTTP endpoint and real Redis: duplicates sent at once, and a worker killed mid-run."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter

from conftest import stat, wait_for

from mesh.broker import MeshClient
from mesh.contracts import State
from mesh.contracts.effects import Verdict
from tests.httpserver import RecordingServer

HEARTBEAT_TIMEOUT_S = 4


def test_same_key_sent_50_times_at_once_across_2_processes_posts_once_and_every_send_reports_it(
    make_settings, worker_process, rclient
):
    def slow(_n: int, _request: dict) -> tuple[int, dict]:
        time.sleep(0.5)  # the one POST is still in flight while the duplicates arrive
        return 200, {"order": "A-1"}

    with RecordingServer(slow) as hook:
        settings = make_settings(http_allow=hook.host_port)
        client = MeshClient(settings, client=rclient)
        for _ in range(2):
            worker_process("--agents", "executor", "--threads", "4", MESH_HTTP_ALLOW=hook.host_port)
        payload = {"tool": "http_post", "args": {"url": hook.url(), "json": {"order": "A-1"}}}
        barrier = threading.Barrier(50)
        refs = []

        def send() -> None:
            barrier.wait()
            refs.append(client.send("executor", payload, key="order-A-1"))

        threads = [threading.Thread(target=send) for _ in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        records = [client.wait(ref.id, timeout_s=30) for ref in refs]
        wait_for(lambda: client.queues()["executor"] == {"ready": 0, "delayed": 0, "in_flight": 0}, timeout_s=30)

    assert len(hook.requests) == 1
    assert hook.requests[0]["headers"]["idempotency-key"] == "order-A-1"
    assert hook.requests[0]["headers"]["x-mesh-fencing-token"] == "1"
    assert len({(ref.id, ref.trace_id) for ref in refs}) == 1
    assert {r.state for r in records} == {State.SUCCEEDED}
    assert len({str(r.result) for r in records}) == 1
    assert records[0].steps["executor"].picked_up == 1
    stats = {k.decode(): int(v) for k, v in rclient.hgetall(client.keys_of(refs[0].id).stats).items()}  # its shard's
    # Each of the 49 duplicate messages was acked as a duplicate exactly once, some after waiting.
    assert stats.get("duplicates") == 49
    print(f"50 sends of one key: 1 POST, {stats.get('deferred_in_flight', 0)} deferrals of in-flight duplicates")


def test_200_keys_with_a_worker_killed_and_restarted_post_each_effect_once_verified_on_recovery(
    make_settings, worker_process, rclient
):
    """The victim's calls in flight are settled by the verifier on recovery (a GET of the key at
    the endpoint), never posted blindly again: every key's effect arrives exactly once."""
    posted: set[str] = set()

    def steady(_n: int, request: dict) -> tuple[int, dict]:
        time.sleep(0.02)
        posted.add(request["headers"]["idempotency-key"])
        return 200, {"ok": True}

    def lookup(_n: int, request: dict) -> tuple[int, dict]:
        key = request["headers"]["idempotency-key"]
        return (200, {"key": key}) if key in posted else (404, {"error": "no such key"})

    with RecordingServer(steady, get=lookup) as hook:
        settings = make_settings(http_allow=hook.host_port, heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S)
        client = MeshClient(settings, client=rclient)
        env = {"MESH_HTTP_ALLOW": hook.host_port, "MESH_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S)}
        victim = worker_process("--agents", "executor", "--threads", "4", **env)
        worker_process("--agents", "executor", "--threads", "4", **env)
        keys = [f"pay-{i:03d}" for i in range(200)]
        args = {"url": hook.url(), "verify_url": hook.url("/lookup")}
        refs = client.send_many("executor", [({"tool": "http_post", "args": args}, k) for k in keys])
        wait_for(lambda: len(hook.requests) >= 60, timeout_s=30)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        posts_at_kill = len(hook.requests)
        worker_process("--agents", "executor", "--threads", "4", **env)  # the victim, restarted
        records = [client.wait(ref.id, timeout_s=HEARTBEAT_TIMEOUT_S + 60) for ref in refs]

    assert {r.state for r in records} == {State.SUCCEEDED}
    assert posts_at_kill < 200, "the kill landed after the run: nothing was tested"
    by_key = Counter(r["headers"]["idempotency-key"] for r in hook.requests)
    assert set(by_key) == set(keys)  # every key's effect arrived
    held = stat(rclient, client.settings, "recovered")
    repeats = sum(n - 1 for n in by_key.values())
    assert repeats == 0, {k: n for k, n in by_key.items() if n > 1}  # settled by the verifier, never re-posted
    assert {r.steps["executor"].effect for r in records} == {Verdict.VERIFIED}
    assert client.queues()["executor"] == {"ready": 0, "delayed": 0, "in_flight": 0}
    print(f"200 keys, SIGKILL after {posts_at_kill} POSTs: {held} held by the victim, {repeats} repeated POSTs, "
          f"{len(hook.gets)} verifying GETs")
