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
import threading
from typing import Any

import pytest
from conftest import sigstop, wait_for

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
    return [e for e in trace.read(client.redis, client.keys_of(job_id), job_id) if e["event"] == kind]


@pytest.mark.slow
def test_a_worker_paused_past_its_lease_sends_nothing_after_another_took_its_messages_over(
        make_settings, rclient, worker_process):
    with RecordingServer() as server:
        settings = make_settings(heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S)
        client = MeshClient(settings, client=rclient, app=app)
        ns = settings.namespace
        env = {"MESH_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S), "MESH_HTTP_ALLOW": server.host_port}
        # HANDLERS threads for each shard (MESH_SHARDS: a process's threads are divided among its shards),
        # so every handler runs at once whatever shards the jobs fall in.
        threads = str(HANDLERS * settings.shards)
        paused = worker_process("--app", APP, "--threads", threads, **env)
        refs = [client.send("poster", {"url": server.url(), "n": n}, key=f"paused-{n}") for n in range(HANDLERS)]
        wait_for(lambda: count(client, arrived_key(ns)) == HANDLERS, timeout_s=60)

        sigstop(paused.pid)  # stopped, every thread, before its handlers may pass the gate
        try:
            rclient.set(gate_key(ns), 1)
            worker_process("--app", APP, "--threads", threads, **env)
            records = [client.wait(ref.id, timeout_s=60) for ref in refs]
            assert [r.state for r in records] == [State.SUCCEEDED] * HANDLERS, [
                (r.state, trace.read(client.redis, client.keys_of(r.job_id), r.job_id)[-3:]) for r in records
                if r.state is not State.SUCCEEDED]
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
        assert len(fenced) == 1 and fenced[0]["token"] < calls[0]["token"], (
            [(e["event"], e.get("token"), e.get("worker"))
             for e in trace.read(client.redis, client.keys_of(ref.id), ref.id)],
            paused.log_path.read_text()[-3000:])
    assert sorted(e["token"] for ref in refs for e in events(client, ref.id, "tool_call")) == sent


class FencingEndpoint:
    """A loopback endpoint that does what docs/design/fencing.md asks: per key, it refuses a token
    lower than the highest it accepted (409) and applies a key once. Its first request is held
    before it is decided (a request in flight while its sender is paused) until ``release``."""

    def __init__(self) -> None:
        self.highest: dict[str, int] = {}
        self.applied: list[int] = []
        self.answered: list[tuple[int, int]] = []  # (token, status) in the order decided
        self.first_arrived = threading.Event()
        self.release = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, n: int, request: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if n == 1:
            self.first_arrived.set()
            self.release.wait(120)
        key, token = request["headers"]["idempotency-key"], int(request["headers"]["x-mesh-fencing-token"])
        with self.lock:
            status = 409 if token < self.highest.get(key, 0) else 200
            if status == 200:
                self.highest[key] = token
                if len(self.applied) == 0:
                    self.applied.append(token)
            self.answered.append((token, status))
        return status, {"token": token}

    def lookup(self, _n: int, request: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """GET: whether the key's effect was applied (what the tool's verifier asks)."""
        with self.lock:
            applied = request["headers"]["idempotency-key"] in self.highest
        return (200, {"applied": True}) if applied else (404, {"applied": False})


@pytest.mark.slow
def test_a_request_sent_before_a_pause_and_decided_after_the_takeover_is_refused_by_its_token(
        make_settings, rclient, worker_process):
    """The window no worker-side check closes: the paused owner passed its check and its request is
    on its way when it stops. The endpoint refuses the older token, and the refused attempt is
    settled as superseded: no dead letter, the job keeps the new owner's outcome. The new owner
    finds the paused owner's intent in the ledger and asks the verifier first: the held request is
    not applied yet (404), so the call never arrived as far as anyone can tell and is made now."""
    endpoint = FencingEndpoint()
    with RecordingServer(endpoint, get=endpoint.lookup) as server:
        settings = make_settings(heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S)
        client = MeshClient(settings, client=rclient, app=app)
        ns = settings.namespace
        env = {"MESH_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S), "MESH_HTTP_ALLOW": server.host_port}
        rclient.set(gate_key(ns), 1)
        paused = worker_process("--app", APP, "--threads", "1", **env)
        ref = client.send("poster", {"url": server.url(), "n": 1, "verify_url": server.url("/applied")},
                          key="in-flight")
        assert endpoint.first_arrived.wait(60)

        sigstop(paused.pid)  # stopped, every thread, before the new owner starts: its heartbeat goes stale
        try:
            worker_process("--app", APP, **env)
            record = client.wait(ref.id, timeout_s=60)
            endpoint.release.set()  # now the endpoint decides the paused owner's request
            wait_for(lambda: len(endpoint.answered) == 2, timeout_s=30)
        finally:
            os.kill(paused.pid, signal.SIGCONT)
        log = paused.log_path  # type: ignore[attr-defined]
        wait_for(lambda: "attempt superseded" in log.read_text(), timeout_s=60)

    stale, newer = sorted(token for token, _ in endpoint.answered)
    assert endpoint.answered == [(newer, 200), (stale, 409)]
    assert endpoint.applied == [newer]
    assert record.state is State.SUCCEEDED
    assert client.redis.hget(client.keys_of(ref.id).stats, "dead_lettered") is None
    assert [e["token"] for e in events(client, ref.id, "tool_call")] == [newer, stale]
