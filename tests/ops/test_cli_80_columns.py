"""Human output fits an 80-column terminal: the fixed layout of each command (headers, labels, the
prose around values) with ordinary values (a job id, a 32-hex trace id, a key such as ``order-7``, a
worker ``host:12345``) ends within 80 columns, wrapping onto a further line rather than running past
it, and every value stays whole (its --json is unchanged)."""

from __future__ import annotations

import json
from typing import Any

from mesh.broker import MeshClient

#: A worker's label as a worker makes it: host, pid and a random part.
WORKER = "build-7.example.internal:20395:eef4256d"
#: Why an operator cancelled: longer than a line, so it wraps.
REASON = "the customer called back: wrong delivery address, and the order must not be charged twice"


def fits_80(res: Any) -> list[str]:
    """The command's lines, checked to end within 80 columns."""
    assert res.returncode == 0, res.stderr
    lines: list[str] = res.stdout.splitlines()
    assert lines and max(map(len, lines)) <= 80, "\n" + res.stdout
    return lines


def note(client: MeshClient, key: str) -> Any:
    return client.send("executor", {"tool": "note", "args": {"title": key}}, key=key)


def test_trace_header_puts_the_trace_id_on_a_line_of_its_own_at_80_columns(cli, client: MeshClient) -> None:
    ref = note(client, "order-7")  # queued: no worker runs it, its trace has its enqueued event
    lines = fits_80(cli("trace", "order-7", COLUMNS="80"))
    assert lines[:2] == [f"job {ref.id} queued", f"trace {ref.trace_id}"], lines
    assert any("enqueued" in line for line in lines[2:]), lines
    # wide enough, one line as before
    assert cli("trace", "order-7", COLUMNS="120").stdout.startswith(f"job {ref.id} queued  trace {ref.trace_id}\n")
    assert json.loads(cli("trace", "order-7", "--json").stdout)["trace_id"] == ref.trace_id


def head(res: Any) -> list[str]:
    """A trace's header: its lines before the tree (whose event lines stay whole, however long)."""
    assert res.returncode == 0, res.stderr
    lines: list[str] = res.stdout.splitlines()
    top = next(i for i, line in enumerate(lines) if line.startswith(("├── ", "└── ")))
    assert top and max(map(len, lines[:top])) <= 80, "\n" + res.stdout
    return lines[:top]


def test_trace_header_wraps_a_long_cancel_reason_between_words(cli, client: MeshClient) -> None:
    ref = note(client, "order-8")
    assert cli("cancel", "order-8", "--reason", REASON).returncode == 0
    lines = head(cli("trace", "order-8", COLUMNS="80"))
    assert lines[:2] == [f"job {ref.id} cancelled", f"trace {ref.trace_id}"], lines
    assert " ".join(" ".join(lines[2:]).split()) == f"(cancelled: {REASON})", lines
    short = note(client, "order-9")
    assert cli("cancel", "order-9", "--reason", "wrong address").returncode == 0
    assert head(cli("trace", "order-9", COLUMNS="80")) == [
        f"job {short.id} cancelled", f"trace {short.trace_id}  (cancelled: wrong address)"]


def test_approve_puts_who_decided_on_a_second_line_at_80_columns(cli, settings, rclient) -> None:
    from mesh.agents.pipelines import Pipeline
    from tests.pipelines.agents import app

    mesh = MeshClient(settings, client=rclient, app=app)
    spec = Pipeline("release").step("researcher", approval={"timeout": "24h"}).build()
    ref = mesh.run(spec, {"goal": "ship change 4411"}, key="release-4411")  # its root step parks at once
    lines = fits_80(cli("approve", "release-4411", "researcher", "--by", "ana@build-host", COLUMNS="80"))
    assert lines == [f"approved: step researcher of {ref.id}", "  by ana@build-host; step queued, job queued"]
    other = mesh.run(spec, {"goal": "ship change 4412"}, key="release-4412")
    wide = cli("deny", "release-4412", "researcher", "--reason", "too late", "--by", "bo", COLUMNS="120")
    assert wide.stdout.splitlines() == [f"denied: step researcher of {other.id} by bo; step halted, job halted"]


