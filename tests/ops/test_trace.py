"""``mesh trace JOB_ID``: a job's timeline, end to end. Real workers over real Redis write the events;
the CLI, a real subprocess, reads them back as JSON and as a tree."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from typing import Any

from mesh.broker import MeshClient
from mesh.contracts import State
from tests.httpserver import RecordingServer

GOAL = "Find out how retries work and how dead letters are replayed, then write a note"
#: What every event says about the message it concerns (broker/trace.py).
IDS = ("trace_id", "job_id", "key", "step_id", "agent", "attempt", "worker", "at")
#: Events that happen inside an attempt, so name the worker that ran it.
IN_ATTEMPT = {"picked_up", "progress", "tool_call", "deferred", "failed", "dead_lettered", "succeeded"}


def call(url: str) -> dict[str, Any]:
    return {"tool": "http_post", "args": {"url": url, "json": {"n": 1}}}


def trace_json(cli, job_id: str) -> dict[str, Any]:
    res = cli("trace", job_id, "--json")
    assert res.returncode == 0, res.stderr
    data: dict[str, Any] = json.loads(res.stdout)
    return data


def kinds(events: list[dict[str, Any]]) -> list[str]:
    return [e["event"] for e in events]


def check_ids(data: dict[str, Any], ref: Any, keys: dict[str, str], agents: dict[str, str]) -> None:
    """Every event names the job's trace, the job, its step's key and agent, the attempt and the worker."""
    for ev in data["events"]:
        missing = [f for f in IDS if f not in ev]
        assert not missing, f"{ev} lacks {missing}"
        assert ev["trace_id"] == ref.trace_id, ev
        assert ev["job_id"] == ref.id, ev
        assert ev["key"] == keys[ev["step_id"]], ev
        assert ev["agent"] == agents[ev["step_id"]], ev
        if ev["event"] == "joined":  # a for_each step's join: about the step, not an attempt of it
            continue
        assert isinstance(ev["attempt"], int) and ev["attempt"] >= 1, ev
        if ev["event"] in IN_ATTEMPT:
            assert ev["worker"], ev


def check_order(data: dict[str, Any]) -> None:
    """Per step, the stream's order is the time order, and ``steps`` groups exactly the events."""
    per_step: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for ev in data["events"]:
        per_step[ev["step_id"]].append(ev)
    assert data["steps"] == per_step
    for step_id, evs in per_step.items():
        ats = [e["at"] for e in evs]
        assert ats == sorted(ats), f"{step_id}: events out of time order: {kinds(evs)} {ats}"


