"""The load check reads a field's keys as pydantic does when the agent's input is validated: by its
validation alias (one of ``AliasChoices``, the first key of an ``AliasPath``), else by its alias,
and by its name only when it has none or the model validates by name too. A step's output is kept
in its job's record by field name (``model_dump``), so what a step takes by default is read so."""

from __future__ import annotations

from pathlib import Path
from textwrap import dedent
from typing import Any

import pytest
from pydantic import AliasChoices, AliasPath, BaseModel, ConfigDict, Field, ValidationError

from mesh import App, Context
from mesh.agents.pipelines import PipelineError, load_pipeline

aliases = App("aliases")


class Start(BaseModel):
    text: str


class ByValidationAlias(BaseModel):
    user: str = Field(validation_alias="u")


class ByChoices(BaseModel):
    user: str = Field(validation_alias=AliasChoices("u", "usr"))


class ByPath(BaseModel):
    user: str = Field(validation_alias=AliasPath("who", "name"))


class ByAlias(BaseModel):
    user_name: str = Field(alias="userName")


class Named(BaseModel):
    """An output whose field has an alias: the record keeps it by its name."""

    model_config = ConfigDict(populate_by_name=True)
    user_name: str = Field(alias="userName")


class Plain(BaseModel):
    user_name: str


@aliases.agent
def start(ctx: Context, x: Start) -> Named:
    return Named(user_name=x.text)


@aliases.agent
def by_validation_alias(ctx: Context, x: ByValidationAlias) -> Start:
    return Start(text=x.user)


@aliases.agent
def by_choices(ctx: Context, x: ByChoices) -> Start:
    return Start(text=x.user)


@aliases.agent
def by_path(ctx: Context, x: ByPath) -> Start:
    return Start(text=x.user)


@aliases.agent
def by_alias(ctx: Context, x: ByAlias) -> Start:
    return Start(text=x.user_name)


@aliases.agent
def plain(ctx: Context, x: Plain) -> Start:
    return Start(text=x.user_name)


FLOW = """
name: flow
steps:
  - id: start
  - id: next
    agent: {agent}
    depends_on: [start]
{input}"""


def load(tmp_path: Path, agent: str, fields: dict[str, str] | None) -> Any:
    given = "" if fields is None else "    input:\n" + "".join(f"      {k}: {v}\n" for k, v in fields.items())
    path = tmp_path / "flow.yaml"
    path.write_text(dedent(FLOW).lstrip().format(agent=agent, input=given))
    return load_pipeline(path, aliases)


@pytest.mark.parametrize(("agent", "field", "model"), [
    ("by_validation_alias", "u", ByValidationAlias),
    ("by_choices", "usr", ByChoices),
    ("by_path", "who.name", ByPath),
    ("by_alias", "userName", ByAlias),
])
def test_an_input_field_given_by_the_key_the_model_validates_loads(tmp_path: Path, agent: str, field: str,
                                                                    model: type[BaseModel]) -> None:
    spec = load(tmp_path, agent, {field: "start.user_name"})
    assert list(spec.step("next").input) == [field]
    data: dict[str, Any] = {}
    node = data
    for part in field.split(".")[:-1]:
        node = node.setdefault(part, {})
    node[field.split(".")[-1]] = "x"
    assert model.model_validate(data)  # and the agent takes it when it runs


def test_an_aliased_field_given_by_its_name_is_a_load_error_when_the_model_validates_by_alias_only(
        tmp_path: Path) -> None:
    with pytest.raises(ValidationError):  # what the agent would say when it runs
        ByAlias.model_validate({"user_name": "x"})
    with pytest.raises(PipelineError) as caught:
        load(tmp_path, "by_alias", {"user_name": "start.user_name"})
    messages = [e.message for e in caught.value.errors]
    assert messages == [
        "step 'next': input gives no 'userName', which ByAlias (the input of agent 'by_alias') requires",
        "step 'next': input field 'user_name' is not a field of ByAlias (the input of agent 'by_alias'); "
        "its fields: userName"]


def test_a_default_input_reads_the_upstream_output_by_field_name_as_the_record_keeps_it(tmp_path: Path) -> None:
    kept = Named(user_name="x").model_dump(mode="json")  # how a worker records a step's output
    assert kept == {"user_name": "x"} and Plain.model_validate(kept)
    assert load(tmp_path, "plain", None).step("next").input is None
    with pytest.raises(PipelineError) as caught:
        load(tmp_path, "by_alias", None)
    assert [e.message for e in caught.value.errors] == [
        "step 'next' is given Named (the output of step 'start') as its input, which is no ByAlias (the input of "
        "agent 'by_alias'): Named (the output of step 'start') has no 'userName', which ByAlias requires"]


def test_input_paths_read_the_runs_input_by_the_keys_its_input_schema_validates(tmp_path: Path) -> None:
    given = ByAlias(userName="x").model_dump(mode="json", by_alias=True)  # how MeshClient.run keeps a model input
    assert given == {"userName": "x"}
    flow = "name: flow\ninput_schema: by_alias\nsteps:\n  - id: plain\n    input:\n      user_name: input.{}\n"
    path = tmp_path / "flow.yaml"
    path.write_text(flow.format("userName"))
    assert load_pipeline(path, aliases).step("plain").input
    path.write_text(flow.format("user_name"))
    with pytest.raises(PipelineError) as caught:
        load_pipeline(path, aliases)
    assert [e.message for e in caught.value.errors] == [
        "step 'plain': input.user_name 'input.user_name' reads input.user_name, but ByAlias (the job's input, "
        "input_schema 'by_alias') has no field 'user_name'; its fields: userName"]


def test_a_compensation_reads_the_steps_input_by_the_keys_its_agent_validated(tmp_path: Path) -> None:
    flow = ("name: flow\nsteps:\n  - id: start\n  - id: next\n    agent: by_alias\n    depends_on: [start]\n"
            "    input:\n      userName: start.user_name\n    compensate:\n      agent: plain\n      input:\n"
            "        user_name: input.{}\n")
    path = tmp_path / "flow.yaml"
    path.write_text(flow.format("userName"))  # the step's input as sent: it had to be a ByAlias
    assert load_pipeline(path, aliases).step("next").compensate is not None
    path.write_text(flow.format("user_name"))
    with pytest.raises(PipelineError) as caught:
        load_pipeline(path, aliases)
    assert [e.message for e in caught.value.errors] == [
        "step 'next': compensate input 'input.user_name' reads input.user_name, but the step's input (ByAlias) has "
        "no field 'user_name'; its fields: userName"]
