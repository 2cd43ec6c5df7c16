"""Routing by class end to end: a real loopback server injects 429s, 503 storms, slowness and
400s into real workers over real Redis, and each failure takes its route."""

from __future__ import annotations

import email.utils
import threading
import time
from typing import Any

from conftest import wait_for

from mesh.broker import MeshClient
from mesh.broker.breaker import Breakers
from mesh.contracts import State
from mesh.dlq import DeadLetterStore
from tests.httpserver import RecordingServer


def call(url: str, n: int = 0) -> dict[str, Any]:
    return {"tool": "http_post", "args": {"url": url, "json": {"n": n}}}


def counters(client: MeshClient, key: str) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in client.redis.hgetall(key).items()}


def test_429_with_retry_after_2_waits_2s_then_succeeds_with_no_retry_budget(client, make_settings, start_worker):
    with RecordingServer(lambda n, _: (429, {}, {"Retry-After": "2"}) if n == 1 else (200, {"ok": 1})) as server:
        settings = make_settings(http_allow=server.host_port, max_retries=0)
        ref = client.send("executor", call(server.url()))
        start_worker(settings, ("executor",))
        record = client.wait(ref.id, timeout_s=20)

    assert record.state is State.SUCCEEDED
    assert [r["status"] for r in server.requests] == [429, 200]
    assert server.requests[1]["at"] - server.requests[0]["at"] >= 2.0
    step = record.steps["executor"]
    assert step.attempt == 1 and step.error is None  # a deferral is not a retry, and its error is scrubbed
    assert counters(client, client.keys.stats)["deferred"] == 1
    assert counters(client, client.keys.routes) == {"rate_limited:defer": 1}


def test_429_with_an_http_date_retry_after_waits_until_that_date(client, make_settings, start_worker):
    def respond(n: int, _: dict) -> tuple:
        if n == 1:
            return 429, {}, {"Retry-After": email.utils.formatdate(time.time() + 3, usegmt=True)}
        return 200, {"ok": 1}

    with RecordingServer(respond) as server:
        settings = make_settings(http_allow=server.host_port, max_retries=0)
        ref = client.send("executor", call(server.url()))
        start_worker(settings, ("executor",))
        record = client.wait(ref.id, timeout_s=20)

    assert record.state is State.SUCCEEDED
    # The date has whole seconds: three seconds ahead, truncated, is more than two away.
    assert server.requests[1]["at"] - server.requests[0]["at"] >= 2.0


def test_429_without_retry_after_backs_off_and_succeeds_without_spending_retries(
        client, make_settings, start_worker):
    with RecordingServer(lambda n, _: (429, {}) if n <= 3 else (200, {"ok": 1})) as server:
        settings = make_settings(http_allow=server.host_port, max_retries=0)
        ref = client.send("executor", call(server.url()))
        start_worker(settings, ("executor",))
        record = client.wait(ref.id, timeout_s=20)

    assert record.state is State.SUCCEEDED
    assert [r["status"] for r in server.requests] == [429, 429, 429, 200]
    assert counters(client, client.keys.routes) == {"rate_limited:defer": 3}


def test_503_storm_across_2_processes_trips_one_breaker_probes_once_per_window_and_all_20_succeed(
        make_settings, worker_process, rclient):
    healthy = threading.Event()
    with RecordingServer(lambda n, _: (200, {"ok": 1}) if healthy.is_set() else (503, {})) as server:
        threshold, cooldown_s = 3, 0.5
        limits = {"breaker_failures": threshold, "breaker_cooldown_s": cooldown_s, "breaker_max_cooldown_s": 2.0}
        settings = make_settings(http_allow=server.host_port, **limits)
        client = MeshClient(settings, client=rclient)
        env = {"MESH_HTTP_ALLOW": server.host_port, **{f"MESH_{k.upper()}": str(v) for k, v in limits.items()}}
        for _ in range(2):
            worker_process("--agents", "executor", "--threads", "1", **env)
        refs = client.send_many("executor", [(call(server.url(), i), f"storm-{i}") for i in range(20)])
        breakers = Breakers(settings, rclient)
        # Open, a failed probe, open again, another failed probe, open a third time: then recover.
        wait_for(lambda: [b.trips for b in breakers.list()] >= [3], timeout_s=30)
        healthy.set()
        records = [client.wait(ref.id, timeout_s=30) for ref in refs]

    assert {r.state for r in records} == {State.SUCCEEDED}
    failed = [r for r in server.requests if r["status"] == 503]
    succeeded = [r for r in server.requests if r["status"] == 200]
    assert len(succeeded) == 20  # each message's effect once
    # Before the breaker opened, at most the threshold plus the one call the other process had in
    # flight; after it, one probe per half-open window, and the windows are a cool-down apart.
    before_open = failed[: len(failed) - 2]
    probes = failed[len(before_open):]
    assert threshold <= len(before_open) <= threshold + 1
    assert all(b["at"] - a["at"] >= cooldown_s * 0.9 for a, b in zip(
        [before_open[-1], *probes], probes, strict=False))
    assert len(server.requests) <= threshold + 1 + len(probes) + 1 + 20
    [state] = breakers.list()
    assert state.state == "closed" and state.trips == 3
    routes = counters(client, client.keys.routes)
    assert routes.get("brownout:defer", 0) >= 1 and not any(k.endswith("dead_letter") for k in routes)


def test_slow_endpoint_past_the_http_timeout_gets_one_call_per_message_then_the_timeout_dlq(
        client, make_settings, start_worker):
    with RecordingServer(hold=True) as server:
        settings = make_settings(http_allow=server.host_port, http_timeout_s=0.3, max_retries=3)
        refs = [client.send("executor", call(server.url(), i)) for i in range(3)]
        start_worker(settings, ("executor",))
        records = [client.wait(ref.id, timeout_s=20) for ref in refs]
        assert len(server.requests) == 3

    # The request may have been applied: the job is `unknown`, never shown as success or retried.
    assert {r.state for r in records} == {State.UNKNOWN}
    assert {r.failure_class for r in records} == {"timeout"}
    store = DeadLetterStore(client.redis, client.keys)
    assert store.count() == 3
    assert counters(client, client.keys.routes) == {"timeout:dead_letter": 3}


def test_400_is_called_once_and_dead_lettered_as_permanent(client, make_settings, start_worker):
    with RecordingServer(lambda n, _: (400, {"error": "bad field"})) as server:
        settings = make_settings(http_allow=server.host_port, max_retries=3)
        ref = client.send("executor", call(server.url()))
        start_worker(settings, ("executor",))
        record = client.wait(ref.id, timeout_s=20)

    assert len(server.requests) == 1
    assert record.state is State.DEAD_LETTERED and record.failure_class == "permanent"
    assert counters(client, client.keys.routes) == {"permanent:dead_letter": 1}


def test_a_call_is_cut_to_what_is_left_of_the_deadline_not_the_configured_timeout(
        make_settings, start_worker, rclient):
    with RecordingServer(hold=True) as server:
        settings = make_settings(http_allow=server.host_port, http_timeout_s=60, job_deadline_s=2)
        client = MeshClient(settings, client=rclient)
        ref = client.send("executor", call(server.url()))
        start_worker(settings, ("executor",))
        record = client.wait(ref.id, timeout_s=20)
        assert len(server.requests) == 1

    assert record.state is State.UNKNOWN and record.failure_class == "timeout"
    cut = float(record.steps["executor"].error.split("timed out after ")[1].split("s")[0])
    assert 0 < cut < 2