def test_cancel_of_a_cancelled_job_says_why_on_a_line_of_its_own_at_80_columns(cli, client: MeshClient) -> None:
    ref = note(client, "order-10")
    assert cli("cancel", "order-10", "--reason", "wrong dates").returncode == 0
    again = fits_80(cli("cancel", "order-10", COLUMNS="80"))
    assert again == [f"job {ref.id} is cancelled: nothing to cancel", "(cancelled: wrong dates)"], again
    wide = cli("cancel", "order-10", COLUMNS="120").stdout.splitlines()
    assert wide == [f"job {ref.id} is cancelled (cancelled: wrong dates): nothing to cancel"], wide


def test_status_of_a_sentinel_deployment_wraps_its_redis_line_under_its_label(cli, client, monkeypatch) -> None:
    from mesh.broker import connection

    sentinels = ["10.0.0.11:26379", "10.0.0.12:26379", "10.0.0.13:26379"]
    monkeypatch.setattr(connection, "describe", lambda settings, redis: {
        "sentinel": "mymaster", "sentinels": sentinels, "db": 0, "tls": True, "address": "10.0.0.21:6379",
        "role": "master"})
    lines = fits_80(cli("status", COLUMNS="80"))
    top = next(i for i, line in enumerate(lines) if line.startswith("namespace:"))
    assert lines[0].startswith("redis:     10.0.0.21:6379 db 0, master, TLS") and top > 1, lines
    assert all(line.startswith(" " * 11) and line[11] != " " for line in lines[1:top]), lines
    assert " ".join(" ".join(lines[:top]).split()) == (
        "redis: 10.0.0.21:6379 db 0, master, TLS, Sentinel service mymaster via " + ", ".join(sentinels))


def test_dlq_show_puts_an_attempts_error_on_a_line_of_its_own_at_80_columns(cli, client: MeshClient) -> None:
    import time

    from dramatiq.message import Message

    from mesh.broker import job_id_for
    from mesh.broker.outbox import encode
    from mesh.dlq import DeadLetter, DeadLetterStore
    from mesh.dlq.entry import Attempt

    at, error = time.time(), "127.0.0.1:9 refused: not in MESH_HTTP_ALLOW"
    envelope: dict[str, Any] = {
        "key": "order-7", "job_id": job_id_for("order-7"), "step_id": "executor", "agent": "executor",
        "trace_id": "0" * 32, "deadline": at + 600, "hops": [], "attempt": 1, "schema_version": 1,
        "replay_of": None, "payload": {"tool": "note", "args": {"title": "order-7"}}}
    entry = DeadLetter(entry_id="ffff0000-3333-4222-8333-000000000003", queue="executor", agent="executor",
                       failure_class="permanent", error=error, envelope=envelope, key="order-7",
                       job_id=envelope["job_id"], trace_id=envelope["trace_id"], worker="host:12345",
                       attempts=(Attempt(attempt=1, outcome="retried", failure_class="timeout", error="timed out",
                                         at=at - 5, worker=WORKER),
                                 Attempt(attempt=2, outcome="dead_lettered", failure_class="permanent", error=error,
                                         at=at, worker="host:12345")), dead_lettered_at=at)
    raw = encode(Message(queue_name="executor", actor_name="executor", args=(envelope,), kwargs={}, options={},
                         message_id=entry.entry_id))
    assert DeadLetterStore(client.redis, client.keys_of(envelope["job_id"])).put(entry, raw)

    lines = fits_80(cli("dlq", "show", entry.entry_id, COLUMNS="80"))
    i = next(i for i, line in enumerate(lines) if line.startswith("  attempt 1: "))
    assert lines[i + 1:i + 2] == [f"    on {WORKER}: timed out"], lines  # a worker label as workers make them
    i = next(i for i, line in enumerate(lines) if line.startswith("  attempt 2: "))
    assert lines[i].endswith(" on host:12345:") and lines[i + 1] == f"    {error}", lines
    wide = cli("dlq", "show", entry.entry_id, COLUMNS="200").stdout
    assert f" on host:12345: {error}\n" in wide


def test_console_bench_fits_80_columns(cli) -> None:
    res = cli("ops", "console-bench", "--jobs", "20", "--dead-letters", "20", COLUMNS="80")
    lines = fits_80(res)
    assert lines[-2:] == ["median of 5 fetches per page on loopback;",
                          "commands counted on the server's own Redis connections"], lines


