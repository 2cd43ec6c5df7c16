"""Stuck steps: a handler that keeps its claim alive (the lease renewer heartbeats for it) but reports
no progress for MESH_STUCK_AFTER_S is reported stuck by `mesh status`, the trace and /metrics, and
stops being stuck once it moves on."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
from conftest import ops_server, stat, wait_for
from prometheus_client.parser import text_string_to_metric_families

from mesh.broker import MeshClient, claims, trace
from mesh.contracts import State
from tests.httpserver import RecordingServer

STUCK_AFTER_S = 1.0
#: The lease (= the heartbeat timeout) is renewed every third of it: the renewer looks every second.
HEARTBEAT_TIMEOUT_S = 3.0


def metrics(base: str) -> dict[str, float]:
    """The unlabelled samples of /metrics, by name."""
    response = httpx.get(f"{base}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    return {s.name: s.value for f in text_string_to_metric_families(response.text) for s in f.samples
            if not s.labels}


def metrics_until(base: str, condition: Callable[[dict[str, float]], bool], timeout_s: float = 15) -> dict[str, float]:
    found: list[dict[str, float]] = []

    def check() -> bool:
        found[:] = [metrics(base)]
        return condition(found[0])

    wait_for(check, timeout_s=timeout_s, interval_s=0.05)
    return found[0]


def call(url: str) -> dict[str, Any]:
    return {"tool": "http_post", "args": {"url": url, "json": {"slow": True}}}


def events_of(client: MeshClient, job_id: str, kind: str | None = None) -> list[dict[str, Any]]:
    return [e for e in trace.read(client.redis, client.keys_of(job_id), job_id) if kind is None or e["event"] == kind]


def test_a_handler_that_heartbeats_without_progress_is_reported_stuck_then_recovers_when_it_moves_on(
        make_settings, worker_process, rclient, cli):
    with RecordingServer(hold=True) as server:
        settings = make_settings(http_allow=server.host_port, stuck_after_s=STUCK_AFTER_S)
        client = MeshClient(settings, client=rclient)
        worker_process("--agents", "executor", "--threads", "1", MESH_HTTP_ALLOW=server.host_port,
                       MESH_STUCK_AFTER_S=str(STUCK_AFTER_S), MESH_HEARTBEAT_TIMEOUT_S=str(HEARTBEAT_TIMEOUT_S),
                       MESH_HTTP_TIMEOUT_S="30")
        env = {"MESH_STUCK_AFTER_S": str(STUCK_AFTER_S)}

        def status() -> dict[str, Any]:
            res = cli("status", ref.id, "--json", **env)
            assert res.returncode == 0, res.stderr
            data: dict[str, Any] = json.loads(res.stdout)
            return data

        with ops_server(client) as base:
            ref = client.send("executor", call(server.url()))
            wait_for(lambda: len(server.requests) == 1, timeout_s=30)  # the handler is in its call, held
            [picked_up] = events_of(client, ref.id, "picked_up")

            # The trace says so, once the lease renewer has seen a second without progress.
            [stuck] = wait_for(lambda: events_of(client, ref.id, "stuck"), timeout_s=10)
            assert stuck["idle_s"] >= STUCK_AFTER_S and stuck["progress"] == 0
            # Flagged at the first renewal (every HEARTBEAT_TIMEOUT_S / 3) after a second without progress;
            # idle is counted from the claim, a moment before the pick-up.
            assert STUCK_AFTER_S - 0.2 <= stuck["at"] - picked_up["at"] <= STUCK_AFTER_S + HEARTBEAT_TIMEOUT_S / 3 + 3
            assert (stuck["job_id"], stuck["key"], stuck["step_id"], stuck["agent"], stuck["attempt"]) == (
                ref.id, ref.key, "executor", "executor", 1)
            assert stuck["trace_id"] == ref.trace_id

            # `mesh status --json`: still running, but listed as stuck, with how long it has been idle.
            data = wait_for(lambda: (d := status())["stuck"] and d, timeout_s=10, interval_s=0.1)
            assert data["state"] == "running" and data["steps"]["executor"]["state"] == "running"
            assert list(data["stuck"]) == ["executor"] and data["stuck"]["executor"] >= STUCK_AFTER_S

            res = cli("status", ref.id, **env)
            assert res.returncode == 0, res.stderr
            assert "stuck" in res.stdout and "without progress" in " ".join(res.stdout.split())

            # /metrics: the gauge of steps stuck now and the counter of steps flagged.
            samples = metrics_until(base, lambda m: m.get("mesh_steps_stuck") == 1)
            assert samples["mesh_stuck_total"] == 1
            assert samples["mesh_steps_running"] == 1

            # Still stuck three seconds in (several renewals later), flagged only once.
            wait_for(lambda: status()["stuck"].get("executor", 0) >= 3, timeout_s=15, interval_s=0.2)
            assert len(events_of(client, ref.id, "stuck")) == 1
            assert metrics(base)["mesh_stuck_total"] == 1

            # It moves on: the call returns, the job succeeds and nothing is stuck any more.
            server.release()
            record = client.wait(ref.id, timeout_s=30)
            assert record.state is State.SUCCEEDED
            samples = metrics_until(base, lambda m: m.get("mesh_steps_running") == 0)
            assert samples["mesh_steps_stuck"] == 0
            assert samples["mesh_stuck_total"] == 1  # a counter: what happened stays counted
            data = status()
            assert data["state"] == "succeeded" and data["stuck"] == {}
            assert "stuck" not in cli("status", ref.id, **env).stdout
            kinds = [e["event"] for e in events_of(client, ref.id)]
            assert kinds == ["enqueued", "picked_up", "stuck", "tool_call", "progress", "effect", "succeeded"]
            assert len(server.requests) == 1


def test_a_step_holding_its_claim_for_less_than_the_threshold_is_not_flagged(make_settings, start_worker, rclient):
    """The same held call with MESH_STUCK_AFTER_S=5: lease renewals alone flag nothing before the threshold."""
    with RecordingServer(hold=True) as server:
        settings = make_settings(http_allow=server.host_port, stuck_after_s=5,
                                 heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S, http_timeout_s=30)
        client = MeshClient(settings, client=rclient)
        start_worker(settings, ("executor",), threads=1)
        ref = client.send("executor", call(server.url()))
        wait_for(lambda: len(server.requests) == 1, timeout_s=30)
        # Two lease renewals (each moves the claim's expiry) while the call is held.
        expiries: set[int] = set()

        def renewed_twice() -> bool:
            expiries.add(claims.read(rclient, client.keys_of(ref.id).claim(ref.key)).expires_ms)  # the job's shard
            return len(expiries) >= 3

        wait_for(renewed_twice, timeout_s=10)
        assert client.stuck(client.status(ref.id)) == {}
        server.release()
        assert client.wait(ref.id, timeout_s=30).state is State.SUCCEEDED
    assert events_of(client, ref.id, "stuck") == []
    assert stat(rclient, settings, "stuck") == 0


def test_the_stuck_event_names_the_worker_that_holds_the_claim(make_settings, start_worker, rclient):
    with RecordingServer(hold=True) as server:
        settings = make_settings(http_allow=server.host_port, stuck_after_s=STUCK_AFTER_S,
                                 heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S, http_timeout_s=30)
        client = MeshClient(settings, client=rclient)
        start_worker(settings, ("executor",), threads=1)
        ref = client.send("executor", call(server.url()))
        [stuck] = wait_for(lambda: events_of(client, ref.id, "stuck"), timeout_s=15)
        server.release()
        assert client.wait(ref.id, timeout_s=30).state is State.SUCCEEDED
    [picked_up] = events_of(client, ref.id, "picked_up")
    assert stuck["worker"] == picked_up["worker"]
