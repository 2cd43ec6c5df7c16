"""The mesh's guarantees hold for a user's own app: ``tests.apps.ticketing`` (two agents and a tool
with a secret, outside the mesh's packages), served by real ``mesh worker --app`` processes over
real Redis, its tool calling a real loopback tickets service."""

from __future__ import annotations

import json
import os
import secrets
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
from conftest import wait_for

from mesh.broker import JobRef, MeshClient, trace
from mesh.broker.breaker import Breakers
from mesh.broker.keys import Keys, prefix
from mesh.contracts import State
from mesh.dlq import DeadLetterStore
from mesh.dlq.audit import Audit
from tests.apps.ticketing import app
from tests.httpserver import RecordingServer

APP = "tests.apps.ticketing:app"
EMPTY = {"ready": 0, "delayed": 0, "in_flight": 0}


def send(client: MeshClient, agent: str, payload: dict[str, Any], key: str | None = None) -> JobRef:
    """A send by a client that knows the app: checked against the agent's model, stamped with its version."""
    return MeshClient(client.settings, client=client.redis, app=app).send(agent, payload, key=key)


def filing(url: str, n: int = 0) -> dict[str, Any]:
    ticket = {"customer": f"c-{n}", "text": f"refund for order {n}"}
    return {"url": url, "ticket": ticket, "triage": {"queue": "billing", "priority": 3, "summary": ticket["text"]}}


def filed(n: int, _request: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    return 200, {"id": f"T-{n}"}


def counters(client: MeshClient, key: str) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in client.redis.hgetall(key).items()}


def settled(client: MeshClient) -> bool:
    return client.queues(["triage", "filer"]) == {"triage": EMPTY, "filer": EMPTY}


@pytest.fixture
def token() -> str:
    """The tickets service's bearer token: random, so finding it anywhere is no coincidence."""
    return f"tk-{secrets.token_hex(16)}"


@pytest.fixture
def serve(worker_process: Callable[..., Any], token: str) -> Callable[..., Any]:
    """Start ``mesh worker --app tests.apps.ticketing:app`` with the token in its environment and
    the tickets service in MESH_HTTP_ALLOW (the tool reaches nothing else)."""

    def start(tickets: RecordingServer, threads: int = 2, **env: str) -> Any:
        return worker_process("--app", APP, "--threads", str(threads), TICKETS_TOKEN=token,
                              MESH_HTTP_ALLOW=tickets.host_port, **env)

    return start


@pytest.fixture
def mesh(settings: Any, rclient: redis.Redis) -> Iterator[MeshClient]:
    yield MeshClient(settings, client=rclient)


