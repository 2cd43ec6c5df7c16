"""A worker killed with SIGKILL loses nothing: what it held goes back within the heartbeat bound."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

from conftest import wait_for

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
    with RecordingServer(slow) as hook:
        settings = make_settings(http_allow=hook.host_port, heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S)
        client = MeshClient(settings, client=rclient)
        env = {"MESH_HTTP_ALLOW": hook.host_port, "MESH_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S)}
        victim = worker_process("--agents", "executor", "--threads", "2", **env)
        refs = client.send_many("executor", [({"tool": "http_post", "args": {"url": hook.url()}},
                                              f"rec-{i}") for i in range(6)])
        wait_for(lambda: len(hook.requests) >= 2, timeout_s=20)
        held = client.queues()["executor"]["in_flight"]
        assert held >= 2
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        killed_at = time.monotonic()

        worker_process("--agents", "executor", "--threads", "4", **env)
        # Within the heartbeat bound (the lease defaults to it) plus a few seconds of pick-up and work.
        records = [client.wait(ref.id, timeout_s=HEARTBEAT_TIMEOUT_S + 10) for ref in refs]
        recovered_in = time.monotonic() - killed_at

        assert all(r.state is State.SUCCEEDED for r in records)
        assert int(rclient.hget(client.keys.stats, "recovered") or 0) >= 1
        repeats = Counter(r["headers"]["idempotency-key"] for r in hook.requests)
        assert set(repeats) == {f"rec-{i}" for i in range(6)}
        # Only messages the killed worker held can have been posted twice, each with its own key.
        assert sum(n - 1 for n in repeats.values()) <= held
        # The claims the victim died holding were taken over, each with a higher fencing token.
        assert int(rclient.hget(client.keys.stats, "takeovers") or 0) >= 1
        for key, n in repeats.items():
            tokens = [int(r["headers"]["x-mesh-fencing-token"]) for r in hook.requests
                      if r["headers"]["idempotency-key"] == key]
            assert tokens == sorted(set(tokens)) and len(tokens) == n, (key, tokens)
        assert client.queues()["executor"] == {"ready": 0, "delayed": 0, "in_flight": 0}
        print(f"recovered and finished {len(refs)} jobs {recovered_in:.1f}s after SIGKILL (held {held})")
