"""Job/step lifecycle: only allowed moves, and terminal fields never leak into a new attempt."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from mesh.contracts import IllegalTransition, JobRecord, State, StepRecord, settle, transition


def step(**overrides: object) -> StepRecord:
    values: dict[str, object] = {"step_id": "a1", "agent": "executor", "key": "k/executor/a1",
                                 "created_at": 1.0, "updated_at": 1.0}
    values.update(overrides)
    return StepRecord(**values)


def job(**overrides: object) -> JobRecord:
    values: dict[str, object] = {"job_id": "j1", "key": "k", "trace_id": "ab" * 16,
                                 "created_at": 1.0, "updated_at": 1.0}
    values.update(overrides)
    return JobRecord(**values)


def test_queued_to_running_stamps_started_at() -> None:
    running = transition(step(), State.RUNNING, now=10.0)
    assert running.state is State.RUNNING
    assert running.started_at == 10.0
    assert running.updated_at == 10.0


def test_running_to_failed_sets_error_class_and_failed_at() -> None:
    running = transition(step(), State.RUNNING, now=10.0)
    failed = transition(running, State.FAILED, now=11.0, error="boom", failure_class="brownout")
    assert failed.state is State.FAILED
    assert failed.error == "boom"
    assert failed.failure_class == "brownout"
    assert failed.failed_at == 11.0
    assert failed.finished_at is None  # FAILED is not terminal: a retry is pending
    assert failed.result is None


def test_failed_to_running_scrubs_terminal_fields() -> None:
    dirty = step(state=State.FAILED, error="old", failure_class="brownout", result={"stale": True},
                 finished_at=5.0, failed_at=5.0)
    retried = transition(dirty, State.RUNNING, now=20.0)
    assert retried.state is State.RUNNING
    assert (retried.error, retried.failure_class, retried.result) == (None, None, None)
    assert (retried.finished_at, retried.failed_at) == (None, None)
    assert retried.started_at == 20.0


def test_running_to_succeeded_sets_result_and_finished_at_and_clears_error() -> None:
    running = step(state=State.RUNNING, error="leftover", failure_class="timeout", failed_at=3.0)
    done = transition(running, State.SUCCEEDED, now=30.0, result={"effect_id": "e1"})
    assert done.state is State.SUCCEEDED
    assert done.result == {"effect_id": "e1"}
    assert done.finished_at == 30.0
    assert (done.error, done.failure_class, done.failed_at) == (None, None, None)


def test_running_to_dead_lettered_is_terminal_with_finished_at() -> None:
    running = transition(step(), State.RUNNING, now=10.0)
    dead = transition(running, State.DEAD_LETTERED, now=12.0, error="nope", failure_class="permanent")
    assert (dead.error, dead.failure_class) == ("nope", "permanent")
    assert dead.failed_at == 12.0
    assert dead.finished_at == 12.0


def test_dead_lettered_to_queued_replay_scrubs_terminal_fields() -> None:
    dead = step(state=State.DEAD_LETTERED, error="nope", failure_class="permanent", result={"x": 1},
                finished_at=12.0, failed_at=12.0)
    replayed = transition(dead, State.QUEUED, now=40.0)
    assert replayed.state is State.QUEUED
    assert (replayed.error, replayed.failure_class, replayed.result) == (None, None, None)
    assert (replayed.finished_at, replayed.failed_at) == (None, None)
    assert replayed.updated_at == 40.0


def test_extra_fields_are_applied_on_transition() -> None:
    running = transition(step(), State.RUNNING, now=1.0, attempt=2, picked_up=1)
    assert (running.attempt, running.picked_up) == (2, 1)


@pytest.mark.parametrize(
    ("current", "target"),
    [
        (State.SUCCEEDED, State.RUNNING),
        (State.SUCCEEDED, State.QUEUED),
        (State.SUCCEEDED, State.FAILED),
        (State.QUEUED, State.SUCCEEDED),
        (State.DEAD_LETTERED, State.RUNNING),
        (State.AWAITING_APPROVAL, State.SUCCEEDED),
    ],
)
def test_illegal_transitions_raise_illegal_transition(current: State, target: State) -> None:
    record = step(state=current)
    with pytest.raises(IllegalTransition) as info:
        transition(record, target, now=1.0)
    assert info.value.current == current
    assert info.value.target == target
    assert "StepRecord" in str(info.value)
    assert record.state is current  # the original record is untouched


def test_job_record_transitions_and_keeps_its_type() -> None:
    running = transition(job(), State.RUNNING, now=2.0)
    assert isinstance(running, JobRecord)
    done = transition(running, State.SUCCEEDED, now=3.0, result={"ok": True})
    assert isinstance(done, JobRecord)
    assert (done.state, done.result, done.finished_at) == (State.SUCCEEDED, {"ok": True}, 3.0)
    with pytest.raises(IllegalTransition, match="JobRecord"):
        transition(done, State.RUNNING, now=4.0)


def test_transition_returns_new_record_and_leaves_original_alone() -> None:
    original = step()
    moved = transition(original, State.RUNNING, now=5.0)
    assert moved is not original
    assert original.state is State.QUEUED
    assert original.started_at is None


def test_records_are_frozen() -> None:
    with pytest.raises(ValidationError):
        step().state = State.RUNNING  # type: ignore[misc]
    with pytest.raises(ValidationError):
        job().error = "x"  # type: ignore[misc]


def test_job_with_step_adds_step_without_mutating_job() -> None:
    original = job()
    updated = original.with_step(step())
    assert set(updated.steps) == {"a1"}
    assert original.steps == {}


def test_records_keep_fields_and_states_a_newer_release_wrote_and_never_move_unknown_states():
    from mesh.contracts.jobs import known, moves, settle

    data = {"job_id": "j", "key": "k", "trace_id": "0" * 31 + "1", "state": "archived", "archive_reason": "ops",
            "steps": {"s": {"step_id": "s", "agent": "a", "key": "k/a/s", "state": "quarantined",
                            "ledger": [1], "gate": {"expr": "true", "passed": True, "why": "x"}}}}
    record = JobRecord.model_validate(data)
    assert record.state == "archived" and not known(record.state) and moves(record.state) == frozenset()
    assert record.steps["s"].state == "quarantined"
    assert record.model_dump(mode="json")["archive_reason"] == "ops"
    assert record.model_dump(mode="json")["steps"]["s"]["ledger"] == [1]
    assert record.model_dump(mode="json")["steps"]["s"]["gate"]["why"] == "x"
    assert settle(record, 1.0) is record  # a newer release's job state is that release's to move
    with pytest.raises(IllegalTransition):
        transition(record.steps["s"], State.RUNNING)
    with pytest.raises(ValueError):
        State(42)  # type: ignore[arg-type]
    assert "archived" not in set(State)  # never listed as this release's state


def dead(step_id: str, error: str, failure_class: str = "permanent", **fields: object) -> StepRecord:
    running = transition(step(step_id=step_id, key=f"k/{step_id}", **fields), State.RUNNING)
    return transition(running, State.DEAD_LETTERED, error=error, failure_class=failure_class)


def join_failed_job(*extra: StepRecord) -> JobRecord:
    """A job whose for_each step ``fetch`` (need 2) has both items dead, its join failed."""
    record = job(state=State.RUNNING)
    for s in (dead("fetch", "join not met (min_success 2): 0 of 2 items succeeded", "join", need=2),
              dead("fetch[0]", "boom", parent="fetch", index=0), dead("fetch[1]", "boom", parent="fetch", index=1),
              *extra):
        record = record.with_step(s)
    return settle(record, 1.0)


def test_a_job_whose_join_failed_names_the_join_and_its_rule_not_its_first_dead_item() -> None:
    record = join_failed_job()
    assert record.state is State.DEAD_LETTERED and record.steps["fetch"].failure_class == "join"
    assert record.failure_class == record.steps["fetch[0]"].failure_class  # the cause, not the rule
    assert record.error == "step fetch: join not met (min_success 2): 0 of 2 items succeeded"


def test_a_step_that_failed_on_its_own_is_named_before_a_failed_join() -> None:
    record = join_failed_job(dead("notify", "notify.example:443 answered 403"))
    assert record.error == "step notify: notify.example:443 answered 403"


def test_replaced_is_model_copy_with_update():
    """A record's state change copies it with ``replaced``: the record ``model_copy(update=...)`` makes
    (fields set, unknown fields kept and added), the original unchanged."""
    step = StepRecord.model_validate({"step_id": "s", "agent": "a", "key": "k", "newer": {"x": 1}})
    update = {"error": "boom", "attempt": 2, "newest": [1]}
    got, want = step.replaced(update), step.model_copy(update=update)
    assert type(got) is StepRecord
    assert (got.__dict__, got.__pydantic_extra__, got.model_fields_set) == \
        (want.__dict__, want.__pydantic_extra__, want.model_fields_set)
    assert got.model_dump_json() == want.model_dump_json()
    assert (step.error, step.attempt, step.__pydantic_extra__) == (None, 0, {"newer": {"x": 1}})
    job = JobRecord(job_id="j", key="k", trace_id="0" * 31 + "1")
    assert job.with_step(step).steps == {"s": step} and job.steps == {}
