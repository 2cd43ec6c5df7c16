"""``for_each`` over real workers and Redis: one item per list element, at most ``max_parallel`` in
flight, and a join (``min_success``) that lets the job go on past permanently failed items, or
stops it, listing them, when too few succeeded."""

from __future__ import annotations

from typing import Any

from mesh import MeshClient
from mesh.agents.pipelines import Pipeline, check
from mesh.broker.keys import prefix
from mesh.contracts import State
from tests.conftest import wait_for
from tests.pipelines.agents import app


def fan_out(min_success: float | int, max_parallel: int | None = None, failure_mode: str = "halt_pipeline") -> Any:
    return check(Pipeline("fan")
                 .step("scout")
                 .step("fetch", depends_on=["scout"], for_each="scout.sources", max_parallel=max_parallel,
                       join={"min_success": min_success}, failure_mode=failure_mode, retry_policy={"max_attempts": 1})
                 .step("digest", depends_on=["fetch"])
                 .build(), app)


def fail_items(mesh: MeshClient, key: str, *indexes: int) -> None:
    mesh.redis.sadd(f"{prefix(mesh.settings.namespace)}:test.fail", *[f"{key}/fetch/fetch/{i}" for i in indexes])


def runs(mesh: MeshClient) -> dict[str, int]:
    raw = mesh.redis.hgetall(f"{prefix(mesh.settings.namespace)}:test.runs")
    return {k.decode(): int(v) for k, v in raw.items()}  # type: ignore[union-attr]


def test_twenty_items_three_failing_meet_a_join_of_0_8_and_the_job_goes_on(mesh, run_workers):
    fail_items(mesh, "fan-1", 3, 11, 17)
    run_workers(), run_workers()
    ref = mesh.run(fan_out(0.8), {"goal": "g", "count": 20}, key="fan-1")
    record = mesh.wait(ref.id, timeout_s=60)

    assert record.state is State.SUCCEEDED, record.error
    fetch = record.steps["fetch"]
    assert fetch.state is State.SUCCEEDED and fetch.need == 16
    assert sorted(fetch.result["failed"]) == ["fetch[11]", "fetch[17]", "fetch[3]"]
    assert all("told to fail" in e for e in fetch.result["failed"].values())
    assert len(fetch.result["items"]) == 17
    items = {sid: s for sid, s in record.steps.items() if s.parent == "fetch"}
    assert len(items) == 20 and items["fetch[3]"].key == "fan-1/fetch/fetch/3"
    assert {sid for sid, s in items.items() if s.state is State.DEAD_LETTERED} == {"fetch[3]", "fetch[11]", "fetch[17]"}
    assert record.steps["digest"].state is State.SUCCEEDED
    assert record.result["digest"]["pages"] == 17
    assert "fetch[3]" not in record.result
    assert all(n == 1 for n in runs(mesh).values())


def test_a_join_not_met_dead_letters_the_job_and_sends_nothing_downstream(mesh, run_workers):
    fail_items(mesh, "fan-2", 3, 11, 17)
    run_workers()
    ref = mesh.run(fan_out(0.9), {"goal": "g", "count": 20}, key="fan-2")
    record = wait_for(lambda: (r := mesh.status(ref.id)).steps["fetch"].state is State.DEAD_LETTERED and r,
                      timeout_s=60)

    assert record.state is State.DEAD_LETTERED
    fetch = record.steps["fetch"]
    assert fetch.state is State.DEAD_LETTERED and fetch.failure_class == "join"
    assert "17 of 20 items succeeded, 18 needed" in fetch.error and "fetch[11]" in fetch.error
    assert record.steps["digest"].sent_at is None
    assert not any(k.startswith("fan-2/digest") for k in runs(mesh))


