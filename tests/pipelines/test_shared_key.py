"""``idempotency_key`` is the step's claim key: two jobs whose template renders the same key share
the step's effect — it runs once, and the second job records the stored output and goes on."""

from __future__ import annotations

from typing import Any

from mesh import MeshClient
from mesh.agents.pipelines import Pipeline, check
from mesh.broker import trace
from mesh.broker.keys import prefix
from mesh.contracts import State
from tests.conftest import wait_for
from tests.pipelines.agents import app


def shared() -> Any:
    # The coder's key reads the run's input, not the job's key: jobs on the same goal share it.
    return check(Pipeline("shared")
                 .step("researcher")
                 .step("coder", depends_on=["researcher"], idempotent=True, idempotency_key="{{input.goal}}:coder")
                 .step("reviewer", depends_on=["coder"])
                 .build(), app)


def runs(mesh: MeshClient) -> dict[str, int]:
    raw = mesh.redis.hgetall(f"{prefix(mesh.settings.namespace)}:test.runs")
    return {k.decode(): int(v) for k, v in raw.items()}  # type: ignore[union-attr]


def test_two_jobs_rendering_one_key_run_its_step_once_and_both_succeed(mesh, run_workers, cli):
    spec = shared()
    run_workers()
    first = mesh.wait(mesh.run(spec, {"goal": "cache", "confidence": 0.9}, key="job-a").id, timeout_s=30)
    second = mesh.wait(mesh.run(spec, {"goal": "cache", "confidence": 0.9}, key="job-b").id, timeout_s=30)

    assert first.state is State.SUCCEEDED, first.error
    assert second.state is State.SUCCEEDED, second.error
    assert first.steps["coder"].key == second.steps["coder"].key == "cache:coder"
    assert second.steps["coder"].result == first.steps["coder"].result
    counted = runs(mesh)
    assert counted["cache:coder"] == 1  # the effect ran once, for both jobs
    assert counted["job-a/researcher/researcher"] == counted["job-b/researcher/researcher"] == 1
    assert counted["job-b/reviewer/reviewer"] == 1  # the second job went on past the shared step
    shared_events = [e for e in trace.read(mesh.redis, mesh.keys_of(second.job_id), second.job_id)
                     if e["event"] == "succeeded" and e.get("step_id") == "coder"]
    assert shared_events and shared_events[0].get("shared") is True
    shown = cli("trace", second.job_id)
    assert shown.returncode == 0, shown.stderr
    assert "stored output of another job's step" in " ".join(shown.stdout.split())


def test_jobs_started_together_on_one_key_share_the_effect(mesh, run_workers):
    spec = shared()
    refs = [mesh.run(spec, {"goal": "retry", "confidence": 0.9}, key=f"job-{i}") for i in range(3)]
    run_workers()
    records = [mesh.wait(ref.id, timeout_s=30) for ref in refs]

    assert [r.state for r in records] == [State.SUCCEEDED] * 3, [r.error for r in records]
    assert runs(mesh)["retry:coder"] == 1
    assert len({str(r.steps["coder"].result) for r in records}) == 1


def test_jobs_rendering_different_keys_each_run_the_step(mesh, run_workers):
    spec = shared()
    run_workers()
    for goal in ("one", "two"):
        assert mesh.wait(mesh.run(spec, {"goal": goal}).id, timeout_s=30).state is State.SUCCEEDED
    counted = runs(mesh)
    assert counted["one:coder"] == counted["two:coder"] == 1


def test_an_idempotent_step_retries_its_timeouts_within_max_attempts(mesh, run_workers):
    spec = check(Pipeline("patient").step("researcher", idempotent=True, retry_policy={"max_attempts": 3})
                 .build(), app)
    mesh.redis.sadd(f"{prefix(mesh.settings.namespace)}:test.timeout", "slow-1/researcher/researcher")
    run_workers()
    ref = mesh.run(spec, {"goal": "g"}, key="slow-1")
    record = wait_for(lambda: (r := mesh.status(ref.id)).state is State.DEAD_LETTERED and r, timeout_s=30)

    assert record.steps["researcher"].failure_class == "timeout"
    assert runs(mesh) == {"slow-1/researcher/researcher": 3}


def test_a_step_not_idempotent_fails_fast_on_a_timeout(mesh, run_workers):
    spec = check(Pipeline("hasty").step("researcher", retry_policy={"max_attempts": 3}).build(), app)
    mesh.redis.sadd(f"{prefix(mesh.settings.namespace)}:test.timeout", "slow-2/researcher/researcher")
    run_workers()
    ref = mesh.run(spec, {"goal": "g"}, key="slow-2")
    record = wait_for(lambda: (r := mesh.status(ref.id)).state is State.DEAD_LETTERED and r, timeout_s=30)

    assert record.steps["researcher"].failure_class == "timeout"
    assert runs(mesh) == {"slow-2/researcher/researcher": 1}
