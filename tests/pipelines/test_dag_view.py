"""``mesh status`` and ``mesh trace`` draw a pipeline job's DAG, as real subprocesses over a real worker
and Redis at 80 columns: each step's state and dependencies, and a gate with the values it saw."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from subprocess import CompletedProcess

ISSUE_FILE = str(Path(__file__).parent / "multi-agent-orchestration.skill.yaml")
APP = "tests.pipelines.agents:app"
Cli = Callable[..., CompletedProcess[str]]
NARROW = {"COLUMNS": "80"}


def _run(cli: Cli, key: str, confidence: float) -> CompletedProcess[str]:
    task = json.dumps({"goal": "add retries", "confidence": confidence})
    return cli("run", ISSUE_FILE, "--app", APP, "--input", task, "--key", key, "--wait", **NARROW)


def _fits(text: str) -> None:
    long = [line for line in text.splitlines() if len(line) > 80]
    assert not long, long


def test_status_draws_the_halted_dag_with_the_gate_and_the_value_it_saw(cli: Cli, worker_process) -> None:
    worker_process("--app", APP)
    assert _run(cli, "halt-1", 0.6).returncode == 1

    status = cli("status", "halt-1", **NARROW)
    assert status.returncode == 0, status.stderr
    _fits(status.stdout)
    lines = status.stdout.splitlines()
    steps = {line.split()[1] if line.lstrip().startswith("└─") else line.split()[0]: line
             for line in lines if line.lstrip().startswith(("└─", "researcher"))}
    assert list(steps) == ["researcher", "coder", "reviewer", "deployer"]  # DAG order
    assert steps["researcher"].startswith("researcher  succeeded")
    assert steps["coder"].startswith("└─ coder  succeeded") and "← researcher" in steps["coder"]
    assert steps["reviewer"].startswith("   └─ reviewer  halted") and "← coder" in steps["reviewer"]
    assert steps["deployer"].startswith("      └─ deployer  not_run")
    text = " ".join(status.stdout.split())
    assert "gate {{coder.confidence}} >= 0.85 saw coder.confidence=0.6 → false" in text
    assert "not sent: the job halted" in text

    dag = json.loads(cli("status", "halt-1", "--json").stdout)["dag"]
    assert [(s["step_id"], s["depends_on"], s["state"]) for s in dag] == [
        ("researcher", [], "succeeded"), ("coder", ["researcher"], "succeeded"),
        ("reviewer", ["coder"], "halted"), ("deployer", ["reviewer"], "not_run")]
    assert dag[3]["error"] == "not sent: the job halted at step reviewer"
    assert dag[2]["gate"] == {"expr": "{{coder.confidence}} >= 0.85", "values": {"coder.confidence": 0.6},
                              "passed": False}
    assert dag[3]["gate"] is None  # never evaluated: nothing downstream of a halt is looked at


def test_status_of_a_passing_run_shows_every_step_succeeded_and_both_gates_true(cli: Cli, worker_process) -> None:
    worker_process("--app", APP)
    assert _run(cli, "pass-1", 0.9).returncode == 0

    status = cli("status", "pass-1", **NARROW)
    assert status.returncode == 0, status.stderr
    _fits(status.stdout)
    text = " ".join(status.stdout.split())
    for step in ("researcher", "coder", "reviewer", "deployer"):
        assert f"{step} succeeded" in text
    assert "saw coder.confidence=0.9 → true" in text and "saw reviewer.approved=true → true" in text
    dag = json.loads(cli("status", "pass-1", "--json").stdout)["dag"]
    assert {s["state"] for s in dag} == {"succeeded"}
    assert [s["gate"]["passed"] for s in dag if s["gate"]] == [True, True]


def test_trace_lists_steps_in_dag_order_with_the_gate_evaluation_and_the_halt(cli: Cli, worker_process) -> None:
    worker_process("--app", APP)
    job_id = _run(cli, "halt-2", 0.6).stdout.split()[1]

    trace = cli("trace", job_id, **NARROW)
    assert trace.returncode == 0, trace.stderr
    lines = trace.stdout.splitlines()
    heads = [next(i for i, line in enumerate(lines) if f"── {step} " in line)
             for step in ("researcher", "coder", "reviewer", "deployer")]
    assert heads == sorted(heads)
    reviewer = "\n".join(lines[heads[2]:heads[3]])
    assert "← coder" in lines[heads[2]]
    assert "{{coder.confidence}} >= 0.85 saw coder.confidence=0.6 → false" in reviewer
    assert "halted" in reviewer and "was false" in reviewer
    assert "not sent: the job halted" in lines[heads[3]]
    traced = json.loads(cli("trace", job_id, "--json").stdout)
    assert [s["state"] for s in traced["dag"][2:]] == ["halted", "not_run"]
    halted = next(e for e in traced["events"] if e["event"] == "halted")
    assert halted["not_run"] == ["deployer"]


def test_draw_indents_a_diamond_by_depth_and_names_every_dependency() -> None:
    import orjson

    from mesh.agents.pipelines import Pipeline
    from mesh.contracts import GateCheck, JobRecord, State, StepRecord
    from mesh.ops.dag import dag, draw

    spec = (Pipeline("diamond").step("a").step("b", depends_on=["a"]).step("c", depends_on=["a"])
            .step("d", depends_on=["b", "c"], gate="b.ok == true", failure_mode="continue").build())
    record = JobRecord(job_id="job-1", key="k", trace_id="t", state=State.RUNNING, pipeline="diamond")
    for sid in ("d", "c", "b", "a"):  # record order is not DAG order
        record = record.with_step(StepRecord(step_id=sid, agent=sid, key=f"k/{sid}"))
    gate = GateCheck(expr="b.ok == true", values={"b.ok": None}, passed=False)
    record = record.with_step(record.steps["d"].model_copy(update={"state": State.SKIPPED, "gate": gate,
                                                                   "error": "gate 'b.ok == true' was false"}))

    nodes = dag(record, orjson.loads(spec.canonical()))
    assert [(n.step.step_id, n.depth, n.depends_on) for n in nodes] == [
        ("a", 0, ()), ("b", 1, ("a",)), ("c", 1, ("a",)), ("d", 2, ("b", "c"))]
    lines = [line.plain for line in draw(record, nodes, width=40)]
    assert lines[0] == "a  queued"
    assert "└─ c  queued  ← a" in lines
    assert "   └─ d  skipped  ← b, c" in lines
    assert "        gate b.ok == true saw b.ok=null" in lines and "        → false" in lines  # wrapped under d
    assert not any("was false" in line for line in lines)  # the error says the gate again: shown once
    assert all(len(line) <= 40 for line in lines)
