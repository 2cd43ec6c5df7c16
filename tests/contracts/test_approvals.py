"""The pure parts of approvals: durations as written, the hash of the exact call, the policy's
checks, the approvers check a console makes, and who may decide what when (no Redis, no clock)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from mesh.agents.pipelines import Pipeline
from mesh.agents.pipelines.engine import approved, park
from mesh.agents.pipelines.spec import ApprovalPolicy
from mesh.broker.approvals import NotAnApprover, check_approver
from mesh.contracts import JobRecord, State, StepRecord
from mesh.contracts.approvals import Approval, Decision, call_hash, parse_duration, show_duration


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30), ("10m", 600), ("24h", 86400), ("500ms", 0.5),
                                               ("2d", 172800), (" 1.5h ", 5400), (45, 45)])
def test_durations_are_written_30s_10m_24h(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "24", "1w", "-5s", "0s", "h", "ten minutes", True])
def test_a_duration_not_written_so_is_refused(text):
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_a_duration_is_shown_as_it_is_written():
    assert [show_duration(s) for s in (0.4, 45, 90, 3600, 86400, 5430)] == ["0s", "45s", "1m30s", "1h", "24h",
                                                                          "1h30m30s"]


def test_the_hash_covers_the_input_the_key_and_the_spec_digest_and_nothing_else():
    base = call_hash({"b": 1, "a": [1, 2]}, "k", "d1")
    assert base == call_hash({"a": [1, 2], "b": 1}, "k", "d1")  # key order does not matter
    assert len({base, call_hash({"b": 2, "a": [1, 2]}, "k", "d1"), call_hash({"b": 1, "a": [1, 2]}, "k2", "d1"),
                call_hash({"b": 1, "a": [1, 2]}, "k", "d2")}) == 4


def test_the_policy_checks_its_durations_and_that_the_warning_comes_before_the_timeout():
    assert ApprovalPolicy().timeout_s == 86400 and ApprovalPolicy().on_timeout == "deny"
    with pytest.raises(ValidationError, match="duration"):
        ApprovalPolicy(timeout="a day")
    with pytest.raises(ValidationError, match="not shorter than its timeout"):
        ApprovalPolicy(timeout="1h", warn_before="1h")
    with pytest.raises(ValidationError):
        ApprovalPolicy(on_timeout="ignore")


def test_requires_human_approval_alone_takes_the_defaults_and_approval_implies_it():
    spec = Pipeline("p").step("a", requires_human_approval=True).step("b", approval={"timeout": "10m"}).build()
    a, b = spec.step("a"), spec.step("b")
    assert a.approval is None and a.approval_policy == ApprovalPolicy()
    assert b.requires_human_approval and b.approval_policy.timeout_s == 600


def test_a_spec_without_approvals_keeps_the_digest_it_always_had():
    spec = Pipeline("p").step("a").build()
    assert b'"approval"' not in spec.canonical()


def test_the_approvers_check_is_for_front_ends_that_know_who_decides():
    approval = Approval(hash="h", asked_at=0, timeout_s=60, approvers=("ana",))
    check_approver(approval, "ana")
    check_approver(Approval(hash="h", asked_at=0, timeout_s=60), "anyone")  # no approvers: anyone
    with pytest.raises(NotAnApprover, match="bo is not among the approvers"):
        check_approver(approval, "bo")


def test_a_step_holds_an_approval_only_of_the_exact_call_approved():
    record = JobRecord(job_id="j", key="k", trace_id="0" * 32, pipeline_digest="d")
    rec = StepRecord(step_id="s", agent="a", key="k/a/s")
    parked = park(record, rec, ApprovalPolicy(timeout="1h", warn_before="10m"), {"x": 1}, "k/a/s",
                  deadline_left_s=30, token_budget=None, now=100.0)
    assert parked.state is State.AWAITING_APPROVAL and parked.sent_at is None
    assert parked.approval.hash == call_hash({"x": 1}, "k/a/s", "d") and parked.approval.warn_before_s == 600
    assert not approved(parked, parked.approval.hash)  # asked, not decided
    yes = parked.model_copy(update={"approval": parked.approval.model_copy(update={"decision": Decision.APPROVED})})
    assert approved(yes, call_hash({"x": 1}, "k/a/s", "d"))
    assert not approved(yes, call_hash({"x": 2}, "k/a/s", "d"))
    again = park(record, yes, ApprovalPolicy(), {"x": 2}, "k/a/s", deadline_left_s=30, token_budget=None, now=200.0)
    assert again.approval.asks == 2 and again.approval.decision is None
