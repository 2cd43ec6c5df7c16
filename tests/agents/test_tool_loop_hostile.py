"""Hostile cases of ctx.model.run (fast tier: TestContext, checkpoints in memory)."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from mesh import App, Context
from mesh.agents.providers.openai import OpenAIProvider
from mesh.agents.tool_loop import MemoryCheckpoints
from mesh.agents.tools.base import ToolContext
from mesh.broker.settings import MeshSettings
from mesh.testing import TestContext, TestModel, calls
from tests.agents.openai_server import FakeOpenAI, completion, turns


class Order(BaseModel):
    order_id: str


class Verdict(BaseModel):
    ok: bool


class Summary(BaseModel):
    text: str


hostile = App("tool-loop-hostile")


@hostile.tool(effect=False)
def whose(ctx: ToolContext, args: Order) -> str:
    """The key this call was given."""
    return ctx.key


@hostile.agent(tools=[whose])
def twice(ctx: Context, order: Order) -> Summary:
    verdict = ctx.model.run(f"Check order {order.order_id}", output=Verdict)
    return ctx.model.run(f"Summarise order {order.order_id} (ok={verdict.ok})", output=Summary)


def test_two_loops_of_one_step_keep_their_own_checkpoints_and_keys() -> None:
    model = TestModel({Verdict: [calls(("whose", {"order_id": "a"})), {"ok": True}],
                       Summary: [calls(("whose", {"order_id": "b"})), {"text": "done"}]})
    ctx = TestContext(hostile, twice, model=model, key="job-1/twice")
    assert twice(ctx, Order(order_id="o")) == Summary(text="done")
    # the second loop is a conversation of its own: its model is asked, not the first loop's turns replayed
    assert [p.prompt for p in model.prompts][2] == "Summarise order o (ok=True)"
    # and its call has a key of its own (an Idempotency-Key the first loop's call does not share)
    assert [c.result for c in ctx.calls] == ["job-1/twice/turn-1/call-1", "job-1/twice/run-2/turn-1/call-1"]


def test_args_nested_too_deep_to_parse_are_answered_to_the_model_as_an_error() -> None:
    deep = '{"order_id": ' + "[" * 200_000 + "]" * 200_000 + "}"
    model = TestModel({Verdict: [calls(("whose", deep)), {"ok": False}]})
    ctx = TestContext(hostile, twice, model=model)
    assert ctx.model.run("check", output=Verdict) == Verdict(ok=False)
    assert ctx.calls == []
    assert model.prompts[1].prompt.startswith("error: invalid arguments for whose: not JSON:")


def test_a_final_answer_nested_too_deep_to_parse_is_sent_back_as_invalid() -> None:
    with FakeOpenAI(turns([completion("[" * 200_000), completion('{"ok": true}')])) as api:
        model = OpenAIProvider(MeshSettings(model_provider="openai", model_url=api.url, model_name="m"))
        ctx = TestContext(hostile, twice, model=model)
        assert ctx.model.run("check", output=Verdict) == Verdict(ok=True)
    assert api.requests[1]["json"]["messages"][-1]["content"].startswith("Your answer is invalid: not JSON:")


def test_a_rerun_whose_prompt_changed_starts_its_conversation_over_instead_of_replaying_another() -> None:
    checkpoints = MemoryCheckpoints()
    first = TestModel({Verdict: [calls(("whose", {"order_id": "a"})), {"ok": True}]})
    TestContext(hostile, twice, model=first, checkpoints=checkpoints).model.run("Check order a", output=Verdict)
    again = TestModel({Verdict: [{"ok": False}]})
    ctx = TestContext(hostile, twice, model=again, checkpoints=checkpoints)
    # the recorded conversation answers "Check order a": not replayed as the answer to another question
    assert ctx.model.run("Check order b", output=Verdict) == Verdict(ok=False)
    assert [p.prompt for p in again.prompts] == ["Check order b"] and ctx.calls == []
    assert [e["event"] for e in ctx.loop_events] == ["loop_restarted"]
    assert sorted(checkpoints.fields) == ["turn-1"] and checkpoints.fields["turn-1"]["content"] == '{"ok": false}'
    # the same prompt again resumes from its checkpoints, the model not asked
    same = TestContext(hostile, twice, model=TestModel(), checkpoints=checkpoints)
    assert same.model.run("Check order b", output=Verdict) == Verdict(ok=False)


def test_a_failed_loop_forgets_its_own_checkpoints_and_keeps_the_earlier_loops() -> None:
    from mesh.contracts import InvalidOutput

    checkpoints = MemoryCheckpoints()
    model = TestModel({Verdict: [calls(("whose", {"order_id": "a"})), {"ok": True}],
                       Summary: ["not json"] * 3})
    with pytest.raises(InvalidOutput):
        twice(TestContext(hostile, twice, model=model, checkpoints=checkpoints), Order(order_id="o"))
    # the retry replays the first loop (its effects and answer as they were) and starts the second over
    assert sorted(checkpoints.fields) == ["turn-1", "turn-1/call-1", "turn-2"]
