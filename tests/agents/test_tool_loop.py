"""ctx.model.run: the model calls the agent's tools through ctx.call, against a real loopback
chat-completions server, with a TestContext (fast tier: no worker, checkpoints in memory)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import BaseModel

from mesh import App, Context
from mesh.agents.async_context import AsyncContext
from mesh.agents.providers import provider_for
from mesh.agents.providers.local import LocalProvider
from mesh.agents.providers.openai import OpenAIProvider
from mesh.agents.tool_loop import CallNeedsApproval, MemoryCheckpoints
from mesh.agents.tools.base import ToolContext
from mesh.broker.settings import MeshSettings
from mesh.contracts import Brownout, DeadlineExceeded, InvalidOutput, ToolRefused
from mesh.testing import TestContext, TestModel, calls
from tests.agents.openai_server import FakeOpenAI, completion, tool_calls, turns
from tests.httpserver import RecordingServer


class Order(BaseModel):
    order_id: str


class Status(BaseModel):
    order_id: str
    status: str


class Refund(BaseModel):
    order_id: str
    cents: int


class Decision(BaseModel):
    refunded: bool
    reason: str


app = App("tool-loop-test")
refunds: list[Refund] = []


@app.tool(effect=False)
def lookup(ctx: ToolContext, args: Order) -> Status:
    """The status of an order."""
    return Status(order_id=args.order_id, status="delivered")


@app.tool
def refund(ctx: ToolContext, args: Refund) -> dict[str, Any]:
    """Refund part of an order, in cents."""
    refunds.append(args)
    return {"refund_id": f"R-{len(refunds)}", "cents": args.cents}


@app.tool(effect=False)
def unused(ctx: ToolContext, args: Order) -> str:
    """A tool the agent does not declare."""
    return "never"


@app.agent(tools=[lookup, refund])
def support(ctx: Context, order: Order) -> Decision:
    return ctx.model.run(f"Refund order {order.order_id} if it was delivered", tools=[lookup, refund],
                         output=Decision, max_turns=4)


FINAL = completion(json.dumps({"refunded": True, "reason": "delivered"}), usage=(30, 8))
SCRIPT = [tool_calls(("lookup", {"order_id": "A1"}), usage=(20, 5), turn=1),
          tool_calls(("refund", {"order_id": "A1", "cents": 500}), usage=(25, 6), turn=2),
          FINAL]


@pytest.fixture(autouse=True)
def _fresh() -> None:
    refunds.clear()


@pytest.fixture
def api() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(turns(SCRIPT)) as server:
        yield server


def _provider(api: FakeOpenAI) -> OpenAIProvider:
    return OpenAIProvider(MeshSettings(model_provider="openai", model_url=api.url, model_name="gpt-test"))


def test_the_model_calls_declared_tools_through_ctx_call_and_its_final_answer_is_validated(api: FakeOpenAI) -> None:
    ctx = TestContext(app, support, model=_provider(api))
    decision = support(ctx, Order(order_id="A1"))
    assert decision == Decision(refunded=True, reason="delivered")
    assert [(c.tool, c.args) for c in ctx.calls] == [("lookup", Order(order_id="A1")),
                                                     ("refund", Refund(order_id="A1", cents=500))]
    first, second, third = (r["json"] for r in api.requests)
    # the model is shown each offered tool's name, description and args JSON schema
    offered = {t["function"]["name"]: t["function"] for t in first["tools"]}
    assert set(offered) == {"lookup", "refund"}
    assert offered["refund"]["description"] == "Refund part of an order, in cents."
    assert offered["refund"]["parameters"]["required"] == ["order_id", "cents"]
    assert "Decision" in first["messages"][0]["content"]  # how to answer: the output's schema
    # each result goes back as the answer to its call, in the OpenAI wire format
    assert second["messages"][-2]["tool_calls"][0]["function"]["name"] == "lookup"
    assert second["messages"][-1] == {"role": "tool", "tool_call_id": "call_1_1",
                                      "content": '{"order_id":"A1","status":"delivered"}'}
    assert json.loads(third["messages"][-1]["content"]) == {"refund_id": "R-1", "cents": 500}
    # every turn and call is checkpointed under the step's key
    held = ctx.checkpoints.fields
    assert sorted(held) == ["turn-1", "turn-1/call-1", "turn-2", "turn-2/call-1", "turn-3"]
    assert held["turn-2/call-1"]["key"] == "test-key/turn-2/call-1"
    assert held["turn-1"]["tokens_in"] == 20


def test_a_resumed_loop_replays_its_recorded_turns_and_calls_and_makes_none_again(api: FakeOpenAI) -> None:
    checkpoints = MemoryCheckpoints()
    api.responder = turns(SCRIPT[:2])  # the model fails at turn 3: the attempt ends mid-loop
    with pytest.raises(Brownout):
        support(TestContext(app, support, model=_provider(api), checkpoints=checkpoints), Order(order_id="A1"))
    assert len(refunds) == 1 and len(api.requests) == 3
    api.responder = turns(SCRIPT)
    again = TestContext(app, support, model=_provider(api), checkpoints=checkpoints)
    assert support(again, Order(order_id="A1")).refunded
    assert again.calls == [] and len(refunds) == 1  # nothing called again...
    resumed = api.requests[3]["json"]["messages"]  # ... the model asked once more, from turn 3,
    assert len(api.requests) == 4 and json.loads(resumed[-1]["content"]) == {"refund_id": "R-1", "cents": 500}
    assert [e["call"] for e in again.loop_events if e["event"] == "tool_replayed"] == ["turn-1/call-1",
                                                                                       "turn-2/call-1"]


def test_max_turns_ends_the_loop_invalid_output_and_a_retry_starts_the_conversation_over(api: FakeOpenAI) -> None:
    api.responder = turns([tool_calls(("lookup", {"order_id": "A1"}), turn=n) for n in range(1, 9)])
    ctx = TestContext(app, support, model=_provider(api))
    with pytest.raises(InvalidOutput, match=r"used its 4 turn\(s\) \(max_turns\) without a final answer"):
        support(ctx, Order(order_id="A1"))
    assert len(api.requests) == 4 and len(ctx.calls) == 4
    assert ctx.checkpoints.fields == {}


def test_invented_calls_are_answered_as_errors_then_end_the_step_invalid_output(api: FakeOpenAI) -> None:
    api.responder = turns([tool_calls(("delete_everything", {}), turn=1),
                           tool_calls(("refund", '{"order_id": "A1", "cents": "lots"}'), turn=2),
                           tool_calls(("lookup", {"order_id": "A1"}), turn=3), FINAL])
    ctx = TestContext(app, support, model=_provider(api))
    assert support(ctx, Order(order_id="A1")).refunded
    answers = [r["json"]["messages"][-1]["content"] for r in api.requests[1:3]]
    assert answers[0].startswith("error: there is no tool 'delete_everything'; the tools are ['lookup', 'refund']")
    assert answers[1].startswith("error: invalid arguments for refund: cents:")
    assert [c.tool for c in ctx.calls] == ["lookup"] and refunds == []

    api.responder = turns([tool_calls(("nope", {}), turn=n) for n in range(1, 5)])
    with pytest.raises(InvalidOutput, match="kept asking for calls it cannot make"):
        support(TestContext(app, support, model=_provider(api)), Order(order_id="A1"))


def test_an_invalid_final_answer_is_sent_back_with_its_errors(api: FakeOpenAI) -> None:
    api.responder = turns([completion('{"refunded": "maybe"}'), FINAL])
    ctx = TestContext(app, support, model=_provider(api))
    assert support(ctx, Order(order_id="A1")).reason == "delivered"
    assert "Your answer is invalid: refunded:" in api.requests[1]["json"]["messages"][-1]["content"]


def test_only_the_agents_declared_tools_may_be_offered_and_the_deadline_bounds_the_loop(api: FakeOpenAI) -> None:
    ctx = TestContext(app, support, model=_provider(api))
    with pytest.raises(ToolRefused, match=r"did not declare tool\(s\) \['unused'\]"):
        ctx.model.run("go", tools=[lookup, unused], output=Decision)
    ctx.advance(61)
    with pytest.raises(DeadlineExceeded, match="before turn 1"):
        ctx.model.run("go", tools=[lookup], output=Decision)
    assert api.requests == []


def test_the_async_context_awaits_the_same_loop(api: FakeOpenAI) -> None:
    actx = AsyncContext(TestContext(app, support, model=_provider(api)))

    async def handler() -> Decision:
        return await actx.model.run("Refund order A1", tools=["lookup", "refund"], output=Decision)

    assert asyncio.run(handler()).refunded
    assert [c.tool for c in actx.sync.calls] == ["lookup", "refund"]  # type: ignore[attr-defined]


def test_the_local_provider_calls_each_offered_tool_once_then_answers() -> None:
    ctx = TestContext(app, support, model=LocalProvider())
    answer = ctx.model.run("Refund order A1", tools=[lookup], output=Decision)
    assert isinstance(answer, Decision) and [c.tool for c in ctx.calls] == ["lookup"]


def test_a_test_model_scripts_the_loops_turns_and_keeps_what_each_turn_was_given() -> None:
    model = TestModel({Decision: [calls(("lookup", {"order_id": "A1"})),
                                  calls(("refund", '{"order_id": "A1"}')),  # cents missing: an error
                                  {"refunded": False, "reason": "no amount"}]})
    ctx = TestContext(app, support, model=model)
    assert support(ctx, Order(order_id="A1")) == Decision(refunded=False, reason="no amount")
    assert [c.tool for c in ctx.calls] == ["lookup"] and refunds == []
    given = [p.prompt for p in model.prompts]
    assert given[0] == "Refund order A1 if it was delivered"
    assert json.loads(given[1]) == {"order_id": "A1", "status": "delivered"}
    assert given[2].startswith("error: invalid arguments for refund: cents: Field required")


def _anthropic(blocks: list[dict[str, Any]], stop: str = "tool_use") -> dict[str, Any]:
    return {"id": "msg_1", "type": "message", "role": "assistant", "model": "m", "content": blocks,
            "stop_reason": stop, "stop_sequence": None, "usage": {"input_tokens": 11, "output_tokens": 3}}


ANTHROPIC = [_anthropic([{"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"order_id": "A1"}}]),
             _anthropic([{"type": "text", "text": "Refunding."},
                         {"type": "tool_use", "id": "toolu_2", "name": "refund",
                          "input": {"order_id": "A1", "cents": 500}}]),
             _anthropic([{"type": "text", "text": json.dumps({"refunded": True, "reason": "delivered"})}], "end_turn")]


@pytest.mark.parametrize("provider", ["openai_sdk", "anthropic"])
def test_the_sdk_providers_drive_the_same_loop_in_their_wire_formats(provider: str) -> None:
    def respond(_n: int, request: dict[str, Any]) -> tuple[int, Any]:
        n = sum(1 for m in request["json"]["messages"] if m["role"] == "assistant")
        return 200, (SCRIPT if provider == "openai_sdk" else ANTHROPIC)[n]

    with RecordingServer(respond) as server:
        base = server.url("/v1") if provider == "openai_sdk" else server.url("")
        model = provider_for(MeshSettings(model_provider=provider, model_url=base, model_name="m",
                                          model_api_key="sk-test-key-0123"))
        ctx = TestContext(app, support, model=model)
        assert support(ctx, Order(order_id="A1")) == Decision(refunded=True, reason="delivered")

        async def awaited() -> Decision:
            return await AsyncContext(TestContext(app, support, model=model)).model.run(
                "Refund order A1", output=Decision)

        assert asyncio.run(awaited()).refunded
    assert [c.tool for c in ctx.calls] == ["lookup", "refund"] and len(refunds) == 2
    first, second, third = (r["json"] for r in server.requests[:3])
    if provider == "anthropic":
        assert {t["name"]: t["input_schema"]["required"] for t in first["tools"]} == {
            "lookup": ["order_id"], "refund": ["order_id", "cents"]}
        assert second["messages"][-1] == {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": '{"order_id":"A1","status":"delivered"}'}]}
        assert third["messages"][-2]["content"][0] == {"type": "text", "text": "Refunding."}
    else:
        assert [t["function"]["name"] for t in first["tools"]] == ["lookup", "refund"]
        assert second["messages"][-1]["tool_call_id"] == "call_1_1"


def test_a_destructive_call_needs_an_approval_and_a_test_context_approves_when_told() -> None:
    from tests.apps import tool_loop as loop_app

    script = [calls(("charge", {"order_id": "o-1", "n": 1})), calls(("refund", {"order_id": "o-1", "cents": 5})),
              {"order_id": "o-1", "cents": 5}]
    waiting = TestContext(loop_app.app, loop_app.refunder, approve_calls=False,
                          model=TestModel({loop_app.Refunded: script}), tools={"charge": {}, "refund": {}})
    with pytest.raises(CallNeedsApproval) as asked:
        loop_app.refunder(waiting, loop_app.Order(order_id="o-1"))
    assert asked.value.call == {"tool": "refund", "args": {"order_id": "o-1", "cents": 5}}
    assert [c.tool for c in waiting.calls] == ["charge"]  # the destructive call was not made
    approved = TestContext(loop_app.app, loop_app.refunder, model=TestModel({loop_app.Refunded: script}),
                           tools={"charge": {}, "refund": {}})
    assert loop_app.refunder(approved, loop_app.Order(order_id="o-1")).cents == 5
    assert [c.tool for c in approved.calls] == ["charge", "refund"]
    assert [e["event"] for e in approved.loop_events] == ["approval"]


def test_each_call_of_the_loop_gives_its_tool_a_key_of_its_own_derived_from_the_turn() -> None:
    keyed = App("keyed")

    @keyed.tool(effect=False)
    def whose(ctx: ToolContext, args: Order) -> str:
        """The key this call was given."""
        return ctx.key

    @keyed.agent(tools=[whose])
    def asks(ctx: Context, order: Order) -> Decision:
        return ctx.model.run("which keys?", output=Decision)

    model = TestModel({Decision: [calls(("whose", {"order_id": "a"}), ("whose", {"order_id": "b"})),
                                  calls(("whose", {"order_id": "c"})), {"refunded": False, "reason": "keys"}]})
    ctx = TestContext(keyed, asks, model=model, key="job-9/asks")
    asks(ctx, Order(order_id="x"))
    assert [c.result for c in ctx.calls] == ["job-9/asks/turn-1/call-1", "job-9/asks/turn-1/call-2",
                                             "job-9/asks/turn-2/call-1"]
    assert ctx._tool_context(None).key == "job-9/asks"  # the handler's own calls keep the message's key


def test_ctx_http_made_while_a_loop_call_runs_in_another_thread_leaves_that_call_its_own_key(client, settings):
    # An async handler's tool loop runs each call in a thread (AsyncContext.call) under the call's key,
    # while the handler may reach for ctx.http on its loop: the handler's tool context, made at its
    # first use, is under the message's key, and the call under way keeps the call's key meanwhile.
    import threading
    import time

    from mesh.agents.builtin import app as builtin
    from mesh.agents.runtime import AgentRuntime
    from mesh.broker.idempotency import Lease
    from mesh.contracts import Envelope, new_trace_id

    env = Envelope(key="k-http", job_id="j", step_id="executor", agent="executor", trace_id=new_trace_id(),
                   deadline=time.time() + 30, payload={"tool": "note", "args": {"title": "t"}})
    lease = Lease(key=env.key, claim_key=client.keys.claim(env.key), owner="a", token=1)
    ctx = Context(AgentRuntime.from_settings(settings, client.redis, builtin), env, builtin.agents["executor"], lease)
    ctx._call_key = "k-http/turn-1/call-1"  # the loop's call under way
    handler, making, read, seen = threading.current_thread(), threading.Event(), threading.Event(), []
    made = ctx._tool_context

    def tool_context(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is handler:  # ctx.http's, made at its first use
            making.set()
            read.wait(10)
        return made(*args, **kwargs)

    ctx._tool_context = tool_context  # type: ignore[method-assign]

    def call() -> None:  # the call's tool context, made as ctx.http's is being made
        making.wait(10)
        seen.append(ctx._tool_context(None).key)
        read.set()

    caller = threading.Thread(target=call)
    caller.start()
    http = ctx.http
    caller.join(10)
    assert seen == ["k-http/turn-1/call-1"]
    assert http.tool.key == "k-http" and ctx._call_key == "k-http/turn-1/call-1"
