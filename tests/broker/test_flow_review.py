"""Flow limits under hostile conditions, with real worker processes: how soon a concurrency waiter
takes a slot that frees long before slots usually do."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from conftest import sigstop, wait_for
from httpserver import RecordingServer

from mesh.broker import MeshClient, trace
from mesh.broker.settings import MeshSettings
from mesh.contracts import State

pytestmark = pytest.mark.slow

APP = "tests.apps.limited:app"


class Gated:
    """The slow path: a request whose ``n`` has a gate waits until the test opens it; records when
    each request arrived and when it was answered."""

    def __init__(self, gated: set[int]) -> None:
        self.gates = {n: threading.Event() for n in gated}
        self.arrived: dict[int, float] = {}
        self.answered: dict[int, float] = {}

    def __call__(self, _i: int, request: dict[str, Any]) -> tuple[Any, ...]:
        n = int((request["json"] or {}).get("n", -1))
        self.arrived[n] = time.monotonic()
        gate = self.gates.get(n)
        if gate is not None:
            gate.wait(120)
        self.answered[n] = time.monotonic()
        return 200, {"ok": True}


def limited_client(settings: MeshSettings, client: MeshClient) -> MeshClient:
    from tests.apps.limited import app

    return MeshClient(settings, client=client.redis, app=app)


def deferred(client: MeshClient, job_id: str) -> bool:
    return any(e["event"] == "deferred" for e in trace.read(client.redis, client.keys, job_id))


def test_a_concurrency_waiter_takes_a_slot_soon_after_it_frees(settings: MeshSettings, client: MeshClient,
                                                              worker_process: Any) -> None:
    """``max: 1``, a slot usually held 8 s: a waiter deferred behind a step that ends after 1 s starts
    well before slots usually turn over (7 s after it freed, before the fix; about 0.5 s since: the
    bound leaves a loaded machine room without letting the old behaviour pass)."""
    service = Gated({0, 1})
    with RecordingServer(service) as server:
        env = {"LIMITED_HOST": server.host_port, "SLOW_MAX": "1", "MESH_HTTP_ALLOW": server.host_port}
        worker_process("--app", APP, "--agents", "slow", "--threads", "2", **env)
        sender = limited_client(settings, client)
        first = sender.send("slow", {"n": 0, "tenant": "k"}, key="long-0")
        wait_for(lambda: 0 in service.arrived, timeout_s=30)
        time.sleep(8)  # the slot's usual hold: what the limit learns from this step
        service.gates[0].set()
        wait_for(lambda: client.status(first.id).state is State.SUCCEEDED, timeout_s=30, interval_s=0.05)
        second = sender.send("slow", {"n": 1, "tenant": "k"}, key="short-1")
        wait_for(lambda: 1 in service.arrived, timeout_s=30)
        third = sender.send("slow", {"n": 2, "tenant": "k"}, key="waits-2")
        wait_for(lambda: deferred(client, third.id), timeout_s=30, interval_s=0.05)
        time.sleep(1)
        service.gates[1].set()
        wait_for(lambda: client.status(second.id).state is State.SUCCEEDED, timeout_s=30, interval_s=0.05)
        freed = time.monotonic()
        wait_for(lambda: 2 in service.arrived, timeout_s=60, interval_s=0.05)
    idle = service.arrived[2] - freed
    print(f"the slot sat idle {idle:.2f} s before the waiter took it")
    assert idle < 4.0, idle




def test_a_stopped_worker_woken_after_its_slot_lapsed_holds_it_again(settings: MeshSettings, client: MeshClient,
                                                                    worker_process: Any) -> None:
    """``max: 1``: a worker SIGSTOPped mid-step loses its slot when the lease runs out and another
    worker's message takes it. Woken, its step goes on (nothing can stop it), so its slot is counted
    again (2 of 1 in use): no further message is admitted until the count is back under the max,
    rather than a third running beside the two while ``mesh limits`` shows 1 of 1."""
    import os
    import signal

    from mesh.broker.limits import limit_states

    service = Gated({0, 1})
    with RecordingServer(service) as server:
        env = {"LIMITED_HOST": server.host_port, "SLOW_MAX": "1", "MESH_HTTP_ALLOW": server.host_port,
               "MESH_LEASE_S": "3"}
        victim = worker_process("--app", APP, "--agents", "slow", "--threads", "2", **env)
        sender = limited_client(settings, client)
        first = sender.send("slow", {"n": 0, "tenant": "k"}, key="stopped-0")
        wait_for(lambda: 0 in service.arrived, timeout_s=30)
        worker_process("--app", APP, "--agents", "slow", "--threads", "2", **env)

        def in_use() -> int:
            (state,) = limit_states(client.redis, client.keys, ["agent:slow"])
            return state.in_flight

        sigstop(victim.pid)  # stopped, every thread, before the second message is sent
        try:
            second = sender.send("slow", {"n": 1, "tenant": "k"}, key="stopped-1")
            wait_for(lambda: 1 in service.arrived, timeout_s=60, interval_s=0.1)  # the lapsed slot, taken
        finally:
            os.kill(victim.pid, signal.SIGCONT)
        wait_for(lambda: in_use() == 2, timeout_s=20, interval_s=0.1)  # the woken step's slot, counted again
        third = sender.send("slow", {"n": 2, "tenant": "k"}, key="stopped-2")
        wait_for(lambda: deferred(client, third.id), timeout_s=30, interval_s=0.05)
        service.gates[1].set()
        wait_for(lambda: client.status(second.id).state is State.SUCCEEDED, timeout_s=30, interval_s=0.05)
        assert 2 not in service.arrived  # one step (the woken one) still runs: the third waits
        service.gates[0].set()
        wait_for(lambda: client.status(third.id).state is State.SUCCEEDED, timeout_s=60, interval_s=0.1)
        assert client.status(first.id).state is State.SUCCEEDED
    assert service.arrived[2] >= service.answered[0]
