"""The saga rules as pure changes of a job record (no Redis): which compensations are recorded, in
which order they are sent, what waits, what a failed compensation and a cancel do."""

from __future__ import annotations

from typing import Any

from mesh.agents.pipelines import Pipeline
from mesh.agents.pipelines import compensate as saga
from mesh.agents.pipelines.engine import Routes, Run, advance, after_loss, begin
from mesh.contracts import JobRecord, State, transition

UNDO = {"agent": "unbook", "input": {"ref": "output.ref"}}
RUN = Run(trace_id="4bf92f3577b34da6a3ce929d0e0e4736", deadline=2e9)


def _job(spec: Any) -> tuple[JobRecord, list[str]]:
    record = JobRecord(job_id="job-1", key="k", trace_id=RUN.trace_id, pipeline=spec.name,
                       pipeline_digest=spec.digest(), pipeline_input={"n": 3})
    record, messages, _ = begin(spec, record, RUN, Routes(), now=1.0)
    return record, _sent(messages)


def _sent(messages: list[Any]) -> list[str]:
    return [m.args[0]["step_id"] for m in messages]


def _ok(spec: Any, record: JobRecord, sid: str, now: float, result: dict[str, Any] | None = None,
        state: State = State.SUCCEEDED) -> tuple[JobRecord, list[str]]:
    step = record.steps[sid]
    if step.state is State.QUEUED:
        step = transition(step, State.RUNNING, now=now - 0.5)
    step = transition(step, state, now=now, result=result or {"ref": sid})
    record, messages = advance(spec, record.with_step(step), RUN, Routes(), [], now=now)
    return record, _sent(messages)


def _lost(spec: Any, record: JobRecord, sid: str, now: float, state: State = State.DEAD_LETTERED,
          failure_class: str = "permanent") -> tuple[JobRecord, list[str]]:
    step = record.steps[sid]
    if step.state is State.QUEUED:
        step = transition(step, State.RUNNING, now=now - 0.5)
    step = transition(step, state, now=now, error="boom", failure_class=failure_class)
    record, messages = after_loss(spec, record.with_step(step), Routes(), [], now=now)
    return record, _sent(messages)


CHAIN = (Pipeline("chain").step("a", agent="book", compensate=UNDO)
         .step("b", agent="book", depends_on=["a"], compensate=UNDO)
         .step("c", agent="book", depends_on=["b"]).build())


def test_a_failure_under_halt_pipeline_sends_the_last_completed_steps_compensation_first_then_the_next():
    record, sent = _job(CHAIN)
    record, sent = _ok(CHAIN, record, "a", 2.0)
    record, sent = _ok(CHAIN, record, "b", 3.0)
    assert sent == ["c"]
    record, sent = _lost(CHAIN, record, "c", 4.0)
    assert sent == ["undo:b"] and record.state is State.COMPENSATING
    assert record.unwind is not None and record.unwind.cause == "failed"
    assert record.failure_class == "failed" and record.error == "step c: boom"
    assert record.steps["undo:b"].input == {"ref": "b"} and record.steps["undo:b"].key == "k/book/b/undo"
    assert record.steps["undo:a"].sent_at is None  # one at a time
    record, sent = _ok(CHAIN, record, "undo:b", 5.0)
    assert sent == ["undo:a"] and record.state is State.COMPENSATING
    record, sent = _ok(CHAIN, record, "undo:a", 6.0)
    assert sent == [] and record.state is State.COMPENSATED and record.failure_class == "failed"


def test_a_failure_with_nothing_succeeded_to_undo_stays_dead_lettered_for_a_replay():
    record, _ = _job(CHAIN)
    record, sent = _lost(CHAIN, record, "a", 2.0)
    assert sent == [] and record.state is State.DEAD_LETTERED and record.unwind is None


def test_a_failed_compensation_makes_the_job_unknown_holds_the_rest_and_its_replay_takes_the_chain_up():
    record, _ = _job(CHAIN)
    record, _ = _ok(CHAIN, record, "a", 2.0)
    record, _ = _ok(CHAIN, record, "b", 3.0)
    record, _ = _lost(CHAIN, record, "c", 4.0)
    record, sent = _lost(CHAIN, record, "undo:b", 5.0, failure_class="compensation_failed")
    assert sent == [] and record.state is State.UNKNOWN
    assert record.failure_class == "compensation_failed" and record.error.startswith("compensation undo:b failed")
    # a DLQ replay queues it again: the job is compensating once more, and its success sends undo:a
    replayed = record.with_step(transition(record.steps["undo:b"], State.QUEUED, now=6.0, sent_at=6.0))
    record, sent = _ok(CHAIN, replayed, "undo:b", 7.0)
    assert sent == ["undo:a"] and record.state is State.COMPENSATING


