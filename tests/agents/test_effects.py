"""Effects proven, or ``unknown``: verifiers run by a real worker against real loopback servers."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest

from mesh import MeshClient
from mesh.broker import trace
from mesh.broker.ledger import Ledger, unknown_count
from mesh.contracts import State
from mesh.contracts.effects import Verdict
from tests.apps.effects import app
from tests.httpserver import RecordingServer


def echo_key(_n: int, request: dict[str, Any]) -> tuple[int, Any]:
    """A verify endpoint that has the resource: it answers with the key it was asked about."""
    return 200, {"idempotency_key": request["headers"]["idempotency-key"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def effects_worker() -> Iterator[Any]:
    """An in-process worker serving tests.apps.effects; stopped at teardown."""
    from mesh.ops.worker import start_worker

    started = []

    def run(settings: Any) -> Any:
        worker = start_worker(settings, None, 4, app)
        started.append(worker)
        return worker

    yield run
    for worker in started:
        worker.stop(timeout=10_000)
        worker.broker.close()


def ledger(client: MeshClient, job_id: str, step_id: str) -> Ledger:
    return Ledger(client.redis, client.keys, job_id, step_id, 60)


@pytest.mark.slow
def test_a_post_its_verify_url_confirms_succeeds_verified(client, make_settings, start_worker):
    with RecordingServer(get=echo_key) as server:
        settings = make_settings(http_allow=server.host_port)
        start_worker(settings, ("executor",))
        ref = client.send("executor", {"tool": "http_post", "args": {
            "url": server.url("/orders"), "verify_url": server.url("/orders/7")}}, key="order-7")
        record = client.wait(ref.id, timeout_s=20)

    assert record.state is State.SUCCEEDED
    assert record.steps["executor"].effect is Verdict.VERIFIED
    assert len(server.requests) == 1 and server.gets[0]["headers"]["idempotency-key"] == "order-7"
    [entry] = ledger(client, ref.id, "executor").entries()
    assert entry.verdict is Verdict.VERIFIED and entry.outcome["detail"]["status"] == 200


@pytest.mark.slow
def test_a_post_without_verify_url_shows_unverified_not_proven(client, make_settings, start_worker):
    with RecordingServer() as server:
        settings = make_settings(http_allow=server.host_port)
        start_worker(settings, ("executor",))
        ref = client.send("executor", {"tool": "http_post", "args": {"url": server.url()}})
        record = client.wait(ref.id, timeout_s=20)

    assert record.state is State.SUCCEEDED and record.steps["executor"].effect is Verdict.UNVERIFIED
    events = [e for e in trace.read(client.redis, client.keys, ref.id) if e["event"] == "effect"]
    assert [e["verdict"] for e in events] == ["unverified"]


@pytest.mark.slow
def test_a_server_that_answers_200_and_records_nothing_is_refuted(client, make_settings, start_worker):
    # Every POST gets 200; the resource it claims to have made is nowhere (404 on the GET).
    with RecordingServer(get=lambda _n, _r: (404, {"error": "no such order"})) as server:
        settings = make_settings(http_allow=server.host_port, max_retries=3)
        start_worker(settings, ("executor",))
        ref = client.send("executor", {"tool": "http_post", "args": {
            "url": server.url("/orders"), "verify_url": server.url("/orders/7")}})
        record = client.wait(ref.id, timeout_s=20)

    assert record.state is State.DEAD_LETTERED and record.failure_class == "permanent"
    step = record.steps["executor"]
    assert step.state is State.DEAD_LETTERED and "refuted" in (step.error or "")
    assert len(server.requests) == 1  # refuted is a failure of the step, routed by its class: not retried
    [entry] = ledger(client, ref.id, "executor").entries()
    assert entry.verdict is Verdict.REFUTED


@pytest.mark.slow
def test_a_down_verifier_leaves_the_step_unknown_until_mesh_verify_moves_the_job_on(
        client, make_settings, effects_worker, cli, rclient):
    port = free_port()  # the verify endpoint: nothing listens there yet (connection refused)
    with RecordingServer() as server:
        allow = f"{server.host_port},127.0.0.1:{port}"
        settings = make_settings(http_allow=allow)
        mesh = MeshClient(settings, client=rclient, app=app)
        effects_worker(settings)
        ref = mesh.run("posted", {"url": server.url("/orders"), "verify_url": f"http://127.0.0.1:{port}/orders/7"},
                       key="verify-down")
        record = mesh.wait(ref.id, timeout_s=30)

        assert record.state is State.UNKNOWN
        assert record.steps["post"].state is State.UNKNOWN
        after = record.steps["after"]
        assert after.state is State.QUEUED and after.sent_at is None  # the dependent did not run
        assert unknown_count(rclient, mesh.keys) == 1
        assert len(server.requests) == 1

        # Still down: mesh verify cannot decide; nothing moves.
        still = cli("verify", ref.id[:12], "post", "--json", MESH_HTTP_ALLOW=allow)
        assert still.returncode == 1, still.stderr
        assert mesh.status(ref.id).state is State.UNKNOWN

        with RecordingServer(get=echo_key, port=port) as verifier:
            done = cli("verify", "verify-down", "post", "--json", MESH_HTTP_ALLOW=allow)
            assert done.returncode == 0, done.stderr + done.stdout
            record = mesh.wait(ref.id, timeout_s=30)
            assert verifier.gets

    assert record.state is State.SUCCEEDED, record
    assert record.steps["post"].effect is Verdict.VERIFIED
    assert record.steps["after"].state is State.SUCCEEDED
    assert len(server.requests) == 1  # verified, never posted again
    assert unknown_count(rclient, mesh.keys) == 0
