"""``when`` and ``gate`` on a ``for_each`` step are checked per item, ``item`` in scope: a false
``when`` skips that item (counted neither as a success nor a failure by the join); a false gate
applies the step's failure mode to that item (``halt_pipeline`` halts the job, ``continue`` skips it)."""

from __future__ import annotations

from typing import Any

from mesh import MeshClient
from mesh.agents.pipelines import Pipeline, check
from mesh.broker.keys import prefix
from mesh.contracts import State
from tests.pipelines.agents import app


def fan_out(**conditions: Any) -> Any:
    return check(Pipeline("fan-if")
                 .step("scout")
                 .step("fetch", depends_on=["scout"], for_each="scout.sources", join={"min_success": 1.0},
                       retry_policy={"max_attempts": 1}, **conditions)
                 .step("digest", depends_on=["fetch"])
                 .build(), app)


def runs(mesh: MeshClient) -> dict[str, int]:
    raw = mesh.redis.hgetall(f"{prefix(mesh.settings.namespace)}:test.runs")
    return {k.decode(): int(v) for k, v in raw.items()}  # type: ignore[union-attr]


def test_a_false_when_skips_its_item_and_the_join_counts_only_the_items_that_ran(mesh, run_workers):
    run_workers()
    ref = mesh.run(fan_out(when="item.score >= 2.0"), {"goal": "g", "count": 6}, key="when-1")
    record = mesh.wait(ref.id, timeout_s=30)

    assert record.state is State.SUCCEEDED, record.error
    items = {sid: s for sid, s in record.steps.items() if s.parent == "fetch"}
    assert {sid for sid, s in items.items() if s.state is State.SKIPPED} == {"fetch[0]", "fetch[1]"}
    assert "item.score = 0.0" in items["fetch[0]"].error
    fetch = record.steps["fetch"]
    assert fetch.need == 4  # min_success 1.0 of the 4 items that run: the skipped ones count neither way
    assert fetch.result["skipped"] == ["fetch[0]", "fetch[1]"] and fetch.result["failed"] == {}
    assert record.result["digest"]["pages"] == 4
    assert sorted(k for k in runs(mesh) if "/fetch/" in k) == [f"when-1/fetch/fetch/{i}" for i in range(2, 6)]


def test_a_false_item_gate_halts_the_job_before_any_item_is_sent(mesh, run_workers, cli):
    run_workers()
    ref = mesh.run(fan_out(gate="item.score < 4.0"), {"goal": "g", "count": 6}, key="gate-1")
    record = mesh.wait(ref.id, timeout_s=30)

    assert record.state is State.HALTED
    item = record.steps["fetch[4]"]
    assert item.state is State.HALTED and item.gate is not None and item.gate.values == {"item.score": 4.0}
    assert record.steps["fetch"].state is State.HALTED and "fetch[4]" in record.error and "4.0" in record.error
    assert record.steps["fetch[0]"].gate.passed is True  # type: ignore[union-attr]
    assert all(s.sent_at is None for s in record.steps.values() if s.parent == "fetch")
    assert record.steps["digest"].sent_at is None
    # Nothing will ever send them: not "queued" (forever), but not_run, saying where the job halted.
    unsent = {sid: s for sid, s in record.steps.items() if sid in ("digest", "fetch[0]", "fetch[5]")}
    assert {str(s.state) for s in unsent.values()} == {"not_run"}
    assert {s.error for s in unsent.values()} == {"not sent: the job halted at step fetch[4]"}
    assert list(runs(mesh)) == ["gate-1/scout/scout"]
    shown = cli("status", ref.id, "--json")
    assert shown.returncode == 0, shown.stderr
    assert "fetch[4]" in shown.stdout and "item.score" in shown.stdout


def test_a_false_item_gate_with_continue_skips_that_item_and_the_rest_run(mesh, run_workers):
    run_workers()
    ref = mesh.run(fan_out(gate="item.score < 4.0", failure_mode="continue"), {"goal": "g", "count": 6},
                   key="gate-2")
    record = mesh.wait(ref.id, timeout_s=30)

    assert record.state is State.SUCCEEDED, record.error
    assert {sid for sid, s in record.steps.items() if s.parent == "fetch" and s.state is State.SKIPPED} == {
        "fetch[4]", "fetch[5]"}
    assert record.steps["fetch"].result["skipped"] == ["fetch[4]", "fetch[5]"]
    assert record.result["digest"]["pages"] == 4
    assert "gate-2/fetch/fetch/4" not in runs(mesh)
