"""A condition is checked at load, not at 3 a.m.: a ``gate`` or ``when`` comparing values of types
that cannot be compared (a float field with a string) is a load error with FILE:LINE; one that still
cannot be evaluated when it runs (the job's input is not typed) dead-letters its step
``invalid_output`` with the condition and the values it read, never halts or skips it."""

from __future__ import annotations

from typing import Any

import pytest

from mesh.agents.pipelines import Pipeline, engine
from mesh.contracts import JobRecord, State, transition

RUN = engine.Run(trace_id="0" * 31 + "1", deadline=2e9)


def _job(spec: Any, pipeline_input: dict[str, Any]) -> tuple[JobRecord, list[dict[str, Any]]]:
    record = JobRecord(job_id="j", key="k", trace_id=RUN.trace_id, created_at=0, updated_at=0, pipeline=spec.name,
                       pipeline_digest=spec.digest(), pipeline_input=pipeline_input)
    record, _, events = engine.begin(spec, record, RUN, engine.Routes(), now=1.0)
    return record, events


def _ran(record: JobRecord, step_id: str, result: dict[str, Any]) -> JobRecord:
    step = transition(transition(record.steps[step_id], State.RUNNING, now=1.0), State.SUCCEEDED, now=1.0,
                      result=result)
    return record.with_step(step)


@pytest.mark.parametrize(("field", "failure_mode"), [("gate", "halt_pipeline"), ("gate", "continue"),
                                                     ("when", "halt_pipeline")])
def test_a_condition_that_cannot_be_evaluated_dead_letters_its_step_with_the_values(field: str,
                                                                                     failure_mode: str) -> None:
    # the job's input is not typed: `input.level` is a string only when the run says so
    cond = "researcher.confidence >= input.level"
    spec = (Pipeline("typed").step("researcher")
            .step("coder", depends_on=["researcher"], failure_mode=failure_mode, **{field: cond}).build())
    record, _ = _job(spec, {"goal": "g", "level": "high"})
    events: list[dict[str, Any]] = []
    record, messages = engine.advance(spec, _ran(record, "researcher", {"summary": "s", "confidence": 0.7}), RUN,
                                      engine.Routes(), events, now=2.0)

    coder = record.steps["coder"]
    assert messages == [] and coder.sent_at is None
    assert (coder.state, coder.failure_class) == (State.DEAD_LETTERED, "invalid_output")  # before: halted / skipped
    assert record.state is State.DEAD_LETTERED
    assert (coder.error or "").startswith(f"{field} {cond!r} could not be evaluated (researcher.confidence = 0.7, "
                                          "input.level = 'high'): cannot evaluate: ")
    refused = [e for e in events if e.get("step_id") == "coder"]
    assert [e["event"] for e in refused] == ["input_refused"]
    assert refused[0]["expression"] == cond
    assert refused[0]["values"] == {"researcher.confidence": 0.7, "input.level": "high"}


def test_a_condition_giving_no_boolean_dead_letters_its_step() -> None:
    spec = Pipeline("nobool").step("researcher", when="input.goal").build()
    record, events = _job(spec, {"goal": "g"})
    step = record.steps["researcher"]
    assert (step.state, step.failure_class) == (State.DEAD_LETTERED, "invalid_output")
    assert step.error == "when 'input.goal' could not be evaluated (input.goal = 'g'): gave 'g', not true or false"
    assert [e["event"] for e in events] == ["input_refused"]


def test_an_items_gate_that_cannot_be_evaluated_dead_letters_the_for_each_step_sending_nothing() -> None:
    spec = (Pipeline("items").step("scout", agent="researcher")
            .step("fetch", depends_on=["scout"], for_each="scout.sources", gate="item.score >= input.level",
                  failure_mode="continue").build())
    record, _ = _job(spec, {"goal": "g", "level": "high"})
    sources = [{"url": "u", "score": 1.0}]
    events: list[dict[str, Any]] = []
    record, messages = engine.advance(spec, _ran(record, "scout", {"summary": "s", "sources": sources}), RUN,
                                      engine.Routes(), events, now=2.0)
    fetch = record.steps["fetch"]
    assert messages == [] and (fetch.state, fetch.failure_class) == (State.DEAD_LETTERED, "invalid_output")
    assert (fetch.error or "").startswith("for_each item 0: gate 'item.score >= input.level' could not be evaluated "
                                          "(item.score = 1.0, input.level = 'high')")
    assert not any(s.parent == "fetch" for s in record.steps.values())
