"""``complete(prompt, output)`` on both providers: structured output (json_schema, the json_object
fallback), the repair loop, and the local provider's valid stand-in answers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from enum import StrEnum
from typing import Any, Literal

import pytest
from pydantic import BaseModel, Field

from mesh.agents.providers import LocalProvider
from mesh.agents.providers.openai import OpenAIProvider
from mesh.broker.settings import MeshSettings
from mesh.contracts import InvalidOutput, PermanentFailure
from tests.agents.openai_server import FakeOpenAI, Reply, completion


class Triage(BaseModel):
    queue: str
    confidence: float = Field(ge=0, le=1)


VALID = json.dumps({"queue": "billing", "confidence": 0.8})


def _settings(url: str, **overrides: Any) -> MeshSettings:
    return MeshSettings(model_provider="openai", model_url=url, model_name="gpt-test", model_timeout_s=5,
                        **overrides)


@pytest.fixture
def api() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(lambda request: (200, completion(VALID), {})) as server:
        yield server


def _provider(api: FakeOpenAI, **overrides: Any) -> OpenAIProvider:
    return OpenAIProvider(_settings(api.url, **overrides))


def test_complete_asks_for_the_output_models_json_schema_and_returns_a_valid_instance(api: FakeOpenAI) -> None:
    p = _provider(api)
    answer = p.complete("My invoice is wrong", Triage, system="Route support tickets.", model="gpt-big")
    p.close()

    assert answer == Triage(queue="billing", confidence=0.8)
    [sent] = [r["json"] for r in api.requests]
    assert sent["model"] == "gpt-big"  # the per-call model overrides MESH_MODEL_NAME
    assert sent["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "Triage", "schema": Triage.model_json_schema(), "strict": False}}
    system, user = sent["messages"]
    assert system["role"] == "system" and system["content"].startswith("Route support tickets.")
    assert "confidence" not in system["content"]  # the schema travels in response_format, not the prompt
    assert user == {"role": "user", "content": "My invoice is wrong"}


def test_a_400_refusing_json_schema_falls_back_to_json_object_with_the_schema_in_the_prompt_and_remembers(
        api: FakeOpenAI) -> None:
    def no_schema(request: dict[str, Any]) -> Reply:
        if request["response_format"]["type"] == "json_schema":
            return 400, {"error": {"message": "response_format 'json_schema' is not supported by this model",
                                   "param": "response_format"}}, {}
        return 200, completion(VALID), {}

    api.responder = no_schema
    p = _provider(api)
    assert p.complete("first", Triage) == p.complete("second", Triage) == Triage(queue="billing", confidence=0.8)
    p.close()

    formats = [r["json"]["response_format"]["type"] for r in api.requests]
    assert formats == ["json_schema", "json_object", "json_object"]  # refused once, then never asked again
    assert p.structured == "json_object"
    fallback_system = api.requests[1]["json"]["messages"][0]["content"]
    assert json.dumps(Triage.model_json_schema(), separators=(",", ":")) in fallback_system


def test_setting_json_object_never_asks_for_json_schema(api: FakeOpenAI) -> None:
    p = _provider(api, model_structured="json_object")
    p.complete("q", Triage)
    p.close()
    assert api.requests[0]["json"]["response_format"] == {"type": "json_object"}


def test_a_400_about_anything_else_is_permanent_and_not_retried_as_json_object(api: FakeOpenAI) -> None:
    api.responder = lambda request: (400, {"error": {"message": "messages must not be empty"}}, {})
    p = _provider(api)
    with pytest.raises(PermanentFailure):
        p.complete("q", Triage)
    p.close()
    assert len(api.requests) == 1 and p.structured == "json_schema"


def test_an_invalid_answer_is_sent_back_with_its_validation_errors_and_the_repaired_one_is_used(
        api: FakeOpenAI) -> None:
    first = json.dumps({"queue": "billing", "confidence": 7})
    answers = iter([first, VALID])
    api.responder = lambda request: (200, completion(next(answers)), {})
    p = _provider(api)
    assert p.complete("My invoice is wrong", Triage) == Triage(queue="billing", confidence=0.8)
    p.close()

    assert len(api.requests) == 2
    repair = api.requests[1]["json"]["messages"]
    assert [m["role"] for m in repair] == ["system", "user", "assistant", "user"]
    assert repair[1]["content"] == "My invoice is wrong"
    assert repair[2]["content"] == first  # the model sees what it said ...
    assert "confidence: Input should be less than or equal to 1" in repair[3]["content"]  # ... and what is wrong


def test_repairs_run_out_into_invalid_output(api: FakeOpenAI) -> None:
    api.responder = lambda request: (200, completion("Sure! The queue is billing."), {})
    p = _provider(api, model_repairs=2)
    with pytest.raises(InvalidOutput, match=r"invalid Triage output after 2 repair\(s\): not JSON"):
        p.complete("q", Triage)
    p.close()
    assert len(api.requests) == 3  # the answer and two repairs
    assert "not JSON" in api.requests[2]["json"]["messages"][-1]["content"]


class Color(StrEnum):
    RED = "red"
    BLUE = "blue"


class Label(BaseModel):
    name: str = Field(min_length=3, max_length=12)
    weight: float = Field(ge=0, le=1)
    rank: int = Field(ge=3, le=7)


class Report(BaseModel):
    title: str = Field(min_length=40)
    short: str = Field(max_length=5)
    count: int = Field(gt=-10, lt=-2)
    ok: bool
    color: Color
    kind: Literal["a", "b"]
    labels: list[Label] = Field(min_length=2)
    primary: Label
    backup: Label | None
    note: str = "kept"


def test_local_complete_builds_a_valid_instance_of_nested_constrained_models_deterministically() -> None:
    prompt = "Summarise the billing incident of last week"
    report = LocalProvider().complete(prompt, Report)

    assert isinstance(report, Report) and Report.model_validate(report.model_dump()) == report
    assert report.title.startswith(prompt) and len(report.title) >= 40
    assert report.short == "Summa"
    assert -10 < report.count < -2
    assert (report.ok, report.color, report.kind, report.note) == (True, Color.RED, "a", "kept")
    assert len(report.labels) == 2 and all(3 <= label.rank <= 7 for label in report.labels)
    assert report.primary.weight == pytest.approx(0.9) and report.backup is not None
    assert report.primary.name == "Summarise th"
    assert LocalProvider().complete(prompt, Report) == report  # the same prompt, the same answer
