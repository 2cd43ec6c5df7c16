"""Questions an operator asks the CLI at 3 a.m., answered by the real ``mesh`` command over the real
Redis: which jobs there are (``mesh jobs``, ``mesh status`` by key), which workers are alive (``mesh
workers``), which dead letters a given failure caused (``--grep``, ``--key``, ``--dependency``), why a
breaker is open and who waits on it (``mesh breakers``), and what a dependency said in its 4xx."""

from __future__ import annotations

import json
import re
import secrets
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from conftest import flat, wait_for

from mesh.broker import MeshClient, redact
from mesh.broker.breaker import Breakers
from mesh.broker.classify import BODY_SNIPPET_CHARS, error_for_response
from mesh.broker.joblist import JobQuery, list_jobs
from mesh.broker.jobs import fail_step
from mesh.contracts import PermanentFailure, State
from mesh.dlq import DeadLetterStore, Filter
from tests.dlq.bulk import generate, nth_id
from tests.httpserver import RecordingServer


def run_json(cli: Any, *args: str) -> Any:
    res = cli(*args, "--json")
    assert res.returncode == 0, (args, res.stdout, res.stderr)
    return json.loads(res.stdout)


def call(url: str, n: int = 0) -> dict[str, Any]:
    return {"tool": "http_post", "args": {"url": url, "json": {"n": n}}}


# -- mesh jobs, mesh status by key -----------------------------------------------------------------

def test_mesh_jobs_lists_newest_first_and_filters_by_state_agent_since_key_and_limit(cli, client):
    planned = [client.submit(f"goal {i}", key=f"order-{i}") for i in range(3)]
    executed = [client.send("executor", call("http://127.0.0.1:9/x", i), key=f"refund-{i}") for i in range(2)]
    # One job ends dead-lettered (as a failed step ends it); one is made older than an hour in the index.
    [step_id] = client.status(executed[0].id).steps
    client.jobs.update(executed[0].id, fail_step(step_id, State.DEAD_LETTERED, "boom", "permanent"))
    client.redis.zadd(client.keys.jobs, {planned[0].id: time.time() - 7200}, xx=True)

    everything = run_json(cli, "jobs")
    newest_first = [r.id for r in [*reversed(executed), *reversed(planned[1:]), planned[0]]]
    assert [j["job_id"] for j in everything] == newest_first
    assert {j["state"] for j in everything} == {"queued", "dead_lettered"}
    assert [j["job_id"] for j in run_json(cli, "jobs", "--state", "dead_lettered")] == [executed[0].id]
    assert [j["job_id"] for j in run_json(cli, "jobs", "--agent", "executor")] == [r.id for r in reversed(executed)]
    assert [j["job_id"] for j in run_json(cli, "jobs", "--key", "order-*", "--since", "1h")] == [
        planned[2].id, planned[1].id]
    assert [j["key"] for j in run_json(cli, "jobs", "--limit", "2")] == ["refund-1", "refund-0"]
    assert run_json(cli, "jobs", "--agent", "executor", "--state", "succeeded") == []

    table = cli("jobs", "--state", "dead_lettered", COLUMNS="200")
    assert table.returncode == 0 and executed[0].id in table.stdout and "refund-0" in table.stdout
    bad = cli("jobs", "--state", "done")
    assert bad.returncode == 2 and "unknown state 'done'" in flat(bad.stderr)


@pytest.mark.parametrize("state", ["not_run", "skipped"])
def test_mesh_jobs_refuses_a_state_only_steps_take_instead_of_finding_nothing_for_ever(cli, state):
    refused = cli("jobs", "--state", state)
    assert refused.returncode == 2, refused.stdout
    assert f"{state} is a step's state, never a job's" in flat(refused.stderr)
    assert "--state halted" in flat(refused.stderr)


def test_mesh_jobs_reads_at_most_its_budget_of_records_and_says_so(client):
    refs = [client.send("executor", call("http://127.0.0.1:9/x", i), key=f"k-{i}") for i in range(12)]

    page = list_jobs(client.redis, client.keys, JobQuery(state=State.SUCCEEDED), budget=5, batch=2)
    assert (page.jobs, page.read, page.cut_by_budget) == ([], 5, True)
    page = list_jobs(client.redis, client.keys, JobQuery(key="k-1*", limit=2), budget=5, batch=2)
    assert [r.job_id for r in page.jobs] == [refs[11].id, refs[10].id] and not page.cut_by_budget
    page = list_jobs(client.redis, client.keys, JobQuery(state=State.SUCCEEDED), budget=100, batch=5)
    assert (page.read, page.cut_by_budget) == (12, False)