def test_a_replayed_item_meets_the_join_and_the_job_runs_on(mesh, run_workers, cli):
    fail_items(mesh, "fan-3", 3, 11)
    run_workers()
    ref = mesh.run(fan_out(19), {"goal": "g", "count": 20}, key="fan-3")
    wait_for(lambda: mesh.status(ref.id).steps["fetch"].state is State.DEAD_LETTERED, timeout_s=60)

    mesh.redis.srem(f"{prefix(mesh.settings.namespace)}:test.fail", "fan-3/fetch/fetch/3")
    done = cli("dlq", "replay", "--all", "--yes")
    assert done.returncode == 0, done.stderr
    record = mesh.wait(ref.id, timeout_s=60)

    assert record.state is State.SUCCEEDED, record.error
    assert list(record.steps["fetch"].result["failed"]) == ["fetch[11]"]
    assert record.result["digest"]["pages"] == 19


def test_max_parallel_bounds_the_items_in_flight(mesh, run_workers):
    run_workers(), run_workers()  # 8 threads: more than the bound
    ref = mesh.run(fan_out(1.0, max_parallel=5), {"goal": "g", "count": 20}, key="fan-4")
    record = mesh.wait(ref.id, timeout_s=60)

    assert record.state is State.SUCCEEDED, record.error
    assert len(record.steps["fetch"].result["items"]) == 20
    peak = mesh.redis.zscore(f"{prefix(mesh.settings.namespace)}:test.peak", "peak")
    assert peak is not None and 1 <= peak <= 5


def join_events(mesh: MeshClient, job_id: str) -> list[dict[str, Any]]:
    from mesh.broker import trace

    return [e for e in trace.read(mesh.redis, mesh.keys, job_id) if e["event"] in ("joined", "join_failed")]


def test_a_join_decided_by_a_dead_item_is_traced_and_the_jobs_error_names_the_rule(mesh, run_workers):
    # One item at a time, the last one failing: the join is decided on the failure path.
    fail_items(mesh, "fan-6", 3, 11, 19)
    run_workers()
    ref = mesh.run(fan_out(0.9, max_parallel=1), {"goal": "g", "count": 20}, key="fan-6")
    record = wait_for(lambda: (r := mesh.status(ref.id)).state is State.DEAD_LETTERED and r, timeout_s=60)

    assert record.error.startswith("step fetch: join not met (min_success 0.9): 17 of 20 items succeeded, "
                                   "18 needed; failed: fetch[3], fetch[11], fetch[19]"), record.error
    assert record.failure_class == record.steps["fetch[3]"].failure_class != "join"  # the cause
    (decision,) = join_events(mesh, ref.id)
    assert decision["event"] == "join_failed" and decision["step_id"] == "fetch"
    assert (decision["need"], decision["succeeded"], decision["failed"], decision["outcome"]) == (
        18, 17, ["fetch[3]", "fetch[11]", "fetch[19]"], "dead_lettered")


def test_a_met_join_is_revised_when_its_dead_items_are_replayed_and_succeed(mesh, run_workers, cli):
    fail_items(mesh, "fan-7", 3, 11, 19)
    run_workers()
    ref = mesh.run(fan_out(0.8, max_parallel=1), {"goal": "g", "count": 20}, key="fan-7")
    record = mesh.wait(ref.id, timeout_s=60)
    assert record.state is State.SUCCEEDED, record.error
    assert list(record.steps["fetch"].result["failed"]) == ["fetch[3]", "fetch[11]", "fetch[19]"]

    mesh.redis.delete(f"{prefix(mesh.settings.namespace)}:test.fail")
    done = cli("dlq", "replay", "--all", "--yes")
    assert done.returncode == 0, done.stderr
    record = wait_for(lambda: (r := mesh.status(ref.id)) and all(
        s.state is State.SUCCEEDED for s in r.steps.values() if s.parent == "fetch") and r, timeout_s=60)

    fetch = record.steps["fetch"]
    assert fetch.result["failed"] == {} and len(fetch.result["items"]) == 20
    assert record.state is State.SUCCEEDED and record.result["fetch"] == fetch.result
    # The first decision (made when fetch[19] was dead-lettered), then the revision of its output.
    decided, revised = join_events(mesh, ref.id)
    assert (decided["event"], decided["need"], decided["succeeded"], decided["failed"]) == (
        "joined", 16, 17, ["fetch[3]", "fetch[11]", "fetch[19]"])
    assert (revised["event"], revised["revised"], revised["need"], revised["succeeded"], revised["failed"]) == (
        "joined", True, 16, 20, [])