def test_a_gate_halt_after_a_compensable_step_compensates_it():
    spec = (Pipeline("gated").step("a", agent="book", compensate=UNDO)
            .step("b", agent="book", depends_on=["a"], gate="a.ref == 'never'").build())
    record, _ = _job(spec)
    record, sent = _ok(spec, record, "a", 2.0)
    assert sent == ["undo:a"] and record.state is State.COMPENSATING
    assert record.unwind is not None and record.unwind.cause == "halted"
    assert record.steps["b"].state is State.HALTED


def test_a_step_in_flight_when_the_job_halts_is_waited_for_and_undone_first():
    spec = (Pipeline("fork").step("a", agent="book", compensate=UNDO)
            .step("b", agent="book", compensate=UNDO).step("c", agent="book").build())
    record, sent = _job(spec)
    assert sorted(sent) == ["a", "b", "c"]
    record, _ = _ok(spec, record, "a", 2.0)
    record, sent = _lost(spec, record, "c", 3.0)
    assert sent == [] and record.state is State.COMPENSATING  # b is still in flight: it ends last
    assert set(saga.compensations(record)[i].step_id for i in range(2)) == {"undo:a", "undo:b"}
    record, sent = _ok(spec, record, "b", 4.0)
    assert sent == ["undo:b"]
    record, sent = _ok(spec, record, "undo:b", 5.0)
    assert sent == ["undo:a"]


def test_an_unknown_effect_is_not_compensated_blindly_and_one_settled_not_applied_is_skipped():
    spec = (Pipeline("fork").step("a", agent="book", compensate=UNDO)
            .step("b", agent="book", compensate=UNDO).step("c", agent="book").build())
    record, _ = _job(spec)
    record, _ = _ok(spec, record, "a", 2.0)
    record, _ = _lost(spec, record, "b", 3.0, state=State.UNKNOWN, failure_class="timeout")
    record, sent = _lost(spec, record, "c", 4.0)
    assert sent == [] and record.state is State.COMPENSATING  # waits for mesh verify / mesh settle
    # mesh settle b --as not-applied: b dead-lettered, then the engine is called
    settled = record.with_step(transition(record.steps["b"], State.QUEUED, now=5.0))
    settled = settled.with_step(transition(transition(settled.steps["b"], State.RUNNING, now=5.0),
                                           State.DEAD_LETTERED, now=5.0, error="not applied"))
    record, sent = after_loss(spec, settled, Routes(), [], now=5.0)
    assert _sent(sent) == ["undo:a"] and record.steps["undo:b"].state is State.SKIPPED


def test_for_each_items_are_compensated_each_in_reverse_order_of_completion():
    spec = (Pipeline("fan").step("list", agent="scout")
            .step("get", agent="book", depends_on=["list"], for_each="list.items", compensate=UNDO)
            .step("end", agent="book", depends_on=["get"]).build())
    record, _ = _job(spec)
    record, sent = _ok(spec, record, "list", 2.0, {"items": [{"ref": "x"}, {"ref": "y"}, {"ref": "z"}]})
    assert sent == ["get[0]", "get[1]", "get[2]"]
    for sid, at in (("get[1]", 3.0), ("get[2]", 4.0), ("get[0]", 5.0)):
        record, sent = _ok(spec, record, sid, at, {"ref": sid})
    assert sent == ["end"]
    record, sent = _lost(spec, record, "end", 6.0)
    order = [sent[0]]
    for _ in range(2):
        record, sent = _ok(spec, record, order[-1], 7.0 + len(order))
        order += sent
    assert order == ["undo:get[0]", "undo:get[2]", "undo:get[1]"]
    record, _ = _ok(spec, record, order[-1], 10.0)
    assert record.state is State.COMPENSATED and "undo:get" not in record.steps


