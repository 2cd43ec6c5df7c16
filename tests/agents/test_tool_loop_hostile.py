"""Hostile cases of ctx.model.run (fast tier: TestContext, checkpoints in memory)."""

from __future__ import annotations

from pydantic import BaseModel

from mesh import App, Context
from mesh.agents.tools.base import ToolContext
from mesh.testing import TestContext, TestModel, calls


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

