"""A worker paused past its lease applies no effect once it wakes: another worker took its keys
over and finished them, and the paused one's calls are refused before they go out (each tool
call confirms the claim in Redis first; see mesh.broker.fence).

Real processes: a ``mesh worker`` whose 12 handlers wait right before their ``ctx.call`` is
SIGSTOPped past the heartbeat timeout, a second worker takes the 12 messages over and finishes
them, then the first gets SIGCONT. The loopback endpoint must see 12 requests, all from the new
owners."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest
from conftest import wait_for

from mesh.broker import MeshClient, trace
from mesh.contracts import State
from tests.apps.gated import app, arrived_key, gate_key, passed_key
from tests.httpserver import RecordingServer

APP = "tests.apps.gated:app"
HANDLERS = 12
#: Short, so the takeover comes soon; the lease is as long by default.
HEARTBEAT_TIMEOUT_S = 3


def count(client: MeshClient, key: str) -> int:
    return int(client.redis.get(key) or 0)


def events(client: MeshClient, job_id: str, kind: str) -> list[dict[str, Any]]:
    return [e for e in trace.read(client.redis, client.keys, job_id) if e["event"] == kind]


@pytest.mark.slow
def test_a_worker_paused_past_its_lease_sends_nothing_after_another_took_its_messages_over(
        make_settings, rclient, worker_process):
    with RecordingServer() as server:
        settings = make_settings(heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S)
        client = MeshClient(settings, client=rclient, app=app)
        ns = settings.namespace
        env = {"MESH_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S)}
        paused = worker_process("--app", APP, "--threads", str(HANDLERS), **env)
        refs = [client.send("poster", {"url": server.url(), "n": n}, key=f"paused-{n}") for n in range(HANDLERS)]
        wait_for(lambda: count(client, arrived_key(ns)) == HANDLERS, timeout_s=60)

        os.kill(paused.pid, signal.SIGSTOP)
        try:
            rclient.set(gate_key(ns), 1)
            worker_process("--app", APP, "--threads", str(HANDLERS), **env)
            records = [client.wait(ref.id, timeout_s=60) for ref in refs]
            assert [r.state for r in records] == [State.SUCCEEDED] * HANDLERS
            assert len(server.requests) == HANDLERS
        finally:
            os.kill(paused.pid, signal.SIGCONT)
        # Every paused handler woke and reached its call (it counts itself out whatever the call did).
        wait_for(lambda: count(client, passed_key(ns)) == 2 * HANDLERS, timeout_s=60)
        requests = list(server.requests)

    sent = sorted(int(r["headers"]["x-mesh-fencing-token"]) for r in requests)
    assert len(requests) == HANDLERS, f"the paused owner sent {len(requests) - HANDLERS} stale request(s): {sent}"
    for ref in refs:
        calls = events(client, ref.id, "tool_call")
        fenced = events(client, ref.id, "fenced")
        picked = events(client, ref.id, "picked_up")
        # The trace names the token behind each call: the one the endpoint saw, the new owner's.
        assert len(calls) == 1 and calls[0]["token"] == max(e["token"] for e in picked)
        # The paused owner's call was refused, under its own (older) token.
        assert len(fenced) == 1 and fenced[0]["token"] < calls[0]["token"]
    assert sorted(e["token"] for ref in refs for e in events(client, ref.id, "tool_call")) == sent