def test_trace_json_of_a_submitted_goal_shows_every_step_enqueued_picked_up_progress_succeeded_in_order(
        client, settings, start_worker, cli):
    start_worker(settings)
    ref = client.submit(GOAL)
    record = client.wait(ref.id, timeout_s=30)
    assert record.state is State.SUCCEEDED

    data = trace_json(cli, ref.id)
    assert (data["job_id"], data["state"], data["trace_id"]) == (ref.id, "succeeded", ref.trace_id)
    steps = data["steps"]
    # The flow is the pipeline builtin.yaml: the steps that ran are the plan and the for_each items;
    # the for_each steps' own records (researcher, executor) have one event each, their join.
    ran = [s for s, r in record.steps.items() if r.need is None]
    assert ran == ["plan", "r1", "r2", "a1"] == [s for s in steps if s in ran]
    assert {s: kinds(evs) for s, evs in steps.items() if s not in ran} == {"researcher": ["joined"],
                                                                          "executor": ["joined"]}
    assert set(steps) == set(record.steps)
    check_order(data)
    check_ids(data, ref, {s: r.key for s, r in record.steps.items()}, {s: r.agent for s, r in record.steps.items()})

    for step_id, evs in ((s, steps[s]) for s in ran):
        seq = kinds(evs)
        assert seq[:2] == ["enqueued", "picked_up"], (step_id, seq)
        assert seq[-1] == "succeeded", (step_id, seq)
        middle = seq[2:-1]
        assert middle and set(middle) <= {"progress", "tool_call", "effect"}, (step_id, seq)
        enqueued, picked_up, *_, succeeded = evs
        assert enqueued["queue"] == record.steps[step_id].agent
        assert enqueued.get("by") == ("client" if step_id == "plan" else None)
        assert picked_up["attempt"] == 1 and picked_up["token"] >= 1
        # One attempt, run by one worker from pick-up to success.
        assert len({e["worker"] for e in evs[1:]}) == 1
        assert [e["progress"] for e in evs if e["event"] == "progress"] == [1]
        duration = succeeded["duration_s"]
        assert isinstance(duration, float) and 0 < duration < 30
        step = record.steps[step_id]
        assert step.started_at is not None and step.finished_at is not None
        assert duration <= step.finished_at - step.started_at + 2

    [tool_call] = [e for e in steps["a1"] if e["event"] == "tool_call"]
    [effect] = [e for e in steps["a1"] if e["event"] == "effect"]
    assert (effect["tool"], effect["call"], effect["verdict"]) == ("note", 1, "verified")  # read back
    assert tool_call["tool"] == "note" and tool_call["dependency"] == "mesh" and tool_call["duration_s"] >= 0
    assert kinds(steps["a1"])[2:] == ["tool_call", "progress", "effect", "succeeded"]
    # The downstream steps were enqueued by the step before them (fan-out, then fan-in after the last finding).
    assert all(steps[r][0]["at"] >= steps["plan"][1]["at"] for r in ("r1", "r2"))
    assert steps["a1"][0]["at"] >= max(steps[r][1]["at"] for r in ("r1", "r2"))

    res = cli("trace", ref.id)
    assert res.returncode == 0, res.stderr
    text = res.stdout
    assert f"job {ref.id} succeeded" in text
    for step_id, step in record.steps.items():
        assert (f"{step_id} {step.agent} succeeded" if step_id in ran else f"{step_id} succeeded") in text, text
    assert len(re.findall(r"succeeded +in ", text)) == 4, text  # one "succeeded" event line per step, with its duration
    for word in ("enqueued", "picked_up", "progress", "tool_call", "note → mesh"):
        assert word in text, text


def test_trace_of_a_deferred_then_dead_lettered_job_shows_why_and_when(client, make_settings, start_worker, cli):
    def respond(n: int, _request: dict[str, Any]) -> tuple[Any, ...]:
        return (429, {}, {"Retry-After": "1"}) if n == 1 else (400, {"error": "bad field"})

    with RecordingServer(respond) as server:
        settings = make_settings(http_allow=server.host_port, max_retries=3)
        ref = client.send("executor", call(server.url()))
        start_worker(settings, ("executor",))
        record = client.wait(ref.id, timeout_s=20)

    assert record.state is State.DEAD_LETTERED and record.failure_class == "permanent"
    assert [r["status"] for r in server.requests] == [429, 400]
    assert server.requests[1]["at"] - server.requests[0]["at"] >= 1.0

    data = trace_json(cli, ref.id)
    assert data["state"] == "dead_lettered" and list(data["steps"]) == ["executor"]
    check_order(data)
    step = record.steps["executor"]
    check_ids(data, ref, {"executor": step.key}, {"executor": "executor"})
    evs = data["steps"]["executor"]
    assert kinds(evs) == ["enqueued", "picked_up", "tool_call", "progress", "deferred",
                          "picked_up", "tool_call", "progress", "dead_lettered"]
    first_call, deferred, second_pickup, second_call, dead = evs[2], evs[4], evs[5], evs[6], evs[8]

    # Why and when it waited: the rate limit, and until when (Retry-After: 1, plus jitter).
    assert first_call["error"] and "429" in first_call["error"]
    assert deferred["failure_class"] == "rate_limited" and deferred["route"] == "defer"
    assert "429" in deferred["error"]
    assert deferred["until"] >= deferred["at"] + 1.0 - 1e-3
    assert deferred["until"] <= deferred["at"] + 1.0 + 0.25 + 1e-3
    # A deferral spends no retry budget: the same attempt comes back, not before the wait is over.
    assert second_pickup["attempt"] == 1 == deferred["attempt"] == dead["attempt"]
    assert second_pickup["at"] >= deferred["at"] + 1.0 - 0.2

    # Why and when it was dead-lettered: the permanent 400, with the error the job record keeps.
    assert second_call["error"] and "400" in second_call["error"]
    assert dead["failure_class"] == "permanent" and dead["route"] == "dead_letter"
    assert dead["state"] == "dead_lettered"
    assert "400" in dead["error"] and dead["error"] == step.error
    assert "until" not in dead
    assert dead["at"] >= second_call["at"]

    res = cli("trace", ref.id)
    assert res.returncode == 0, res.stderr
    text = res.stdout
    assert f"job {ref.id} dead_lettered" in text
    assert "deferred" in text and "rate_limited until" in text
    assert "permanent → dead_lettered" in text