def test_mesh_status_takes_a_job_id_or_the_key_it_was_sent_with(cli, client):
    ref = client.submit("find the order", key="order-77")

    by_key, by_id = run_json(cli, "status", "order-77"), run_json(cli, "status", ref.id)
    assert by_key["job_id"] == by_id["job_id"] == ref.id
    missing = cli("status", "order-78")
    assert missing.returncode == 2 and "no job order-78 (nor a job of key 'order-78')" in flat(missing.stderr)


def test_mesh_trace_takes_the_key_a_job_was_sent_with_as_mesh_status_does(cli, client):
    ref = client.submit("find the order", key="order-77")

    by_key, by_id = run_json(cli, "trace", "order-77"), run_json(cli, "trace", ref.id)
    assert by_key["job_id"] == by_id["job_id"] == ref.id and by_key["events"]
    missing = cli("trace", "order-78")
    assert missing.returncode == 2 and "no job order-78 (nor a job of key 'order-78')" in flat(missing.stderr)


# -- mesh workers ----------------------------------------------------------------------------------

def test_mesh_workers_shows_a_live_worker_with_what_it_serves_and_since_when_then_not_after_sigterm(
        cli, client, worker_process):
    assert "no workers" in cli("workers").stdout
    started = time.time()
    proc = worker_process("--agents", "executor,researcher")

    def listed() -> list[dict[str, Any]]:
        return [w for w in run_json(cli, "workers") if w["label"].split(":")[1] == str(proc.pid)]

    [worker] = wait_for(listed, timeout_s=30)
    assert worker["alive"] is True and worker["agents"] == ["executor", "researcher"]
    assert worker["app"] and started - 5 <= worker["since"] <= time.time() + 5
    assert worker["heartbeat_age_s"] is not None and worker["heartbeat_age_s"] < 15
    table = flat(cli("workers", COLUMNS="200").stdout)
    assert worker["label"] in table and "alive" in table and "executor, researcher" in table

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert listed() == []  # a graceful stop unpublishes the worker


# -- dlq filters ------------------------------------------------------------------------------------

def dead_letters(client: MeshClient, n: int) -> dict[str, list[str]]:
    """``n`` replayable entries: even ones failed at a.test:443 with a 400, odd ones at b.test:443
    with a 503; keys order-0000000... Returns the entry ids by dependency."""
    generate(client.redis, client.keys, n, time.time() - 600)
    by_dep: dict[str, list[str]] = {"a.test:443": [], "b.test:443": []}
    pipe = client.redis.pipeline(transaction=False)
    for i in range(n):
        eid = nth_id(i)
        entry = orjson.loads(client.redis.hget(client.keys.dead_letter(eid), "entry"))  # type: ignore[arg-type]
        dep = "a.test:443" if i % 2 == 0 else "b.test:443"
        entry["dependency"] = dep
        entry["error"] = (f"{dep} answered 400: Field 'Amount' must be positive (order {i})" if i % 2 == 0
                          else f"{dep} answered 503: upstream down")
        pipe.hset(client.keys.dead_letter(eid), "entry", orjson.dumps(entry))
        by_dep[dep].append(eid)
    pipe.execute()
    return by_dep


def test_dlq_list_filters_by_error_text_key_glob_and_dependency(cli, client):
    by_dep = dead_letters(client, 10)

    def ids(*args: str) -> set[str]:
        return {e["entry_id"] for e in run_json(cli, "dlq", "list", *args)}

    assert ids("--dependency", "a.test:443") == set(by_dep["a.test:443"])
    assert ids("--grep", "'AMOUNT' MUST") == set(by_dep["a.test:443"])  # any case
    assert ids("--key", "order-000000[0-3]") == {nth_id(i) for i in range(4)}
    assert ids("--dependency", "b.test:443", "--key", "order-000000[0-3]") == {nth_id(1), nth_id(3)}
    assert ids("--grep", "no such text") == set()
    table = cli("dlq", "list", "--grep", "upstream down")
    assert table.returncode == 0 and "503" in table.stdout


