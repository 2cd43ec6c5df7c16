"""Per-agent input/output contracts and the errors that name the bad fields."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from mesh.contracts import (
    ContractError,
    InvalidOutput,
    Plan,
    PlannerInput,
    Receipt,
    ResearchInput,
    ToolCall,
    UnknownAgent,
    validate_input,
    validate_output,
)
from mesh.contracts.messages import Findings
from mesh.contracts.tools import HttpPostArgs, NoteArgs

GOOD_PLAN = {
    "goal": "write a note",
    "steps": [
        {"kind": "research", "step_id": "r1", "question": "what?"},
        {"kind": "action", "step_id": "a1", "tool": "note", "args": {"title": "t"}, "use_findings": True},
    ],
}
GOOD_FINDINGS = {"question": "q", "summary": "s", "findings": [{"text": "t", "source": "doc.md#intro"}]}
GOOD_RECEIPT = {"tool": "note", "effect_id": "e1", "detail": {"path": "x"}}


@pytest.mark.parametrize(
    ("agent", "payload", "model"),
    [
        ("planner", {"goal": "do it"}, PlannerInput),
        ("researcher", {"question": "why?"}, ResearchInput),
        ("executor", {"tool": "note", "args": {"title": "t", "body": "b"}}, ToolCall),
        ("executor", {"tool": "http_post", "args": {"url": "http://h:1/x", "json": {"a": 1}}}, ToolCall),
    ],
)
def test_validate_input_accepts_good_payload(agent: str, payload: dict[str, Any], model: type) -> None:
    assert isinstance(validate_input(agent, payload), model)


@pytest.mark.parametrize(
    ("agent", "payload", "field"),
    [
        ("planner", {"goal": ""}, "goal"),
        ("planner", {}, "goal"),
        ("planner", {"goal": "g", "extra": 1}, "extra"),
        ("researcher", {"question": ""}, "question"),
        ("executor", {"tool": "rm_rf", "args": {}}, "tool"),
        ("executor", {"tool": "note", "args": {}}, "args.title"),
        ("executor", {"tool": "note", "args": {"title": ""}}, "args.title"),
        ("executor", {"tool": "note", "args": {"title": "t", "oops": 1}}, "args.oops"),
        ("executor", {"tool": "http_post", "args": {"url": "ftp://h/x"}}, "args.url"),
    ],
)
def test_validate_input_rejects_bad_payload_naming_field(
    agent: str, payload: dict[str, Any], field: str
) -> None:
    with pytest.raises(ContractError) as info:
        validate_input(agent, payload)
    assert field in info.value.fields
    assert field in str(info.value)
    assert info.value.context["agent"] == agent


def test_validate_input_rejects_non_object_payload() -> None:
    with pytest.raises(ContractError) as info:
        validate_input("planner", "just a string")
    assert info.value.fields == ["<root>"]


def test_tool_call_typed_args_errors_are_located_under_args() -> None:
    call = ToolCall(tool="note", args={"body": "no title"})
    with pytest.raises(ContractError) as info:
        call.typed_args()
    assert info.value.fields == ["args.title"]


def test_tool_call_typed_args_returns_tool_contract() -> None:
    assert isinstance(ToolCall(tool="note", args={"title": "t"}).typed_args(), NoteArgs)
    args = ToolCall(tool="http_post", args={"url": "https://h/x", "json": {"a": 1}}).typed_args()
    assert isinstance(args, HttpPostArgs)
    assert args.json_body == {"a": 1}


@pytest.mark.parametrize(
    ("agent", "payload", "model"),
    [("planner", GOOD_PLAN, Plan), ("researcher", GOOD_FINDINGS, Findings), ("executor", GOOD_RECEIPT, Receipt)],
)
def test_validate_output_accepts_good_payload(agent: str, payload: dict[str, Any], model: type) -> None:
    assert isinstance(validate_output(agent, payload), model)


@pytest.mark.parametrize(
    ("agent", "payload", "field"),
    [
        ("planner", {"goal": "g", "steps": []}, "steps"),
        ("planner", {"goal": "g", "steps": [{"kind": "dance", "step_id": "x"}]}, "steps"),
        ("researcher", {"question": "q", "summary": "s", "findings": [{"text": "t"}]}, "findings"),
        ("executor", {"tool": "note"}, "effect_id"),
    ],
)
def test_validate_output_raises_invalid_output(agent: str, payload: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidOutput) as info:
        validate_output(agent, payload)
    assert not isinstance(info.value, ContractError)
    assert field in str(info.value)
    assert info.value.context["agent"] == agent


def test_plan_splits_research_and_actions() -> None:
    plan = Plan.model_validate(GOOD_PLAN)
    assert [s.step_id for s in plan.research] == ["r1"]
    assert [s.step_id for s in plan.actions] == ["a1"]


def test_plan_rejects_duplicate_step_ids() -> None:
    steps = [{"kind": "research", "step_id": "s1", "question": "a"},
             {"kind": "action", "step_id": "s1", "tool": "note"}]
    with pytest.raises(ValidationError, match="step ids must be unique"):
        Plan.model_validate({"goal": "g", "steps": steps})
    with pytest.raises(InvalidOutput, match="unique"):
        validate_output("planner", {"goal": "g", "steps": steps})


def test_plan_rejects_empty_steps() -> None:
    with pytest.raises(ValidationError) as info:
        Plan.model_validate({"goal": "g", "steps": []})
    assert info.value.errors()[0]["loc"] == ("steps",)


def test_plan_rejects_bad_step_id_pattern() -> None:
    with pytest.raises(ValidationError):
        Plan.model_validate({"goal": "g", "steps": [{"kind": "research", "step_id": "Bad Id", "question": "q"}]})


@pytest.mark.parametrize("validate", [validate_input, validate_output])
def test_unknown_agent_name_raises_unknown_agent(validate: Any) -> None:
    with pytest.raises(UnknownAgent) as info:
        validate("poet", {})
    assert info.value.agent == "poet"
    assert "planner" in str(info.value)