def test_trace_of_a_retried_step_shows_failed_with_its_retry_time_then_succeeded(
        client, make_settings, start_worker, cli):
    with RecordingServer(lambda n, _: (500, {}) if n == 1 else (200, {"ok": 1})) as server:
        settings = make_settings(http_allow=server.host_port, max_retries=3)
        ref = client.send("executor", call(server.url()))
        start_worker(settings, ("executor",))
        record = client.wait(ref.id, timeout_s=20)

    assert record.state is State.SUCCEEDED
    step = record.steps["executor"]
    assert step.attempt == 2 and step.error is None

    data = trace_json(cli, ref.id)
    check_order(data)
    check_ids(data, ref, {"executor": step.key}, {"executor": "executor"})
    evs = data["steps"]["executor"]
    assert kinds(evs) == ["enqueued", "picked_up", "tool_call", "progress", "failed",
                          "picked_up", "tool_call", "progress", "effect", "succeeded"]
    failed, retry, ok, succeeded = evs[4], evs[5], evs[6], evs[9]
    assert failed["failure_class"] == "brownout" and failed["route"] == "retry" and failed["state"] == "failed"
    assert "500" in failed["error"] and failed["attempt"] == 1
    assert failed["until"] >= failed["at"]
    assert retry["attempt"] == 2 == succeeded["attempt"]
    assert ok["status"] == 200 and "error" not in ok
    assert 0 < succeeded["duration_s"] < 20

    res = cli("trace", ref.id)
    assert res.returncode == 0, res.stderr
    assert "brownout, retry at" in res.stdout and re.search(r"succeeded +in ", res.stdout)


def dead_lettered_job(client: MeshClient, make_settings, start_worker) -> Any:
    """A one-step job whose http_post got a 400: dead-lettered as permanent."""
    with RecordingServer(lambda n, _: (400, {"error": "bad field"})) as server:
        ref = client.send("executor", call(server.url()))
        start_worker(make_settings(http_allow=server.host_port), ("executor",))
        assert client.wait(ref.id, timeout_s=20).state is State.DEAD_LETTERED
    return ref


def test_readable_trace_piped_keeps_the_whole_trace_id_and_the_dead_letter_error(
        client, make_settings, start_worker, cli):
    ref = dead_lettered_job(client, make_settings, start_worker)
    text = cli("trace", ref.id).stdout
    assert ref.trace_id in text
    assert "answered 400" in text.split("dead_lettered", 2)[-1]


def test_readable_trace_separates_the_dead_lettered_event_from_its_detail(client, make_settings, start_worker, cli):
    ref = dead_lettered_job(client, make_settings, start_worker)
    text = cli("trace", ref.id, COLUMNS="250").stdout
    assert "dead_letteredpermanent" not in text
    assert re.search(r"dead_lettered +permanent → dead_lettered", text), text


def test_trace_of_an_unknown_job_exits_2(cli, client: MeshClient):
    res = cli("trace", "job-does-not-exist", "--json")
    assert res.returncode == 2
    assert "no job job-does-not-exist" in res.stderr