def test_dlq_replay_purge_and_drain_take_only_the_filtered_entries_and_their_counts_add_up(cli, client, tmp_path):
    by_dep = dead_letters(client, 20)
    store = DeadLetterStore(client.redis, client.keys)

    dry = run_json(cli, "dlq", "replay", "--dependency", "a.test:443", "--dry-run")
    assert dry["replayed"] == 10 and dry["skipped"] == {}
    done = run_json(cli, "dlq", "replay", "--grep", "must be positive", "--key", "order-000000*", "--yes")
    replayed = {nth_id(i) for i in range(0, 10, 2)}
    assert set(done["ids"]) == replayed and done["replayed"] + len(done["skipped"]) == 5
    assert store.count() == 15 and sum(q["ready"] for q in client.queues().values()) == 5

    purged = run_json(cli, "dlq", "purge", "--dependency", "a.test:443", "--yes")
    assert purged == {"purged": 5}  # the other half of a.test's; b.test's are untouched
    out = tmp_path / "b.jsonl"
    drained = run_json(cli, "dlq", "drain", "--to", str(out), "--grep", "UPSTREAM", "--key", "order-000001*",
                       "--yes")
    expected = {nth_id(i) for i in range(11, 20, 2)}
    assert drained["drained"] == 5
    assert {json.loads(line)["entry"]["entry_id"] for line in Path(out).read_text().splitlines()} == expected
    left = {e.entry_id for e in store.entries(Filter(), limit=100)}
    assert left == set(by_dep["b.test:443"]) - expected and store.count() == 5


def test_a_dead_letter_keeps_the_dependency_its_4xx_came_from_and_the_body_it_answered(
        cli, client, make_settings, start_worker):
    body = {"error": "field 'amount' must be positive", "echo": "x" * 500}
    with RecordingServer(lambda n, _: (400, body)) as server:
        settings = make_settings(http_allow=server.host_port)
        ref = client.send("executor", call(server.url()), key="refund-9")
        start_worker(settings, ("executor",))
        assert client.wait(ref.id, timeout_s=20).state is State.DEAD_LETTERED

    [entry] = run_json(cli, "dlq", "list", "--dependency", server.host_port)
    assert entry["dependency"] == server.host_port and entry["key"] == "refund-9"
    assert f"{server.host_port} answered 400: " in entry["error"]
    assert "must be positive" in entry["error"] and "x" * 300 not in entry["error"]
    assert run_json(cli, "dlq", "list", "--dependency", "127.0.0.1:1") == []


# -- a 4xx's body -------------------------------------------------------------------------------------

def test_a_4xx_error_keeps_a_bounded_snippet_of_the_body_with_secrets_masked():
    secret = f"s3cret-{secrets.token_hex(8)}"
    redact.register(secret)  # as a tool's read of it does
    text = f'{{"error":   "bad token\n\n   {secret}",  "echo": "{"y" * 1000}"}}'
    request = httpx.Request("POST", "http://tickets.test/x")
    exc = error_for_response(httpx.Response(400, text=text, request=request), dependency="tickets.test:80")

    assert isinstance(exc, PermanentFailure)
    assert str(exc).startswith('tickets.test:80 answered 400: {"error": "bad token [secret]", "echo": "yyy')
    assert secret not in str(exc) and str(exc).endswith("…")
    assert len(str(exc)) == len("tickets.test:80 answered 400: ") + BODY_SNIPPET_CHARS
    empty = error_for_response(httpx.Response(404, request=request), dependency="tickets.test:80")
    assert str(empty) == "tickets.test:80 answered 404"


# -- mesh breakers ------------------------------------------------------------------------------------

def test_mesh_breakers_shows_what_opened_an_open_breaker_when_it_reopens_and_who_waits_on_it(
        cli, client, make_settings, start_worker):
    threshold = 2
    with RecordingServer(lambda n, _: (503, {"error": f"overloaded {n}"})) as server:
        settings = make_settings(http_allow=server.host_port, breaker_failures=threshold, breaker_cooldown_s=120,
                                 max_retries=5)
        for i in range(4):
            client.send("executor", call(server.url(), i), key=f"storm-{i}")
        start_worker(settings, ("executor",), threads=1)
        breakers = Breakers(settings, client.redis)
        wait_for(lambda: [(b.state, b.deferred >= 2) for b in breakers.list()] == [("open", True)], timeout_s=30)

    [b] = run_json(cli, "breakers")
    assert (b["name"], b["state"], b["failures"], b["opened_failures"]) == (server.host_port, "open", 0, threshold)
    errors = [f["error"] for f in b["opened_by"]]  # newest first
    assert len(errors) == threshold and all(e.startswith(f"{server.host_port} answered 503: ") for e in errors)
    assert [e.split("overloaded ")[1][0] for e in errors] == [str(n) for n in range(threshold, 0, -1)]
    assert 60 < b["reopen_in_s"] <= 120 and b["deferred"] >= 2
    text = flat(cli("breakers").stdout)
    assert f"{server.host_port} open: opened" in text and f"by {threshold} failure(s)" in text
    # The worker keeps deferring the storm's messages on the open breaker between the two reads.
    deferred = re.search(r"(\d+) message\(s\) deferred on it", text)
    assert "reopens" in text and deferred is not None and int(deferred.group(1)) >= b["deferred"]
    assert "overloaded 1" in text
