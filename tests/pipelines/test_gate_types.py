"""A condition is checked at load, not at 3 a.m.: a ``gate`` or ``when`` comparing values of types
that cannot be compared (a float field with a string) is a load error with FILE:LINE; one that still
cannot be evaluated when it runs (the job's input is not typed) dead-letters its step
``invalid_output`` with the condition and the values it read, never halts or skips it."""

from __future__ import annotations

from pathlib import Path
from textwrap import dedent
from typing import Any

import pytest
from pydantic import BaseModel

from mesh import App, Context
from mesh.agents.pipelines import Pipeline, PipelineError, engine, load_pipeline
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


triage = App("triage")


class Ticket(BaseModel):
    text: str


class Triage(BaseModel):
    urgency: float
    label: str = ""
    tags: list[str] = []
    flagged: bool = False
    score: float | None = None
    extra: dict[str, Any] = {}


@triage.agent
def classify(ctx: Context, ticket: Ticket) -> Triage:
    """Rates a ticket."""
    return Triage(urgency=0.5)


@triage.agent
def act(ctx: Context, rated: Triage) -> Ticket:
    """Acts on a rated ticket (the output of classify, its one dependency)."""
    return Ticket(text=rated.label)


FLOW = """
name: triage
agents:
  - id: classify
  - id: act
    depends_on: [classify]
    gate: {gate}
"""


def problems(tmp_path: Path, gate: str) -> list[str]:
    path = tmp_path / "flow.yaml"
    path.write_text(dedent(FLOW).lstrip().format(gate=gate))
    with pytest.raises(PipelineError) as caught:
        load_pipeline(path, triage)
    return [str(e).replace(str(path), "flow.yaml") for e in caught.value.errors]


def test_a_gate_comparing_a_float_field_with_a_string_is_a_load_error_with_file_and_line(tmp_path: Path) -> None:
    assert problems(tmp_path, "'classify.urgency >= \"high\"'") == [
        "flow.yaml:6: step 'act': gate 'classify.urgency >= \"high\"' compares classify.urgency (float) >= "
        "\"high\" (string); CEL has no >= between a number and a string: it would fail when the step is due"]


@pytest.mark.parametrize(("gate", "says"), [
    ("'classify.label == 3'", "label (str) == 3 (int); a string is never equal to a number: == is always false"),
    ("'classify.flagged > 0'", "flagged (bool) > 0 (int); CEL has no > between a bool and a number"),
    ("'classify.tags != \"x\"'", "tags (list[str]) != \"x\" (string); a list is never equal to a string: != is "
                                 "always true"),
    ("'classify.score + 1.0 > 0.5 || classify.urgency * \"2\" > 1.0'", "urgency (float) * \"2\" (string)"),
    ("'classify.label - classify.label == \"\"'", "label (str) - classify.label (str); CEL has no - between a "
                                                  "string and a string"),
    ("'classify.score < \"a\"'", "score (float | None) < \"a\" (string)"),
    ("'{{classify.urgency}} >= \"high\"'", "urgency (float) >= \"high\""),
    ("'task_id > 1'", "compares task_id (str) > 1 (int)"),
])
def test_clearly_incompatible_operands_are_load_errors(tmp_path: Path, gate: str, says: str) -> None:
    found = problems(tmp_path, gate)
    assert len(found) == 1 and found[0].startswith("flow.yaml:6: step 'act': gate ") and says in found[0], found


@pytest.mark.parametrize("gate", [
    "'classify.urgency >= 0.85'", "'classify.urgency >= 1'", "'classify.urgency > 1u'", "'classify.label >= \"b\"'",
    "'classify.score == null'", "'classify.extra.level == \"high\"'", "'input.urgency >= \"high\"'",
    "'classify.urgency + 1.0 >= 2.0'", "'classify.tags + [\"x\"] == classify.tags'", "'classify.flagged == true'",
    "'size(classify.label) > 2'", "'classify.tags.exists(t, t == \"x\")'", "'-classify.urgency < 1.0'",
    "'classify.label + \"x\" == \"ax\"'", "'classify.urgency >= 0.5 ? true : \"x\" == \"y\"'",
])
def test_what_may_hold_or_is_not_known_passes(tmp_path: Path, gate: str) -> None:
    path = tmp_path / "flow.yaml"
    path.write_text(dedent(FLOW).lstrip().format(gate=gate))
    assert load_pipeline(path, triage).step("act").gate is not None