def test_dlq_replay_summary_puts_as_many_classes_as_fit_on_a_line(cli, client: MeshClient) -> None:
    from tests.ops.test_cli_tables import put

    for n, failure_class in enumerate(("invalid_input", "rate_limited", "mesh_unavailable")):
        put(client, f"ffff0000-4444-4222-8333-00000000000{n}", f"order-{n}", failure_class, "boom")
    lines = fits_80(cli("dlq", "replay", "--all", "--dry-run", COLUMNS="80"))
    assert " ".join(lines) == ("would replay 3 dead letter(s); 1 of class invalid_input; 1 of class mesh_unavailable; "
                               "1 of class rate_limited"), lines
    assert len(lines) == 2 and lines[0].endswith(";"), lines


def test_trace_puts_a_steps_offset_on_a_line_of_its_own_when_its_label_would_run_past_80_columns(
        cli, settings, rclient) -> None:
    from mesh.agents.pipelines import Pipeline
    from tests.pipelines.agents import app

    mesh = MeshClient(settings, client=rclient, app=app)
    spec = Pipeline("release").step("release_approval", agent="researcher", approval={"timeout": "24h"}).build()
    mesh.run(spec, {"goal": "ship change 4411"}, key="release-4413")  # its root step parks at once
    lines = cli("trace", "release-4413", COLUMNS="80").stdout.splitlines()
    step = next(i for i, line in enumerate(lines) if "── release_approval " in line)
    assert lines[step] == "└── release_approval researcher awaiting_approval", lines
    assert lines[step + 1].startswith("    │   +0.000s, ") and lines[step + 1].endswith(" from first to last event")
    assert "awaiting_approval" in lines[step + 2], lines  # its events after
    wide = cli("trace", "release-4413", COLUMNS="120").stdout
    assert "└── release_approval researcher awaiting_approval  +0.000s, " in wide, wide


def test_status_of_a_pipeline_puts_the_facts_that_do_not_fit_under_the_step(cli, settings, rclient) -> None:
    import time

    from mesh.agents.pipelines import Pipeline
    from mesh.contracts import JobRecord, State
    from mesh.contracts.effects import Verdict
    from tests.pipelines.agents import app

    mesh = MeshClient(settings, client=rclient, app=app)
    spec = Pipeline("release").step("release_review", agent="researcher", approval={"timeout": "24h"}).build()
    ref = mesh.run(spec, {"goal": "ship change 4411"}, key="release-4414")
    now = time.time()

    def ran(record: JobRecord) -> Any:  # as a worker leaves it: a third attempt, its tokens, a verified effect
        step = record.steps["release_review"].model_copy(update={
            "state": State.SUCCEEDED, "attempt": 3, "started_at": now - 12.5, "finished_at": now,
            "tokens_in": 12345, "tokens_out": 6789, "effect": Verdict.VERIFIED})
        return record.model_copy(update={"state": State.SUCCEEDED, "steps": {"release_review": step}}), []

    mesh.jobs.update(ref.id, ran)
    lines = fits_80(cli("status", "release-4414", COLUMNS="80"))
    step = next(i for i, line in enumerate(lines) if line.startswith("release_review  succeeded (verified)"))
    facts = " ".join(" ".join(lines[step:step + 2]).split())
    assert facts == "release_review succeeded (verified) agent researcher attempt 3 12.50s tokens 12345/6789", lines
    wide = cli("status", "release-4414", COLUMNS="120").stdout
    assert "release_review  succeeded (verified)  agent researcher  attempt 3  12.50s  tokens 12345/6789\n" in wide


def test_status_of_a_job_wraps_its_goal_and_error_between_words_at_80_columns(cli, client: MeshClient) -> None:
    goal = ("find every order placed last week whose delivery address changed after it was paid, and tell "
            "their customers when the parcel will arrive")
    submitted = cli("submit", goal, "--key", "order-10")
    assert submitted.returncode == 0, submitted.stderr
    assert cli("cancel", "order-10", "--reason", REASON).returncode == 0
    lines = fits_80(cli("status", "order-10", COLUMNS="80"))

    def paragraph(label: str) -> str:  # the line that starts with label, and those indented under it
        at = next(i for i, line in enumerate(lines) if line.startswith(label))
        end = next((j for j in range(at + 1, len(lines)) if not lines[j].startswith(" ")), len(lines))
        return " ".join(" ".join(lines[at:end]).split())

    assert paragraph("goal: ") == f"goal: {goal}", lines
    assert paragraph("error: ") == f"error: cancelled: {REASON}", lines
    assert paragraph("cancelled: ") == f"cancelled: {REASON}", lines  # why the job undoes its effects
    # wide enough, one line each as before
    wide = cli("status", "order-10", COLUMNS="400").stdout.splitlines()
    assert f"goal: {goal}" in wide, wide