def test_cancel_stops_what_is_not_running_waits_for_a_running_step_and_undoes_it_if_it_finished():
    record, _ = _job(CHAIN)
    record, _ = _ok(CHAIN, record, "a", 2.0)
    running = record.with_step(transition(record.steps["b"], State.RUNNING, now=2.5))
    record, sent = saga.cancel(CHAIN, running, "wrong dates", Routes(), [], now=3.0)
    assert sent == [] and record.state is State.COMPENSATING and record.steps["c"].state is State.CANCELLED
    again, more = saga.cancel(CHAIN, record, "again", Routes(), [], now=3.5)
    assert again is record and more == []  # idempotent
    # b's handler returns after the cancel: recorded cancelled with its output, and undone first
    from mesh.agents.pipelines import progress
    from mesh.contracts import Envelope

    env = Envelope(key=record.steps["b"].key, job_id="job-1", step_id="b", agent="book", trace_id=RUN.trace_id,
                   deadline=2e9, payload={})

    class Out:
        def model_dump(self, mode: str = "json", by_alias: bool = False) -> dict[str, Any]:
            return {"ref": "b"}

    record, messages = progress.complete(env, Out(), spec=CHAIN, routes=Routes())(record)  # type: ignore[arg-type]
    assert record.steps["b"].state is State.CANCELLED and record.steps["b"].result == {"ref": "b"}
    assert _sent(messages) == ["undo:b"]
    record, sent = _ok(CHAIN, record, "undo:b", 5.0)
    record, sent = _ok(CHAIN, record, "undo:a", 6.0)
    assert record.state is State.COMPENSATED and record.error == "cancelled: wrong dates"


def test_cancel_with_nothing_to_undo_ends_the_job_cancelled():
    record, _ = _job(CHAIN)
    record, sent = saga.cancel(CHAIN, record, "", Routes(), [], now=2.0)
    assert record.state is State.CANCELLED and record.failure_class == "cancelled" and sent == []
    assert all(s.state is State.CANCELLED for s in record.steps.values())


def test_cancel_withdraws_a_step_awaiting_approval():
    spec = (Pipeline("approve").step("a", agent="book", compensate=UNDO)
            .step("b", agent="book", depends_on=["a"], requires_human_approval=True).build())
    record, _ = _job(spec)
    record, sent = _ok(spec, record, "a", 2.0)
    assert sent == [] and record.steps["b"].state is State.AWAITING_APPROVAL
    record, sent = saga.cancel(spec, record, "no", Routes(), [], now=3.0)
    assert record.steps["b"].state is State.CANCELLED and "withdrawn from approval" in (record.steps["b"].error or "")
    assert _sent(sent) == ["undo:a"]


def test_a_compensating_tool_must_be_declared_and_given_the_args_it_requires() -> None:
    import pytest

    from mesh.agents.pipelines.validate import problems
    from mesh.contracts import ConfigError
    from tests.pipelines.saga import app as saga_app

    def found(compensate: dict) -> list[str]:
        spec = Pipeline("p").step("flight", agent="book", compensate=compensate).build()
        return [p.message for p in problems(spec, saga_app)]

    assert found({"tool": "release", "input": {"url": "output.url", "seat": "output.ref"}}) == []
    assert any("tool 'refund', which app 'saga' does not declare" in m for m in found({"tool": "refund"}))
    assert any("no 'seat'" in m for m in found({"tool": "release", "input": {"url": "output.url"}}))
    with pytest.raises(ConfigError, match="exactly one of agent: and tool:"):
        Pipeline("p").step("flight", agent="book", compensate={"agent": "unbook", "tool": "release"}).build()


def test_a_success_applied_again_to_the_step_it_ended_cancelled_changes_nothing_and_sends_no_second_undo():
    # A success's write sent again after it landed (its answer lost: a transaction retried, a shared
    # key's write) computes the change again from the record it wrote: a step it ended cancelled could
    # not be ended twice, and the attempt failed after its success was recorded.
    from mesh.agents.pipelines import progress
    from mesh.contracts import Envelope

    record, _ = _job(CHAIN)
    record, _ = _ok(CHAIN, record, "a", 2.0)
    running = record.with_step(transition(record.steps["b"], State.RUNNING, now=2.5))
    record, _ = saga.cancel(CHAIN, running, "wrong dates", Routes(), [], now=3.0)
    env = Envelope(key=record.steps["b"].key, job_id="job-1", step_id="b", agent="book", trace_id=RUN.trace_id,
                   deadline=2e9, payload={})

    class Out:
        def model_dump(self, mode: str = "json", by_alias: bool = False) -> dict[str, Any]:
            return {"ref": "b"}

    change = progress.complete(env, Out(), spec=CHAIN, routes=Routes())  # type: ignore[arg-type]
    record, messages = change(record)
    assert record.steps["b"].state is State.CANCELLED and _sent(messages) == ["undo:b"]

    again, more = change(record)

    assert again is record and more == []
