"""Human approvals over real workers and Redis: an approved step runs once with exactly the call
approved; a denial applies the step's failure_mode; the first decision wins; a decision after the
timeout is refused; an expiry denies or escalates to the DLQ, whose replay asks again."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mesh import MeshClient
from mesh.agents.pipelines import Pipeline
from mesh.broker import approvals
from mesh.broker.clock import server_ms
from mesh.broker.keys import prefix
from mesh.contracts import State
from mesh.dlq.replay import Replayer
from mesh.dlq.store import DeadLetterStore
from tests.conftest import wait_for
from tests.pipelines.agents import app
from tests.pipelines.test_engine import runs


def spec_with(approval: Any = True, failure_mode: str = "halt_pipeline", **extra: Any) -> Any:
    step: dict[str, Any] = {"depends_on": ["researcher"], "failure_mode": failure_mode}
    if approval is True:
        step["requires_human_approval"] = True
    else:
        step["approval"] = approval
    built = (Pipeline("approve").step("researcher").step("coder", **step, **extra)
             .step("report", agent="researcher", depends_on=["coder"], input={"goal": "input.goal"}).build())
    return load_pipeline_spec(built)


def load_pipeline_spec(spec: Any) -> Any:
    from mesh.agents.pipelines.validate import check

    check(spec, app)
    return spec


def parked(mesh: MeshClient, job_id: str, step: str = "coder") -> Any:
    return wait_for(lambda: (r := mesh.status(job_id)).steps[step].state is State.AWAITING_APPROVAL and r)


def trace_kinds(mesh: MeshClient, job_id: str) -> list[str]:
    from mesh.contracts import loads

    return [loads(f[b"e"])["event"] for _, f in mesh.redis.xrange(mesh.keys_of(job_id).trace(job_id))]


def test_an_approved_step_runs_once_and_the_job_goes_on(mesh, run_workers):
    run_workers()
    ref = mesh.run(spec_with(), {"goal": "g"})
    record = parked(mesh, ref.id)
    assert record.state is State.AWAITING_APPROVAL
    [waiting] = mesh.approvals()
    assert (waiting.job_id, waiting.step.step_id) == (ref.id, "coder") and waiting.expires_at is not None

    mesh.approve(ref.id, "coder", note="looks fine", by="ana")
    record = mesh.wait(ref.id, timeout_s=30)

    assert record.state is State.SUCCEEDED, record.error
    approval = record.steps["coder"].approval
    assert (approval.decision, approval.by, approval.note) == ("approved", "ana", "looks fine")
    assert runs(mesh)[record.steps["coder"].key] == 1
    assert mesh.approvals() == []
    assert "approved" in trace_kinds(mesh, ref.id)
    [audit] = approvals.audit(mesh.redis, mesh.keys_of(ref.id))
    assert audit["op"] == "approved" and audit["detail"]["by"] == "ana" and audit["detail"]["hash"] == approval.hash
    assert mesh.redis.zcard(mesh.keys_of(ref.id).timers) == 0


def test_a_denial_halts_the_job_like_a_false_gate(mesh, run_workers):
    run_workers()
    ref = mesh.run(spec_with(), {"goal": "g"})
    parked(mesh, ref.id)
    record = mesh.deny(ref.id, "coder", reason="not today", by="bo")

    assert record.state is State.HALTED and "denied by bo: not today" in record.error
    assert record.steps["coder"].state is State.HALTED and record.steps["report"].state is State.NOT_RUN
    assert record.failure_class == "approval_denied"
    assert "coder" not in {k.rsplit("/", 1)[-1] for k in runs(mesh)}


def test_a_denial_under_continue_skips_the_step_and_its_dependents_run(mesh, run_workers):
    run_workers()
    ref = mesh.run(spec_with(failure_mode="continue"), {"goal": "g"})
    parked(mesh, ref.id)
    mesh.deny(ref.id, "coder", reason="skip it")
    record = mesh.wait(ref.id, timeout_s=30)
    assert record.state is State.SUCCEEDED
    assert record.steps["coder"].state is State.SKIPPED and record.steps["report"].state is State.SUCCEEDED


def test_the_second_decision_is_told_which_won(mesh, run_workers):
    run_workers()
    ref = mesh.run(spec_with(), {"goal": "g"})
    parked(mesh, ref.id)
    mesh.deny(ref.id, "coder", reason="no", by="first")
    with pytest.raises(approvals.AlreadyDecided) as lost:
        mesh.approve(ref.id, "coder", by="second")
    assert lost.value.decision == "denied" and lost.value.by == "first"


@pytest.mark.slow
def test_an_expired_approval_is_denied_never_early_and_a_late_decision_is_refused(mesh, run_workers):
    run_workers()
    ref = mesh.run(spec_with({"timeout": "2s"}), {"goal": "g"})
    record = parked(mesh, ref.id)
    due_ms = approvals.expiry_due_ms(mesh.redis, mesh.keys_of(ref.id), ref.id, record.steps["coder"])
    record = wait_for(lambda: (r := mesh.status(ref.id)).state is State.HALTED and r, timeout_s=10)
    fired_ms = server_ms(mesh.redis)

    assert record.steps["coder"].approval.decision == "expired"
    assert record.steps["coder"].approval.at * 1000 >= due_ms  # never early, by the Redis clock
    assert fired_ms - due_ms < 1500
    with pytest.raises(approvals.AlreadyDecided):
        mesh.approve(ref.id, "coder")


def test_a_decision_after_the_due_time_is_refused_before_any_worker_fired_it(mesh):
    # no worker runs: the root step parks at submit and nothing fires its timer
    ref = mesh.run(Pipeline("root").step("researcher", approval={"timeout": "1s"}).build(), {"goal": "g"})
    record = mesh.status(ref.id)
    assert record.state is State.AWAITING_APPROVAL
    due = approvals.expiry_due_ms(mesh.redis, mesh.keys_of(ref.id), ref.id, record.steps["researcher"])
    wait_for(lambda: server_ms(mesh.redis) >= due, timeout_s=5)
    with pytest.raises(approvals.ApprovalExpired):
        mesh.approve(ref.id, "researcher")
    assert mesh.status(ref.id).steps["researcher"].state is State.AWAITING_APPROVAL


@pytest.mark.slow
def test_an_escalated_expiry_is_dead_lettered_and_its_replay_asks_again(mesh, run_workers, settings):
    run_workers()
    ref = mesh.run(spec_with({"timeout": "1s", "on_timeout": "escalate"}), {"goal": "g"})
    parked(mesh, ref.id)
    record = wait_for(lambda: (r := mesh.status(ref.id)).state is State.DEAD_LETTERED and r, timeout_s=10)
    assert record.steps["coder"].failure_class == "approval_expired"
    dlq = DeadLetterStore(mesh.redis, mesh.keys_of(ref.id))
    [stored] = list(Replayer(dlq, settings).entries())
    assert stored.entry.failure_class == "approval_expired"

    Replayer(dlq, settings).replay([stored])
    record = wait_for(lambda: (r := mesh.status(ref.id)).steps["coder"].state is State.AWAITING_APPROVAL
                      and r.steps["coder"].approval.asks == 2 and r, timeout_s=10)
    assert record.state is State.AWAITING_APPROVAL
    assert record.steps["coder"].key not in runs(mesh)  # asked again, never run
    mesh.approve(ref.id, "coder")
    record = mesh.wait(ref.id, timeout_s=30)
    assert record.state is State.SUCCEEDED and runs(mesh)[record.steps["coder"].key] == 1


def metrics(mesh: MeshClient) -> dict[str, float]:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from mesh.ops.metrics import MeshCollector

    registry = CollectorRegistry()
    registry.register(MeshCollector(mesh))
    return {s.name: s.value for f in text_string_to_metric_families(generate_latest(registry).decode())
            for s in f.samples if not s.labels}


@pytest.mark.slow
def test_a_warning_fires_warn_before_the_expiry_and_the_metrics_count_what_waits(mesh, run_workers):
    run_workers()
    ref = mesh.run(spec_with({"timeout": "4s", "warn_before": "3s"}), {"goal": "g"})
    record = parked(mesh, ref.id)
    due = approvals.expiry_due_ms(mesh.redis, mesh.keys_of(ref.id), ref.id, record.steps["coder"])
    seen = metrics(mesh)
    assert seen["mesh_approvals_pending"] == 1 and 0 <= seen["mesh_approval_oldest_age_seconds"] < 4

    wait_for(lambda: "approval_warning" in trace_kinds(mesh, ref.id), timeout_s=5, interval_s=0.01)
    warned_ms = server_ms(mesh.redis)
    assert mesh.status(ref.id).steps["coder"].state is State.AWAITING_APPROVAL  # warned, not expired
    assert due - 3000 <= warned_ms < due - 1500
    assert metrics(mesh)["mesh_approval_warnings_total"] == 1
    assert [a["op"] for a in approvals.audit(mesh.redis, mesh.keys_of(ref.id))] == ["warning"]

    wait_for(lambda: mesh.status(ref.id).state is State.HALTED, timeout_s=10)
    seen = metrics(mesh)
    assert seen["mesh_approvals_pending"] == 0 and seen["mesh_approvals_expired_total"] == 1


def test_a_job_waiting_for_approval_has_no_ttl_even_when_another_branch_ended_it_then_takes_one(mesh, run_workers):
    spec = load_pipeline_spec(Pipeline("two").step("researcher").step(
        "coder", depends_on=["researcher"], requires_human_approval=True)
        .step("other", agent="researcher", depends_on=["researcher"], input={"goal": "input.goal"}).build())
    # other is sent in the write that parks coder, then dead-lettered: the failure's settlement
    # (broker/consumer.py) writes the ended job while coder waits
    mesh.redis.sadd(f"{prefix(mesh.settings.namespace)}:test.fail", "ttl-1/researcher/other")
    run_workers()
    ref = mesh.run(spec, {"goal": "g"}, key="ttl-1")
    record = wait_for(lambda: (r := mesh.status(ref.id)).steps["other"].state is State.DEAD_LETTERED
                      and r.steps["coder"].state is State.AWAITING_APPROVAL and r, timeout_s=15)
    assert record.state is State.DEAD_LETTERED  # the job ended, but a step still waits for a person
    keys = mesh.keys_of(ref.id)  # the job's shard
    assert mesh.redis.ttl(keys.job(ref.id)) == -1 and mesh.redis.ttl(keys.trace(ref.id)) == -1
    mesh.deny(ref.id, "coder", reason="no")  # nothing waits any more: the retention clock starts
    assert mesh.redis.ttl(keys.job(ref.id)) > 0 and mesh.redis.ttl(keys.trace(ref.id)) > 0


def test_status_jobs_and_trace_show_the_wait_and_the_decision_with_its_cause(mesh, cli):
    ref = mesh.run(Pipeline("shown").step("researcher", approval={"timeout": "1h", "approvers": ["ana"]}).build(),
                   {"goal": "g"}, key="shown-1")
    status = cli("status", ref.id)
    assert "awaiting_approval" in status.stdout and "waits for a human's approval" in status.stdout
    assert "then deny; approvers ana" in " ".join(status.stdout.split())
    listed = cli("jobs", "--state", "awaiting_approval", "--json")
    assert [j["job_id"] for j in json.loads(listed.stdout)] == [ref.id]

    mesh.deny(ref.id, "researcher", reason="too risky", by="ana")
    status = " ".join(cli("status", "shown-1").stdout.split())
    assert "halted" in status and "denied by ana" in status and "too risky" in status
    trace = " ".join(cli("trace", ref.id).stdout.split())
    assert "awaiting_approval" in trace and "denied by ana" in trace
    dag = json.loads(cli("status", ref.id, "--json").stdout)["dag"]
    assert dag[0]["approval"]["decision"] == "denied"


def test_a_for_each_step_is_approved_as_a_whole_before_it_fans_out(mesh, run_workers):
    from mesh.agents.pipelines import check

    spec = check(Pipeline("fan").step("scout")
                 .step("fetch", depends_on=["scout"], for_each="scout.sources", requires_human_approval=True)
                 .step("digest", depends_on=["fetch"]).build(), app)
    run_workers()
    ref = mesh.run(spec, {"goal": "g", "count": 3}, key="fan-ok")
    record = parked(mesh, ref.id, "fetch")
    assert [s for s in record.steps if s.startswith("fetch[")] == []  # nothing fanned out yet
    assert len(record.steps["fetch"].input["items"]) == 3  # the call asked for: its list of items

    mesh.approve(ref.id, "fetch")
    record = mesh.wait(ref.id, timeout_s=30)
    assert record.state is State.SUCCEEDED, record.error
    assert record.result["digest"]["pages"] == 3
    assert sorted(k for k in runs(mesh) if "/fetch/" in k) == [f"fan-ok/fetch/fetch/{i}" for i in range(3)]


def test_a_job_a_newer_release_moved_is_not_decided_here():
    from mesh.agents.pipelines.approvals import decision
    from mesh.agents.pipelines.engine import Routes, park
    from mesh.agents.pipelines.spec import ApprovalPolicy
    from mesh.broker.approvals import NotAwaiting, Verdict
    from mesh.contracts import JobRecord, StepRecord
    from mesh.contracts.approvals import Decision

    spec = Pipeline("p").step("researcher", requires_human_approval=True).build()
    record = JobRecord(job_id="j", key="k", trace_id="0" * 32, pipeline="p", pipeline_digest=spec.digest())
    rec = park(record, StepRecord(step_id="researcher", agent="researcher", key="k/r"), ApprovalPolicy(), {},
               "k/r", deadline_left_s=60, token_budget=None, now=1.0)
    record = record.with_step(rec).model_copy(update={"state": State("superseded")})
    with pytest.raises(NotAwaiting, match="newer release"):
        decision(spec, Routes(), Verdict("researcher", Decision.EXPIRED, by="timeout"), [], [])(record)


def test_a_cancel_withdraws_the_waiting_step_with_its_timers_and_a_later_decision_is_refused(mesh):
    ref = mesh.run(Pipeline("root").step("researcher", approval={"timeout": "1h", "warn_before": "10m"}).build(),
                   {"goal": "g"})
    assert mesh.redis.zcard(mesh.keys_of(ref.id).timers) == 2 and len(mesh.approvals()) == 1
    record = mesh.cancel(ref.id, reason="changed my mind")
    assert record.state is State.CANCELLED
    assert mesh.redis.zcard(mesh.keys_of(ref.id).timers) == 0 and mesh.approvals() == []
    with pytest.raises(approvals.NotAwaiting):
        mesh.approve(ref.id, "researcher")
