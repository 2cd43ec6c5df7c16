"""Data that cannot flow is a load error, not a dead letter at 3 a.m.: every step's input (its
``input:`` fields, or what it takes by default) is checked against its agent's input model, and a
compensation's against its agent's (or tool's args), each error at its FILE:LINE. ``input_schema``
types the job's input the same way."""

from __future__ import annotations

from pathlib import Path
from textwrap import dedent
from typing import Annotated, Any, Literal

import pytest
from pydantic import BaseModel, BeforeValidator, ConfigDict, field_validator

from mesh import App, Context, Receipt, ToolContext
from mesh.agents.pipelines import Pipeline, PipelineError, load_pipeline
from mesh.contracts import ConfigError

alerts = App("alerts")


class Ticket(BaseModel):
    text: str
    priority: int = 0
    team: str | None = None


class Rating(BaseModel):
    urgency: float
    label: Literal["low", "high"] = "low"
    level: int = 1
    note: str | None = None
    tags: list[str] = []
    who: Ticket | None = None
    extra: Any = None


class Address(BaseModel):
    channel: str
    target: str = ""


class Notice(BaseModel):
    """What ``notify`` takes: an unknown field is ignored by the model, but a load error here."""

    channel: str
    body: str = ""
    weight: float = 1.0
    to: Address | None = None
    labels: list[str] = []
    meta: dict[str, int] = {}


class Loose(BaseModel):
    """Fields whose own validators see the value first: what they take is not what they say."""

    channel: str
    level: Annotated[int, BeforeValidator(lambda v: round(float(v)))] = 0

    @field_validator("channel", mode="before")
    @classmethod
    def _text(cls, v: Any) -> Any:
        return str(v)


class Sent(BaseModel):
    channel: str
    receipt: str


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")
    urgency: float


class Recall(BaseModel):
    receipt: str


@alerts.agent
def classify(ctx: Context, ticket: Ticket) -> Rating:
    return Rating(urgency=0.5)


@alerts.agent
def notify(ctx: Context, notice: Notice) -> Sent:
    return Sent(channel=notice.channel, receipt="r")


@alerts.agent
def loose(ctx: Context, notice: Loose) -> Sent:
    return Sent(channel=notice.channel, receipt="r")


@alerts.agent
def strict(ctx: Context, data: Strict) -> Sent:
    return Sent(channel="c", receipt="r")


@alerts.agent
def recall(ctx: Context, recall: Recall) -> Sent:
    return Sent(channel="c", receipt=recall.receipt)


@alerts.tool(effect=True)
def unsend(ctx: ToolContext, args: Recall) -> Receipt:
    return Receipt(tool="unsend", effect_id=args.receipt)


def load(tmp_path: Path, text: str) -> Any:
    path = tmp_path / "flow.yaml"
    path.write_text(dedent(text).lstrip())
    return load_pipeline(path, alerts)


def errors(tmp_path: Path, text: str) -> list[str]:
    """The ``FILE:LINE: message`` lines loading ``text`` gives (it must fail)."""
    with pytest.raises(PipelineError) as caught:
        load(tmp_path, text)
    return [str(e).replace(str(tmp_path / "flow.yaml"), "flow.yaml") for e in caught.value.errors]


FLOW = """
name: alert
agents:
  - id: classify
  - id: notify
    depends_on: [classify]
    input:
      {field}: {expr}
      body: '"urgent"'
"""


def test_a_misspelled_input_field_is_a_load_error_naming_the_fields_there_are(tmp_path: Path) -> None:
    assert errors(tmp_path, FLOW.format(field="chanel", expr='classify.label')) == [
        "flow.yaml:6: step 'notify': input gives no 'channel', which Notice (the input of agent 'notify') requires",
        "flow.yaml:7: step 'notify': input field 'chanel' is not a field of Notice (the input of agent 'notify'); "
        "its fields: channel, body, weight, to, labels, meta"]


