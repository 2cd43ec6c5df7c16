"""Effects proven, or ``unknown``: verifiers run by a real worker against real loopback servers."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from mesh import MeshClient
from mesh.broker import trace
from mesh.broker.ledger import Ledger, audit_records, unknown_count
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
def test_a_note_is_verified_by_reading_it_back(client, settings, start_worker):
    start_worker(settings, ("executor",))
    ref = client.send("executor", {"tool": "note", "args": {"title": "t", "body": "b"}})
    record = client.wait(ref.id, timeout_s=20)

    assert record.state is State.SUCCEEDED and record.steps["executor"].effect is Verdict.VERIFIED
    [entry] = ledger(client, ref.id, "executor").entries()
    assert entry.tool == "note" and entry.verdict is Verdict.VERIFIED and entry.args["title"] == "t"


@pytest.mark.slow
def test_a_post_without_verify_url_shows_unverified_not_proven(client, make_settings, start_worker, cli):
    with RecordingServer() as server:
        settings = make_settings(http_allow=server.host_port)
        start_worker(settings, ("executor",))
        ref = client.send("executor", {"tool": "http_post", "args": {"url": server.url()}})
        record = client.wait(ref.id, timeout_s=20)

    assert record.state is State.SUCCEEDED and record.steps["executor"].effect is Verdict.UNVERIFIED
    assert "succeeded (unverified)" in cli("status", ref.id, "--wide").stdout
    assert "http_post call #1: unverified" in cli("trace", ref.id).stdout
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


def unknown_job(mesh: MeshClient, server: RecordingServer, key: str) -> tuple[Any, str]:
    """Run ``posted`` with a verify URL its check cannot reach (allow-listed, nothing listening on
    port 1): its post step ends unknown."""
    verify_url = "http://127.0.0.1:1/orders/7"
    ref = mesh.run("posted", {"url": server.url("/orders"), "verify_url": verify_url}, key=key)
    record = mesh.wait(ref.id, timeout_s=30)
    assert record.steps["post"].state is State.UNKNOWN, record
    return ref, verify_url


@contextmanager
def settled_case(make_settings: Any, effects_worker: Any, rclient: Any, key: str
                 ) -> Iterator[tuple[RecordingServer, MeshClient, Any]]:
    """What each `mesh settle` test starts from: a server the step posts to, a worker, and the job ``key``
    whose post step ended unknown (:func:`unknown_job`); the server answers while the block runs."""
    with RecordingServer() as server:
        settings = make_settings(http_allow=f"{server.host_port},127.0.0.1:1")
        mesh = MeshClient(settings, client=rclient, app=app)
        effects_worker(settings)
        ref, _ = unknown_job(mesh, server, key)
        yield server, mesh, ref


@pytest.mark.slow
def test_mesh_settle_applied_moves_the_job_on_and_is_audited(make_settings, effects_worker, cli, rclient):
    with settled_case(make_settings, effects_worker, rclient, "settle-applied") as (server, mesh, ref):
        done = cli("settle", "settle-applied", "post", "--as", "applied", "--reason", "order 7 is in the orders db",
                   "--by", "ops@test", "--json")
        assert done.returncode == 0, done.stderr + done.stdout
        record = mesh.wait(ref.id, timeout_s=30)
        shown = cli("status", ref.id, "--wide")

    assert record.state is State.SUCCEEDED, record
    post = record.steps["post"]
    assert post.effect is Verdict.APPLIED and post.settlement is not None
    assert (post.settlement.by, post.settlement.reason, post.settlement.applied) == (
        "ops@test", "order 7 is in the orders db", True)
    assert record.steps["after"].state is State.SUCCEEDED
    assert len(server.requests) == 1  # settled applied: the call is answered from the ledger, not made again
    [entry] = ledger(mesh, ref.id, "post").entries()
    assert (entry.verdict, entry.by) == (Verdict.APPLIED, "ops@test")
    [audit] = [a for a in audit_records(rclient, mesh.keys, ref.id) if a["op"] == "settle"]
    assert (audit["by"], audit["verdict"], audit["reason"]) == ("ops@test", "applied", "order 7 is in the orders db")
    settled = [e for e in trace.read(rclient, mesh.keys, ref.id) if e["event"] == "settled"]
    assert settled and settled[0]["by"] == "ops@test"
    assert "succeeded (applied)" in shown.stdout and "settled applied by ops@test" in shown.stdout


@pytest.mark.slow
def test_mesh_settle_not_applied_dead_letters_the_step_and_its_dependent_never_runs(
        make_settings, effects_worker, cli, rclient):
    with settled_case(make_settings, effects_worker, rclient, "settle-not") as (_server, mesh, ref):
        done = cli("settle", ref.id[:10], "post", "--as", "not-applied", "--reason", "no order 7 upstream", "--json")
        assert done.returncode == 0, done.stderr + done.stdout

    record = mesh.status(ref.id)
    assert record.state is State.DEAD_LETTERED and record.failure_class == "permanent"
    post = record.steps["post"]
    assert post.state is State.DEAD_LETTERED and "settled not applied" in (post.error or "")
    assert post.settlement is not None and not post.settlement.applied and "@" in post.settlement.by
    assert record.steps["after"].sent_at is None and record.steps["after"].state is not State.SUCCEEDED
    assert unknown_count(rclient, mesh.keys) == 0
    again = cli("settle", ref.id, "post", "--as", "applied", "--reason", "x")
    assert again.returncode == 2 and "not unknown" in again.stderr


def test_mesh_verify_refuses_a_step_that_is_not_unknown(client, cli):
    ref = client.send("executor", {"tool": "note", "args": {"title": "t"}})
    result = cli("verify", ref.id, "executor")
    assert result.returncode == 2 and "not unknown" in result.stderr


@pytest.mark.slow
def test_mesh_settle_applied_with_its_dead_letter_gone_decides_nothing(make_settings, effects_worker, cli, rclient):
    # Deciding first and replaying after left the ledger settled and the step stuck unknown: a
    # second settle was refused ("no open effect"), and not-applied could no longer be said.
    with settled_case(make_settings, effects_worker, rclient, "settle-gone") as (_server, mesh, ref):
        purged = cli("dlq", "purge", "--all", "--yes")
        assert purged.returncode == 0, purged.stderr + purged.stdout
        refused = cli("settle", ref.id, "post", "--as", "applied", "--reason", "seen upstream")
        assert refused.returncode == 1 and "dead letter is gone" in refused.stderr, refused.stderr
        [entry] = ledger(mesh, ref.id, "post").entries()
        assert entry.open and entry.verdict is Verdict.UNKNOWN  # nothing was decided
        assert mesh.status(ref.id).steps["post"].settlement is None
        verify = cli("verify", ref.id, "post")
        assert verify.returncode == 1 and "dead letter is gone" in verify.stderr
        done = cli("settle", ref.id, "post", "--as", "not-applied", "--reason", "no order upstream")
        assert done.returncode == 0, done.stderr + done.stdout
    assert mesh.status(ref.id).steps["post"].state is State.DEAD_LETTERED


@pytest.mark.slow
def test_mesh_settle_prints_within_80_columns_the_verdict_on_a_line_of_its_own(
        make_settings, effects_worker, cli, rclient):
    with settled_case(make_settings, effects_worker, rclient, "settle-80") as (_server, _mesh, ref):
        done = cli("settle", "settle-80", "post", "--as", "not-applied", "--reason", "no order 7 upstream",
                   "--by", "ops@build-host", COLUMNS="80")

    assert done.returncode == 0, done.stderr + done.stdout
    lines = done.stdout.splitlines()
    assert max(map(len, lines)) <= 80, done.stdout
    assert lines[:2] == [f"step post of job {ref.id}:", "not_applied (by ops@build-host)"], lines


@pytest.mark.slow
def test_mesh_settle_prints_a_markup_like_reason_as_given(make_settings, effects_worker, cli, rclient):
    """An operator's reason is data: rich markup in it is neither parsed (``[/bold]`` alone would raise
    after the settling) nor applied."""
    reason = "x [/bold] [red]y[/red] [link=http://e]z[/link]"
    with settled_case(make_settings, effects_worker, rclient, "settle-markup") as (_server, mesh, ref):
        done = cli("settle", "settle-markup", "post", "--as", "not-applied", "--reason", reason)

    assert done.returncode == 0, done.stderr + done.stdout
    assert f": {reason}" in done.stdout, done.stdout
    assert mesh.status(ref.id).steps["post"].settlement.reason == reason