def test_50_sends_of_one_key_across_2_processes_file_one_ticket_after_triage(mesh, serve):
    def slow(n: int, request: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        time.sleep(0.3)  # the one filing is still in flight while the duplicates arrive
        return filed(n, request)

    with RecordingServer(slow) as tickets:
        for _ in range(2):
            serve(tickets, threads=4)
        # Both agents of the app are served: triage first, its output feeds the filer.
        triaged = mesh.wait(send(mesh, "triage", {"customer": "ada", "text": "Refund: charged twice"}).id,
                            timeout_s=30)
        assert triaged.state is State.SUCCEEDED
        triage = triaged.steps["triage"].result
        assert triage == {"queue": "billing", "priority": 3, "summary": "Refund: charged twice"}
        payload = {"url": tickets.url("/tickets"), "ticket": {"customer": "ada", "text": "Refund: charged twice"},
                   "triage": triage}
        barrier = threading.Barrier(50)

        def one(_: int) -> JobRef:
            barrier.wait()
            return send(mesh, "filer", payload, key="ticket-ada-1")

        with ThreadPoolExecutor(50) as pool:
            refs = list(pool.map(one, range(50)))
        records = [mesh.wait(ref.id, timeout_s=30) for ref in refs]
        wait_for(lambda: settled(mesh), timeout_s=30)

    assert len(tickets.requests) == 1
    assert {r["headers"]["idempotency-key"] for r in tickets.requests} == {"ticket-ada-1"}
    assert len({ref.id for ref in refs}) == 1
    assert {r.state for r in records} == {State.SUCCEEDED}
    assert records[0].steps["filer"].result == {"ticket_id": "T-1", "queue": "billing", "status": 200}
    assert records[0].steps["filer"].picked_up == 1
    assert counters(mesh, mesh.keys.stats).get("duplicates") == 49


def test_a_worker_sigkilled_mid_batch_files_no_ticket_twice_and_leaves_what_it_was_filing_unknown(
        make_settings, serve, rclient):
    """file_ticket has no verifier: a filing the victim was making when it died cannot be proven
    either way, so its step ends ``unknown``, never filed again; everything else is filed once."""
    threads, prefetch, heartbeat_s, n = 2, 4, 3, 40

    def slow(k: int, request: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        time.sleep(0.05)  # the service is slow, so the victim dies holding filings
        return filed(k, request)

    with RecordingServer(slow) as tickets:
        settings = make_settings(heartbeat_timeout_s=heartbeat_s)
        mesh = MeshClient(settings, client=rclient)
        env = {"MESH_HEARTBEAT_TIMEOUT_S": str(heartbeat_s), "MESH_PREFETCH": str(prefetch)}
        victim = serve(tickets, threads=threads, **env)
        serve(tickets, threads=threads, **env)
        keys = [f"batch-{i:02d}" for i in range(n)]
        refs = [send(mesh, "filer", filing(tickets.url(), i), key=key) for i, key in enumerate(keys)]
        wait_for(lambda: len(tickets.requests) >= 10, timeout_s=30)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        at_kill = len(tickets.requests)
        records = [mesh.wait(ref.id, timeout_s=heartbeat_s + 30) for ref in refs]
        wait_for(lambda: settled(mesh), timeout_s=30)

    assert at_kill < n, "the kill landed after the batch: nothing was tested"
    assert {r.state for r in records} <= {State.SUCCEEDED, State.UNKNOWN}
    per_key = Counter(r["headers"]["idempotency-key"] for r in tickets.requests)
    assert max(per_key.values()) == 1  # no ticket filed twice
    unknown = [r.key for r in records if r.state is State.UNKNOWN]
    # Only a filing running on one of the victim's threads can be unknown (a prefetched one had not begun).
    assert len(unknown) <= threads
    assert set(per_key) >= {r.key for r in records if r.state is State.SUCCEEDED}  # every succeeded one filed
    assert all(r.steps["filer"].effect == "unverified" for r in records if r.state is State.SUCCEEDED)
    print(f"SIGKILL after {at_kill} of {n} filings: {len(unknown)} unknown, none filed twice")


def test_a_429_from_the_tools_dependency_is_deferred_without_spending_a_retry(mesh, serve):
    def limited(n: int, request: dict[str, Any]) -> tuple[Any, ...]:
        return (429, {"error": "slow down"}, {"Retry-After": "1"}) if n == 1 else filed(n, request)

    with RecordingServer(limited) as tickets:
        # No retry budget at all: a spent retry would dead-letter the message.
        serve(tickets, MESH_MAX_RETRIES="0")
        ref = send(mesh, "filer", filing(tickets.url()), key="limited-1")
        record = mesh.wait(ref.id, timeout_s=30)

    assert record.state is State.SUCCEEDED
    assert [r["status"] for r in tickets.requests] == [429, 200]
    assert tickets.requests[1]["at"] - tickets.requests[0]["at"] >= 1.0  # Retry-After was honoured
    step = record.steps["filer"]
    assert step.attempt == 1 and step.error is None
    assert counters(mesh, mesh.keys.routes) == {"rate_limited:defer": 1}
    events = trace.read(mesh.redis, mesh.keys, ref.id)
    deferred = [e for e in events if e["event"] == "deferred"]
    assert [(e["failure_class"], e["route"], e["attempt"]) for e in deferred] == [("rate_limited", "defer", 1)]
    assert not any(e["event"] in ("failed", "dead_lettered") for e in events)
    assert DeadLetterStore(mesh.redis, mesh.keys).count() == 0


def test_a_503_storm_trips_the_tools_dependency_breaker_across_2_processes_and_all_20_finally_succeed(
        make_settings, serve, rclient):
    healthy = threading.Event()
    with RecordingServer(lambda n, r: filed(n, r) if healthy.is_set() else (503, {})) as tickets:
        threshold, retries = 3, 3
        limits = {"breaker_failures": threshold, "breaker_cooldown_s": 0.5, "breaker_max_cooldown_s": 2.0,
                  "max_retries": retries}
        settings = make_settings(**limits)
        mesh = MeshClient(settings, client=rclient)
        for _ in range(2):
            serve(tickets, threads=1, **{f"MESH_{k.upper()}": str(v) for k, v in limits.items()})
        refs = [send(mesh, "filer", filing(tickets.url(), i), key=f"storm-{i}") for i in range(20)]
        breakers = Breakers(settings, rclient)
        wait_for(lambda: [b.trips for b in breakers.list()] >= [2], timeout_s=30)
        healthy.set()
        records = [mesh.wait(ref.id, timeout_s=30) for ref in refs]

    assert {r.state for r in records} == {State.SUCCEEDED}
    [state] = breakers.list()  # one breaker: the tool's dependency, named by the host:port in its args
    assert state.name == tickets.host_port and state.state == "closed" and state.trips >= 2
    assert rclient.exists(f"{prefix(settings.namespace)}:breaker:{tickets.host_port}")
    failed = [r for r in tickets.requests if r["status"] == 503]
    ok = Counter(r["headers"]["idempotency-key"] for r in tickets.requests if r["status"] == 200)
    assert ok == Counter({f"storm-{i}": 1 for i in range(20)})
    # Without the breaker every message would have failed retries + 1 times. With it: the calls
    # before it opened (the threshold, plus the one the other process had in flight), then one
    # failed probe per re-trip.
    assert len(failed) <= threshold + 1 + (state.trips - 1) < 20 * (retries + 1)
    routes = counters(mesh, mesh.keys.routes)
    assert routes.get("brownout:defer", 0) >= 1 and not any(k.endswith("dead_letter") for k in routes)


def test_a_permanent_failure_is_dead_lettered_then_replayed_once_and_files_the_ticket(mesh, serve, cli):
    fixed = threading.Event()
    with RecordingServer(lambda n, r: filed(n, r) if fixed.is_set() else (400, {"error": "bad queue"})) as tickets:
        serve(tickets)
        ref = send(mesh, "filer", filing(tickets.url()), key="perm-1")
        record = mesh.wait(ref.id, timeout_s=30)
        assert record.state is State.DEAD_LETTERED and record.failure_class == "permanent"
        store = DeadLetterStore(mesh.redis, mesh.keys)
        [entry] = store.newest()
        assert (entry.agent, entry.failure_class, entry.key) == ("filer", "permanent", "perm-1")
        assert [a.outcome for a in entry.attempts] == ["dead_lettered"]  # called once: no retries

        fixed.set()
        res = cli("dlq", "replay", entry.entry_id, "--yes", "--json")
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["replayed"] == 1
        record = mesh.wait(ref.id, timeout_s=30)
        wait_for(lambda: settled(mesh), timeout_s=30)

    assert record.state is State.SUCCEEDED
    assert record.steps["filer"].result == {"ticket_id": "T-2", "queue": "billing", "status": 200}
    assert [(r["status"], r["headers"]["idempotency-key"]) for r in tickets.requests] == [(400, "perm-1"),
                                                                                          (200, "perm-1")]
    assert [r["op"] for r in Audit(mesh.redis, mesh.keys).records(limit=100)] == ["replay"]
    assert counters(mesh, mesh.keys.stats).get("replayed") == 1
    assert store.count() == 0


def namespace_values(client: redis.Redis, namespace: str) -> dict[str, bytes]:
    """Every key of ``namespace`` (its fleet-wide keys and every shard's) with everything it holds, read
    with its type's own command."""
    out = {}
    for key in (key for pattern in Keys(namespace).patterns for key in client.scan_iter(match=pattern, count=1000)):
        kind = client.type(key).decode()
        if kind == "string":
            parts: list[Any] = [client.get(key)]
        elif kind == "hash":
            parts = [x for kv in client.hgetall(key).items() for x in kv]
        elif kind == "list":
            parts = client.lrange(key, 0, -1)
        elif kind == "set":
            parts = list(client.smembers(key))
        elif kind == "zset":
            parts = [m for m, _ in client.zrange(key, 0, -1, withscores=True)]
        elif kind == "stream":
            parts = [x for _, fields in client.xrange(key) for kv in fields.items() for x in kv]
        else:
            raise AssertionError(f"{key!r} is a {kind}: read it too")
        out[key.decode()] = b"\n".join(p if isinstance(p, bytes) else str(p).encode() for p in parts if p is not None)
    return out


def test_the_token_a_failing_tool_sent_appears_nowhere_in_redis_the_dead_letter_the_trace_or_the_log(
        mesh, serve, token, namespace):
    def failing(n: int, request: dict[str, Any]) -> tuple[Any, ...]:
        echo = {"error": "rejected", "you_sent": request["headers"].get("authorization")}
        if n == 1:
            return 429, echo, {"Retry-After": "0"}
        return (503 if n == 2 else 400), echo

    with RecordingServer(failing) as tickets:
        worker = serve(tickets)
        ref = send(mesh, "filer", filing(tickets.url()), key="secret-1")
        record = mesh.wait(ref.id, timeout_s=30)
        wait_for(lambda: settled(mesh), timeout_s=30)

    # Not vacuous: the token did go out, on each of the three calls, and each failed.
    assert [(r["status"], r["headers"]["authorization"]) for r in tickets.requests] == [
        (429, f"Bearer {token}"), (503, f"Bearer {token}"), (400, f"Bearer {token}")]
    assert record.state is State.DEAD_LETTERED and record.failure_class == "permanent"
    secret = token.encode()

    values = namespace_values(mesh.redis, namespace)
    assert {k for k, v in values.items() if secret in v} == set()
    assert any(b"[secret]" in v for v in values.values())  # the errors said it, and were masked
    [breaker] = Breakers(mesh.settings, mesh.redis).list()  # the 503 was counted with its error
    assert breaker.last_error is not None and "[secret]" in breaker.last_error

    store = DeadLetterStore(mesh.redis, mesh.keys)
    [entry] = store.newest()
    assert [a.outcome for a in entry.attempts] == ["deferred", "retried", "dead_lettered"]
    assert token not in entry.model_dump_json() and secret not in (store.raw(entry.entry_id) or b"")
    assert "[secret]" in entry.error and "[secret]" in (entry.traceback or "")

    events = trace.read(mesh.redis, mesh.keys, ref.id)
    assert {"deferred", "failed", "dead_lettered", "tool_call"} <= {e["event"] for e in events}
    assert token not in json.dumps(events)

    log = worker.log_path.read_text()
    assert "filing failed" in log and "[secret]" in log  # the tool logged its headers, masked
    assert token not in log


@pytest.mark.slow
def test_a_users_tool_cannot_reach_a_host_missing_from_mesh_http_allow(mesh, worker_process, token):
    """``send_request`` in a user's tool obeys MESH_HTTP_ALLOW as ``http_post`` does: the filing is
    refused (permanent, dead-lettered, naming the setting) and the tickets service never hears of it."""
    with RecordingServer(filed) as tickets:
        worker_process("--app", APP, "--threads", "1", TICKETS_TOKEN=token, MESH_HTTP_ALLOW="127.0.0.1:1")
        record = mesh.wait(send(mesh, "filer", filing(tickets.url()), key="elsewhere-1").id, timeout_s=30)
    assert tickets.requests == []
    assert record.state is State.DEAD_LETTERED and record.failure_class == "permanent"
    assert "not in MESH_HTTP_ALLOW" in (record.error or "")
