"""Declared pipelines run over real workers and Redis: the issue's file as given, gates that halt or
skip, a DAG with two roots, and a dead-lettered middle step replayed to the end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mesh import MeshClient
from mesh.agents.pipelines import Pipeline, load_pipeline
from mesh.broker.keys import prefix
from mesh.contracts import State
from tests.conftest import wait_for
from tests.pipelines.agents import app

FILE = Path(__file__).with_name("multi-agent-orchestration.skill.yaml")


def runs(mesh: MeshClient) -> dict[str, int]:
    """Executions per step key."""
    raw = mesh.redis.hgetall(f"{prefix(mesh.settings.namespace)}:test.runs")
    return {k.decode(): int(v) for k, v in raw.items()}  # type: ignore[union-attr]


def test_the_issues_file_runs_unchanged_to_succeeded(mesh, run_workers):
    spec = load_pipeline(FILE, app)
    run_workers()
    ref = mesh.run(spec, {"goal": "add retries", "confidence": 0.9}, key="review-1")
    record = mesh.wait(ref.id, timeout_s=30)

    assert record.state is State.SUCCEEDED, record.error
    assert record.pipeline == "multi-agent-orchestration" and record.pipeline_digest == spec.digest()
    assert {s: r.state for s, r in record.steps.items()} == dict.fromkeys(
        ["researcher", "coder", "reviewer", "deployer"], State.SUCCEEDED)
    assert record.steps["coder"].key == "review-1:coder"  # the file's idempotency_key template
    assert record.steps["coder"].input["summary"] == "notes on add retries"  # state_input: research_result
    assert record.result["deployer"]["url"].startswith("https://")
    assert set(runs(mesh).values()) == {1}


def test_a_false_gate_halts_the_job_at_reviewer_and_says_why(mesh, run_workers):
    run_workers()
    ref = mesh.run(load_pipeline(FILE, app), {"goal": "risky change", "confidence": 0.6})
    record = mesh.wait(ref.id, timeout_s=30)

    assert record.state is State.HALTED
    reviewer = record.steps["reviewer"]
    assert reviewer.state is State.HALTED and reviewer.picked_up == 0 and reviewer.sent_at is None
    assert "coder.confidence" in reviewer.error and "0.6" in reviewer.error
    assert "reviewer" in record.error and "0.6" in record.error
    deployer = record.steps["deployer"]
    assert deployer.state == "not_run" and deployer.sent_at is None and deployer.picked_up == 0
    assert deployer.error == "not sent: the job halted at step reviewer"
    assert record.steps["coder"].state is State.SUCCEEDED
    assert not any(k.endswith("/reviewer/reviewer") for k in runs(mesh))
    events = [e for e in mesh_trace(mesh, ref.id) if e["event"] == "halted"]
    assert events and events[0]["values"] == {"coder.confidence": 0.6} and events[0]["not_run"] == ["deployer"]


def mesh_trace(mesh: MeshClient, job_id: str) -> list[dict[str, Any]]:
    from mesh.broker import trace

    return trace.read(mesh.redis, mesh.keys, job_id)


def test_a_continue_gate_skips_its_step_and_dependents_run(mesh, run_workers):
    spec = (Pipeline("soft-review")
            .step("research", agent="researcher")
            .step("coder", depends_on=["research"])
            .step("reviewer", depends_on=["coder"], gate="coder.confidence >= 0.85", failure_mode="continue")
            .step("report", agent="jot", depends_on=["reviewer"])
            .build())
    app_spec = load_pipeline_spec(spec)
    run_workers()
    ref = mesh.run(app_spec, {"goal": "tidy", "confidence": 0.5})
    record = mesh.wait(ref.id, timeout_s=30)

    assert record.state is State.SUCCEEDED, record.error
    assert record.steps["reviewer"].state is State.SKIPPED and "0.5" in record.steps["reviewer"].error
    assert record.steps["report"].state is State.SUCCEEDED
    assert record.steps["report"].input["goal"] == "tidy"  # its only dependency skipped: the run's input
    assert "reviewer" not in record.result


def load_pipeline_spec(spec: Any) -> Any:
    from mesh.agents.pipelines import check

    return check(spec, app)


DAG = (Pipeline("five")
       .step("left", agent="researcher")
       .step("right", agent="researcher")
       .step("merge", agent="combine", depends_on=["left", "right"])
       .step("code", agent="coder", depends_on=["merge"])
       .step("review", agent="reviewer", depends_on=["code"]))


def test_a_five_step_dag_with_two_roots_runs_each_step_once(mesh, run_workers):
    spec = load_pipeline_spec(DAG.build())
    ref = mesh.run(spec, {"goal": "g"}, key="dag-1")
    first = mesh.status(ref.id)
    assert sorted(s for s, r in first.steps.items() if r.sent_at is not None) == ["left", "right"]
    run_workers()
    record = mesh.wait(ref.id, timeout_s=30)

    assert record.state is State.SUCCEEDED, record.error
    assert record.steps["merge"].input.keys() == {"left", "right"}
    assert record.result["review"] == {"approved": True, "comments": ""}
    counted = runs(mesh)
    assert sorted(counted) == sorted(r.key for r in record.steps.values())
    assert set(counted.values()) == {1}


def test_a_replayed_dead_lettered_middle_step_continues_the_job_to_the_end(mesh, run_workers, cli):
    spec = load_pipeline_spec(DAG.build())
    ns = mesh.settings.namespace
    mesh.redis.sadd(f"{prefix(ns)}:test.fail", "dag-2/combine/merge")
    run_workers()
    ref = mesh.run(spec, {"goal": "g"}, key="dag-2")
    record = wait_for(lambda: (r := mesh.status(ref.id)).state is State.DEAD_LETTERED and r, timeout_s=30)
    assert record.steps["merge"].state is State.DEAD_LETTERED
    assert record.steps["code"].sent_at is None

    mesh.redis.srem(f"{prefix(ns)}:test.fail", "dag-2/combine/merge")
    done = cli("dlq", "replay", "--all", "--yes")
    assert done.returncode == 0, done.stderr
    record = mesh.wait(ref.id, timeout_s=30)

    assert record.state is State.SUCCEEDED, record.error
    counted = runs(mesh)
    assert counted["dag-2/combine/merge"] == 2
    assert all(n == 1 for k, n in counted.items() if k != "dag-2/combine/merge")


def test_a_running_job_keeps_its_spec_and_new_runs_take_the_newest(mesh):
    old = load_pipeline_spec(DAG.build())
    newer = load_pipeline_spec(Pipeline("five").step("only", agent="researcher").build())
    first = mesh.run(old, {"goal": "g"})
    mesh.register(newer)
    second = mesh.run("five", {"goal": "g"})

    assert mesh.status(first.id).pipeline_digest == old.digest()
    assert mesh.status(second.id).pipeline_digest == newer.digest()
    assert list(mesh.status(second.id).steps) == ["only"]


def test_a_false_when_skips_its_step_and_its_dependent_gets_the_runs_input(mesh, run_workers):
    spec = load_pipeline_spec(Pipeline("maybe")
                              .step("maybe", agent="researcher", when="input.confidence > 0.95")
                              .step("report", agent="jot", depends_on=["maybe"])
                              .build())
    run_workers()
    record = mesh.wait(mesh.run(spec, {"goal": "g", "confidence": 0.5}).id, timeout_s=30)

    assert record.state is State.SUCCEEDED, record.error
    assert record.steps["maybe"].state is State.SKIPPED and "when" in record.steps["maybe"].error
    assert record.steps["report"].input == {"goal": "g", "confidence": 0.5}
    assert list(runs(mesh)) == [record.steps["report"].key]


def test_a_step_that_requires_approval_waits_unsent_with_a_trace_event(mesh, run_workers):
    spec = load_pipeline_spec(Pipeline("approve")
                              .step("researcher")
                              .step("coder", depends_on=["researcher"], requires_human_approval=True)
                              .build())
    run_workers()
    ref = mesh.run(spec, {"goal": "g"})
    record = wait_for(lambda: (r := mesh.status(ref.id)).steps["coder"].state is State.AWAITING_APPROVAL and r)

    assert record.steps["coder"].sent_at is None and record.steps["coder"].input["summary"] == "notes on g"
    assert record.state is State.AWAITING_APPROVAL  # nothing else moves: the job waits for a person
    assert any(e["event"] == "awaiting_approval" and e["step_id"] == "coder" for e in mesh_trace(mesh, ref.id))
    assert list(runs(mesh)) == [record.steps["researcher"].key]


def test_timeout_and_retry_policy_ride_on_the_steps_message(mesh):
    from mesh.contracts import loads

    spec = load_pipeline_spec(Pipeline("policy").step(
        "researcher", timeout_ms=1500, retry_policy={"max_attempts": 2}).build())
    mesh.run(spec, {"goal": "g"})
    [raw] = mesh.redis.hvals(mesh.keys.messages("researcher"))
    message = loads(raw)
    assert message["options"]["time_limit"] == 1500
    assert message["args"][0]["max_retries"] == 1


def test_max_attempts_counts_every_attempt_then_the_step_is_dead_lettered(mesh, run_workers):
    spec = load_pipeline_spec(Pipeline("flaky").step("researcher", retry_policy={"max_attempts": 2}).build())
    mesh.redis.sadd(f"{prefix(mesh.settings.namespace)}:test.flaky", "flaky-1/researcher/researcher")
    run_workers()
    ref = mesh.run(spec, {"goal": "g"}, key="flaky-1")
    record = wait_for(lambda: (r := mesh.status(ref.id)).state is State.DEAD_LETTERED and r, timeout_s=30)

    assert record.steps["researcher"].state is State.DEAD_LETTERED
    assert runs(mesh) == {"flaky-1/researcher/researcher": 2}