def test_an_input_field_of_the_wrong_type_is_a_load_error_at_its_line(tmp_path: Path) -> None:
    assert errors(tmp_path, FLOW.format(field="channel", expr="classify.urgency")) == [
        "flow.yaml:7: step 'notify': input field 'channel' gives float, but Notice.channel is str: "
        "a float is no str"]
    # a field whose own validator sees the value first takes what that validator takes: not checked
    loose = FLOW.format(field="channel", expr="classify.urgency\n      level: classify.label").replace(
        "body: '\"urgent\"'", "").replace("- id: notify", "- id: notify\n    agent: loose")
    assert load(tmp_path, loose).step("notify").agent == "loose"
    found = errors(tmp_path, FLOW.format(field="channel", expr='classify.label\n      weight: classify.note'))
    assert found == ["flow.yaml:8: step 'notify': input field 'weight' gives str | None, but Notice.weight is "
                     "float: a str is no float"]
    found = errors(tmp_path, FLOW.format(field="channel", expr="classify.label\n      labels: classify.urgency"))
    assert len(found) == 1 and "input field 'labels' gives float, but Notice.labels is list[str]" in found[0]
    found = errors(tmp_path, FLOW.format(field="channel", expr="classify.label\n      meta.x: classify.label"))
    assert found == ["flow.yaml:8: step 'notify': input field 'meta.x' gives Literal['low', 'high'], but meta is "
                     "dict[str, int]: a Literal['low', 'high'] is no int"]


@pytest.mark.parametrize("expr", [
    "classify.label",                       # a Literal of strings into a str
    "classify.note",                        # Optional[str]: a null is left out
    "classify.extra",                       # Any
    'string(classify.urgency)',             # a conversion gives a string
    '"{{classify.label}}"',                 # a path in braces is the path
    "\"classify.urgency > 0.5 ? 'page' : 'mail'\"",   # not known at load: checked when it runs
    "classify.who.text",                    # a nested model's field
    "input.team",                           # Optional[str] of the job's input (its input_schema)
])
def test_what_fits_or_is_not_known_loads(tmp_path: Path, expr: str) -> None:
    text = FLOW.format(field="channel", expr=expr) + "      weight: classify.level\n      labels: classify.tags\n" \
        "      to.channel: classify.label\n      meta: '{\"a\": 1}'\n"
    spec = load(tmp_path, text.replace("name: alert", "name: alert\ninput_schema: ticket"))
    assert spec.step("notify").input is not None and spec.input_schema == "ticket"


def test_a_step_without_input_must_be_given_what_its_agent_requires(tmp_path: Path) -> None:
    text = """
        name: alert
        agents:
          - id: classify
          - id: notify
            depends_on: [classify]
        """
    assert errors(tmp_path, text) == [
        "flow.yaml:5: step 'notify' is given Rating (the output of step 'classify') as its input, which is no "
        "Notice (the input of agent 'notify'): Rating (the output of step 'classify') has no 'channel', which "
        "Notice requires"]
    # a model that forbids extra fields refuses every field it does not declare
    found = errors(tmp_path, text.replace("- id: notify", "- id: notify\n            agent: strict"))
    assert found == ["flow.yaml:6: step 'notify' is given Rating (the output of step 'classify') as its input, which "
                     "is no Strict (the input of agent 'strict'): Rating (the output of step 'classify') has 'label', "
                     "'level', 'note', 'tags', 'who', 'extra', which Strict does not take (it forbids extra fields)"]


def test_input_schema_types_the_jobs_input(tmp_path: Path) -> None:
    text = """
        name: alert
        input_schema: ticket
        agents:
          - id: classify
          - id: notify
            depends_on: [classify]
            input:
              channel: input.team
              body: input.text
        """
    spec = load(tmp_path, text)
    assert spec.input_schema == "ticket"
    assert errors(tmp_path, text.replace("input.text", "input.txt")) == [
        "flow.yaml:9: step 'notify': input.body 'input.txt' reads input.txt, but Ticket (the job's input, "
        "input_schema 'ticket') has no field 'txt'; its fields: priority, team, text"]
    assert errors(tmp_path, text.replace("input.team", "input.priority")) == [
        "flow.yaml:8: step 'notify': input field 'channel' gives int, but Notice.channel is str: an int is no str"]
    assert errors(tmp_path, text.replace("input_schema: ticket", "input_schema: tiket")) == [
        "flow.yaml:2: input_schema 'tiket' names no model the app's agents declare; known: loose, notice, "
        "rating, recall, sent, strict, ticket (the snake_case name of a model class)"]
    # a root without input: is given the run's input, which must be what its agent takes
    found = errors(tmp_path, text.replace("input_schema: ticket", "input_schema: rating"))
    assert found[0] == ("flow.yaml:4: step 'classify' is given the run's input (Rating, its input_schema) as its "
                        "input, which is no Ticket (the input of agent 'classify'): the run's input (Rating, its "
                        "input_schema) has no 'text', which Ticket requires")


