"""mesh.testing.TestModel: scripted answers, recorded prompts, counted tokens, failures on demand."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from mesh import Brownout, DependencyTimeout, FailureClass, InvalidOutput, RateLimited
from mesh.agents.providers import ModelProvider
from mesh.contracts import BudgetExceeded, Plan
from mesh.testing import Prompt, ScriptExhausted, TestModel


class Route(BaseModel):
    queue: str
    confidence: float


class Note(BaseModel):
    text: str


def test_answers_per_output_model_in_order_and_records_each_prompt() -> None:
    model: ModelProvider = TestModel({Route: [{"queue": "a", "confidence": 0.1}, Route(queue="b", confidence=0.2)],
                                      Note: [Note(text="n")]})
    assert model.complete("first", Route, system="sys").queue == "a"
    assert model.complete("note", Note).text == "n"
    assert model.complete("second", Route, model="big").queue == "b"
    assert isinstance(model, TestModel)
    assert model.prompts == [Prompt("first", "sys", Route, None), Prompt("note", None, Note, None),
                             Prompt("second", None, Route, "big")]
    with pytest.raises(ScriptExhausted, match="answer 3 and has 2 Route answers"):
        model.complete("third", Route)


def test_a_list_answers_every_call_in_order_and_a_function_answers_from_the_prompt() -> None:
    listed = TestModel([Note(text="one"), {"queue": "q", "confidence": 1}])
    assert listed.complete("x", Note).text == "one" and listed.complete("y", Route).queue == "q"
    echo = TestModel(lambda p: {"text": f"{p.output.__name__}: {p.prompt}"})
    assert echo.complete("hello", Note).text == "Note: hello"


def test_an_unscripted_model_gets_a_valid_synthetic_answer_and_a_bad_script_is_invalid_output() -> None:
    assert TestModel().complete("otters swim", Note) == TestModel().complete("otters swim", Note)
    assert isinstance(TestModel({Note: []}).plan("read the docs"), Plan)  # the local provider's plan
    with pytest.raises(InvalidOutput):
        TestModel([{"queue": "q"}]).complete("x", Route)


def test_tokens_are_counted_and_a_budget_refuses_the_call_that_passes_it() -> None:
    model = TestModel([Note(text="a b")] * 3, token_budget=8)
    model.complete("one two three", Note, system="four")  # 4 words in, {"text": "a b"} is 3 out
    assert (model.tokens_in, model.tokens_out, model.tokens) == (4, 3, 7)
    with pytest.raises(BudgetExceeded) as over:
        model.complete("five", Note)
    assert over.value.failure_class is FailureClass.BUDGET_EXCEEDED and model.tokens == 11
    with pytest.raises(BudgetExceeded):  # spent: no call is made
        model.complete("six", Note)
    assert len(model.prompts) == 3


def test_failures_are_raised_in_order_with_the_mesh_classes_then_answers_come() -> None:
    model = TestModel([Note(text="ok")], fail=["rate_limited", FailureClass.TIMEOUT])
    model.fail_next(Brownout("down", dependency="llm"))
    with pytest.raises(RateLimited) as limited:
        model.complete("1", Note)
    assert limited.value.retry_after_s is not None
    with pytest.raises(DependencyTimeout):
        model.complete("2", Note)
    with pytest.raises(Brownout, match="down"):
        model.complete("3", Note)
    assert model.complete("4", Note).text == "ok" and len(model.prompts) == 4
