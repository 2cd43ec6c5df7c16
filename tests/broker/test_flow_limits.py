"""Fleet-wide flow limits with real worker processes against a loopback server that really enforces
its own limits: the fleet learns a dependency's real rate from its 429s, concurrency holds across
processes, a SIGKILLed worker's slot comes back, and waiting for a limit spends no retry budget."""

from __future__ import annotations

import collections
import math
import os
import signal
import threading
import time
from typing import Any

import pytest
from conftest import wait_for
from httpserver import RecordingServer

from mesh.broker import MeshClient
from mesh.broker.limits import limit_states
from mesh.broker.settings import MeshSettings
from mesh.contracts import State

pytestmark = pytest.mark.slow

APP = "tests.apps.limited:app"


class SlidingWindow:
    """Answers at most ``rate`` requests in any second; beyond, 429 with Retry-After and the
    ``x-ratelimit-*`` headers a model API sends."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.accepted: collections.deque[float] = collections.deque()
        self.lock = threading.Lock()

    def __call__(self, n: int, request: dict[str, Any]) -> tuple[Any, ...]:
        with self.lock:
            now = request["at"]
            while self.accepted and self.accepted[0] <= now - 1.0:
                self.accepted.popleft()
            if len(self.accepted) >= self.rate:
                reset_ms = max(1, int((self.accepted[0] + 1.0 - now) * 1000))
                return 429, {"error": "rate limited"}, {
                    "Retry-After": str(math.ceil(reset_ms / 1000)), "x-ratelimit-limit-requests": str(self.rate),
                    "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": f"{reset_ms}ms"}
            self.accepted.append(now)
            return 200, {"ok": True}, {"x-ratelimit-remaining-requests": str(self.rate - len(self.accepted))}


def limited_client(settings: MeshSettings, client: MeshClient) -> MeshClient:
    from tests.apps.limited import app

    return MeshClient(settings, client=client.redis, app=app)


def succeeded(client: MeshClient, refs: list[Any]) -> bool:
    return all(client.status(r.id).state is State.SUCCEEDED for r in refs)


def test_three_workers_converge_on_the_dependencys_real_rate(settings: MeshSettings, client: MeshClient,
                                                             worker_process: Any) -> None:
    """Declared 100/s, really 50/s: after the first 10 s under 5 % of calls are answered 429, the
    accepted rate stays within 50/s (every second of it), and every job succeeds without a retry."""
    window = SlidingWindow(50)
    jobs = 800
    with RecordingServer(window) as server:
        env = {"LIMITED_HOST": server.host_port, "LIMITED_RATE": "100/s", "MESH_HTTP_ALLOW": server.host_port}
        for _ in range(3):
            worker_process("--app", APP, "--agents", "caller", "--threads", "4", **env)
        sender = limited_client(settings, client)
        refs = sender.send_many("caller", [({"n": i}, f"hit-{i}") for i in range(jobs)])
        wait_for(lambda: succeeded(client, refs), timeout_s=120, interval_s=0.5)
        seen = list(server.requests)
    start = min(r["at"] for r in seen)
    later = [r for r in seen if r["at"] >= start + 10]
    rejected = [r for r in later if r["status"] == 429]
    accepted = [r["at"] for r in seen if r["status"] == 200]
    assert len(accepted) == jobs  # each job's call went through exactly once
    assert later and len(rejected) < 0.05 * len(later), (len(rejected), len(later))
    busiest = max(sum(1 for t in accepted if a <= t < a + 1.0) for a in accepted)
    assert busiest <= 50
    assert any(r["status"] == 429 for r in seen)  # the fleet learned the real rate from 429s
    (state,) = limit_states(client.redis, client.keys, [f"dependency:{server.host_port}"])
    assert state.factor < 1 and state.rejected >= 1
