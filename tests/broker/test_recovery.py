"""A worker killed with SIGKILL loses nothing: what it held goes back within the heartbeat bound."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

from conftest import heartbeats_since, stat, wait_for

from mesh.broker import MeshClient
from mesh.contracts import State
from tests.httpserver import RecordingServer

HEARTBEAT_TIMEOUT_S = 3


def slow(_n: int, _request: dict) -> tuple[int, dict]:
    time.sleep(1.0)  # the dependency is slow, so the worker is killed while holding requests
    return 200, {"ok": True}


def test_killed_workers_in_flight_messages_are_processed_by_the_survivor_within_the_heartbeat_bound(
    make_settings, worker_process, rclient
):
    def lookup(_n: int, request: dict) -> tuple[int, dict]:
        # The verifier's GET: the victim's calls in flight are settled by it, never posted blindly again.
        key = request["headers"]["idempotency-key"]
        seen = any(r["headers"]["idempotency-key"] == key for r in list(hook.requests))
        return (200, {"key": key}) if seen else (404, {})

    with RecordingServer(slow, get=lookup) as hook:
        settings = make_settings(http_allow=hook.host_port, heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S)
        client = MeshClient(settings, client=rclient)
        env = {"MESH_HTTP_ALLOW": hook.host_port, "MESH_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S)}
        victim = worker_process("--agents", "executor", "--threads", "2", **env)
        args = {"url": hook.url(), "verify_url": hook.url("/lookup")}
        refs = client.send_many("executor", [({"tool": "http_post", "args": args}, f"rec-{i}") for i in range(6)])
        wait_for(lambda: len(hook.requests) >= 2, timeout_s=20)
        held = client.queues()["executor"]["in_flight"]
        assert held >= 2
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        killed_at = time.monotonic()
        killed_ms = client.clock.now_s() * 1000

        worker_process("--agents", "executor", "--threads", "4", **env)
        # The survivor's start (a process importing the mesh: seconds on a loaded machine) is not recovery:
        # the bound below counts from its first heartbeat.
        wait_for(lambda: heartbeats_since(rclient, settings, killed_ms) >= 1, timeout_s=60)
        # Within the heartbeat bound (the lease defaults to it) plus a few seconds of pick-up and work.
        records = [client.wait(ref.id, timeout_s=HEARTBEAT_TIMEOUT_S + 10) for ref in refs]
        recovered_in = time.monotonic() - killed_at

        assert all(r.state is State.SUCCEEDED for r in records)
        assert stat(rclient, settings, "recovered") >= 1
        repeats = Counter(r["headers"]["idempotency-key"] for r in hook.requests)
        assert set(repeats) == {f"rec-{i}" for i in range(6)}
        # What the killed worker was posting was verified on recovery, never posted twice.
        assert sum(n - 1 for n in repeats.values()) == 0, repeats
        # The claims the victim died holding were taken over, each with a higher fencing token.
        assert stat(rclient, settings, "takeovers") >= 1
        for key, n in repeats.items():
            tokens = [int(r["headers"]["x-mesh-fencing-token"]) for r in hook.requests
                      if r["headers"]["idempotency-key"] == key]
            assert tokens == sorted(set(tokens)) and len(tokens) == n, (key, tokens)
        assert client.queues()["executor"] == {"ready": 0, "delayed": 0, "in_flight": 0}
        print(f"recovered and finished {len(refs)} jobs {recovered_in:.1f}s after SIGKILL (held {held})")