def test_a_compensations_input_is_checked_like_a_steps(tmp_path: Path) -> None:
    text = """
        name: alert
        agents:
          - id: notify
            input:
              channel: '"mail"'
            compensate:
              {how}
              input:
                receipt: output.receipt
        """
    for how in ("agent: recall", "tool: unsend"):
        assert load(tmp_path, text.format(how=how)).step("notify").compensate is not None
        assert errors(tmp_path, text.format(how=how).replace("output.receipt", "output.recipt")) == [
            "flow.yaml:9: step 'notify': compensate input 'output.recipt' reads output.recipt, but the step's output "
            "(Sent) has no field 'recipt'; its fields: channel, receipt"]
        whose = "the input of agent 'recall'" if how.startswith("agent") else "the args of tool 'unsend'"
        assert errors(tmp_path, text.format(how=how).replace("receipt: output.receipt", "reciept: input.weight")) == [
            f"flow.yaml:8: step 'notify': compensate: input gives no 'receipt', which Recall ({whose}) requires",
            f"flow.yaml:9: step 'notify': compensate: input field 'reciept' is not a field of Recall ({whose}); its "
            "fields: receipt"]
    assert load(tmp_path, text.format(how="agent: recall").replace("output.receipt", "key")).name == "alert"
    assert errors(tmp_path, text.format(how="agent: recall").replace("output.receipt", "item.receipt")) == [
        "flow.yaml:9: step 'notify': compensate input 'item.receipt' reads item.receipt, but a compensation reads "
        "only input (the step's input), output (its output), key and job_id"]
    assert errors(tmp_path, text.format(how="agent: recall").replace("output.receipt", "input.weight")) == [
        "flow.yaml:9: step 'notify': compensate: input field 'receipt' gives float, but Recall.receipt is str: "
        "a float is no str"]


def test_app_pipeline_refuses_a_built_pipeline_whose_data_cannot_flow() -> None:
    bad = Pipeline("p").step("classify").step("notify", depends_on=["classify"], input={"chanel": "classify.label"})
    with pytest.raises(ConfigError, match=r"steps\.1\.input\.chanel: step 'notify': input field 'chanel' is not a "
                                          r"field of Notice"):
        App("other").include(alerts).pipeline(bad)
    good = Pipeline("p", input_schema="ticket").step("classify").step(
        "notify", depends_on=["classify"], input={"channel": "classify.label", "body": "input.text"})
    assert App("mine").include(alerts).pipeline(good).input_schema == "ticket"

    # the built-in pipeline and the examples' hold
    from examples.quickstart.app import app as quickstart
    from mesh.agents.builtin import app as builtin
    from mesh.agents.pipelines import check

    assert check(builtin.pipelines["mesh"], builtin).name == "mesh"
    assert check(quickstart.pipelines["article"], quickstart).name == "article"


@pytest.mark.slow
def test_an_input_the_agent_refuses_at_run_time_dead_letters_the_step_naming_it_and_the_field(mesh, run_workers):
    """Without input_schema the job's input is not typed at load: a field of the wrong type reaches
    the worker, whose model refuses it; the step's error names the step and the field."""
    from mesh.contracts import State
    from tests.conftest import wait_for
    from tests.pipelines.agents import app as orchestration

    spec = App("typed").include(orchestration).pipeline(
        Pipeline("untyped").step("researcher").step(
            "coder", depends_on=["researcher"], input={"summary": "input.note", "confidence": "researcher.confidence"}))
    run_workers()
    ref = mesh.run(spec, {"goal": "g", "note": 3}, key="untyped-1")
    record = wait_for(lambda: (r := mesh.status(ref.id)).state is State.DEAD_LETTERED and r, timeout_s=30)
    coder = record.steps["coder"]
    assert (coder.state, coder.failure_class) == (State.DEAD_LETTERED, "invalid_input")
    assert (coder.error or "").startswith("step coder: invalid coder input: summary: Input should be a valid string")
