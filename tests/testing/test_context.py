"""mesh.testing.TestContext: a Context a test makes, for a declared handler called directly."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from pydantic import BaseModel

from mesh import (
    App,
    AsyncContext,
    ConfigError,
    Context,
    ContractError,
    MeshSettings,
    RateLimited,
    Receipt,
    ToolContext,
    ToolRefused,
)
from mesh.broker.keys import Keys
from mesh.testing import TestClock, TestContext, TestModel, ToolCall, calls

app = App("unit")


class Order(BaseModel):
    item: str
    qty: int = 1


class Placed(BaseModel):
    reference: str
    left_s: float
    cancelled: bool


class Charge(BaseModel):
    amount: int


@app.tool(secrets=["SHOP_TOKEN"], dependency="shop.test:443", compensate="refund")
def charge(ctx: ToolContext, args: Charge) -> Receipt:
    response = ctx.http.post("https://shop.test/charge", json={"amount": args.amount},
                             headers={"authorization": ctx.secret("SHOP_TOKEN")})
    return Receipt(tool="charge", effect_id=response.json()["id"])


@app.tool
def refund(ctx: ToolContext, args: Charge) -> Receipt:
    return Receipt(tool="refund", effect_id="R-1")


@app.agent(tools=["charge"])
def place(ctx: Context, order: Order) -> Placed:
    ctx.progress(f"placing {order.item}")
    receipt = ctx.call("charge", {"amount": 10 * order.qty})
    return Placed(reference=receipt.effect_id, left_s=ctx.deadline_left_s(), cancelled=ctx.cancelled)


class Quote(BaseModel):
    price: int


LOOPS: list[asyncio.AbstractEventLoop] = []  # where the async tool and handler ran


@app.tool(effect=False)
async def price(ctx: ToolContext, args: Order) -> Quote:
    await asyncio.sleep(0)
    LOOPS.append(asyncio.get_running_loop())
    return Quote(price=3 * args.qty)


@app.tool(dependency="shop.test:443")
async def stock(ctx: ToolContext, args: Order) -> Quote:
    response = await ctx.ahttp.get(f"https://shop.test/stock/{args.item}")
    return Quote(price=response.json()["left"])


@app.agent(tools=[price])
async def quote(ctx: AsyncContext, order: Order) -> Placed:
    LOOPS.append(asyncio.get_running_loop())
    ctx.progress(f"quoting {order.item}")
    drafted, quoted = await asyncio.gather(ctx.model.complete("a reference", Charge), ctx.call(price, order))
    return Placed(reference=f"{drafted.amount}/{quoted.price}", left_s=ctx.deadline_left_s(), cancelled=ctx.cancelled)


SHOP = MeshSettings(http_allow="shop.test:443")


def pinned(host: str, port: int) -> list[str]:
    return ["93.184.216.34"]  # a public address: the request never leaves (httpx.MockTransport)


def test_a_declared_agent_runs_with_a_test_context_where_a_context_is_expected() -> None:
    ctx = TestContext(app, place, tools={"charge": Receipt(tool="charge", effect_id="C-1")}, deadline_s=30)
    assert isinstance(ctx, Context)
    placed = place(ctx, Order(item="tea", qty=2))
    assert placed == Placed(reference="C-1", left_s=30.0, cancelled=False)
    assert ctx.progress_notes == ["placing tea"]
    assert ctx.calls == [ToolCall("charge", Charge(amount=20), Receipt(tool="charge", effect_id="C-1"))]
    assert (ctx.key, ctx.job_id, ctx.step_id, ctx.attempt, ctx.token) == ("test-key", "test-job", "place", 1, 1)
    assert ctx.lease.undo_calls == [{"tool": "refund", "args": {"amount": 20}}]


def test_the_deadline_is_read_on_the_test_clock_and_cancelled_is_settable() -> None:
    clock = TestClock(start_s=1_000.0)
    ctx = TestContext(app, "place", tools={charge: lambda args: Receipt(tool="charge", effect_id=str(args.amount))},
                      deadline_s=10, clock=clock, key="k-1", attempt=3)
    ctx.advance(4)
    ctx.cancelled = True
    assert place(ctx, Order(item="tea")) == Placed(reference="10", left_s=6.0, cancelled=True)
    assert (ctx.key, ctx.attempt, clock.now_s()) == ("k-1", 3, 1_004.0)
    with pytest.raises(ValueError):
        clock.advance(-1)


def test_a_real_tool_runs_with_the_tests_secrets_through_the_tests_http_client() -> None:
    seen: list[httpx.Request] = []

    def shop(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"id": "C-9"})

    ctx = TestContext(app, place, secrets={"SHOP_TOKEN": "shop-secret-1"}, resolve=pinned, settings=SHOP,
                      http=httpx.Client(transport=httpx.MockTransport(shop)))
    assert place(ctx, Order(item="tea")).reference == "C-9"
    (request,) = seen
    assert request.headers["authorization"] == "shop-secret-1" and request.headers["idempotency-key"] == "test-key"


def test_a_real_tools_http_failure_is_raised_as_the_mesh_classifies_it() -> None:
    ctx = TestContext(app, place, secrets={"SHOP_TOKEN": "shop-secret-1"}, resolve=pinned, settings=SHOP,
                      http=httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(429))))
    with pytest.raises(RateLimited):
        place(ctx, Order(item="tea"))
    assert ctx.calls[0].tool == "charge" and isinstance(ctx.calls[0].result, RateLimited)


def test_calls_are_checked_as_a_worker_checks_them() -> None:
    ctx = TestContext(app, place, tools={"charge": Receipt(tool="charge", effect_id="C-1")})
    with pytest.raises(ToolRefused, match="did not declare tool 'refund'"):
        ctx.call(refund, {"amount": 1})
    with pytest.raises(ContractError, match="invalid charge args"):
        ctx.call("charge", {"amount": "lots"})
    with pytest.raises(ConfigError, match="SHOP_TOKEN"):  # a real tool without its secret
        TestContext(app, place).call("charge", {"amount": 1})
    assert ctx.calls == []


def test_without_an_app_any_faked_tool_may_be_called_and_the_model_is_the_tests() -> None:
    model = TestModel([Order(item="tea")])
    ctx = TestContext(tools={"lookup": lambda args: {"found": args["q"]}}, model=model)
    assert ctx.call("lookup", {"q": "tea"}) == {"found": "tea"}
    assert ctx.model is model and ctx.model.complete("an order", Order) == Order(item="tea")
    with pytest.raises(ToolRefused):
        ctx.call("other", {})
    with pytest.raises(ConfigError):
        TestContext(agent="place")
    ctx = TestContext(app)  # an app without an agent: any of its tools, checked by their args
    assert ctx.call(refund, {"amount": 1}) == Receipt(tool="refund", effect_id="R-1")
    assert ctx.calls == [ToolCall("refund", Charge(amount=1), Receipt(tool="refund", effect_id="R-1"))]


def test_an_async_agent_runs_with_an_async_context_over_a_test_context_on_the_tests_own_loop() -> None:
    ctx = TestContext(app, quote, model=TestModel({Charge: [{"amount": 7}]}), deadline_s=20)
    LOOPS.clear()
    placed = asyncio.run(quote(AsyncContext(ctx), Order(item="tea", qty=2)))
    assert placed == Placed(reference="7/6", left_s=20.0, cancelled=False)
    assert ctx.calls == [ToolCall("price", Order(item="tea", qty=2), Quote(price=6))]
    assert ctx.progress_notes == ["quoting tea"]
    assert len(LOOPS) == 2 and LOOPS[0] is LOOPS[1]  # the async tool was awaited back on the test's loop
    assert AsyncContext(ctx).http.tool.key == "test-key"  # the test context's guarded HTTP, awaited


def test_a_test_contexts_call_of_an_async_tool_returns_its_result_as_a_workers_context_does() -> None:
    ctx = TestContext(app)
    assert ctx.call(price, {"item": "tea", "qty": 5}) == Quote(price=15)
    assert ctx.calls == [ToolCall("price", Order(item="tea", qty=5), Quote(price=15))]


def test_an_async_tool_and_an_async_handlers_http_go_through_the_tests_async_client() -> None:
    seen: list[str] = []

    def shop(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.method} {request.url.path} {request.headers['idempotency-key']}")
        return httpx.Response(200, json={"left": 4})

    ctx = TestContext(app, resolve=pinned, settings=SHOP, ahttp=httpx.AsyncClient(transport=httpx.MockTransport(shop)))
    assert ctx.call(stock, {"item": "tea"}) == Quote(price=4)

    async def handler() -> int:
        response = await AsyncContext(ctx).http.post("https://shop.test/orders", json={})
        return int(response.json()["left"])

    assert asyncio.run(handler()) == 4
    assert seen == ["GET /stock/tea test-key", "POST /orders test-key"]


def test_an_async_handler_given_the_test_context_itself_is_told_to_wrap_it_in_an_async_context() -> None:
    ctx = TestContext(app, quote, model=TestModel({Charge: [{"amount": 7}]}))
    with pytest.raises(RuntimeError, match=r"await it \(an async handler is given an AsyncContext: AsyncContext"):
        asyncio.run(quote.fn(ctx, Order(item="tea")))  # type: ignore[arg-type]  # the function, unchecked
    assert isinstance(ctx.calls[0].result, RuntimeError)  # the call, refused, is recorded as what it raised


def test_a_declared_async_agent_called_with_a_sync_context_is_refused_before_it_runs() -> None:
    ctx = TestContext(app, quote, tools={price: Quote(price=1)}, model=TestModel({Charge: [{"amount": 7}]}))
    with pytest.raises(TypeError) as refused:
        quote(ctx, Order(item="tea"))  # a fake's result is no awaitable: awaited, it failed far from the mistake
    assert str(refused.value) == ("agent 'quote' is an async def handler: give it an AsyncContext, as a worker "
                                  "does (in a unit test: await quote(AsyncContext(ctx), input))")
    assert ctx.calls == [] and ctx.progress_notes == []  # nothing of it ran


def test_what_a_test_context_raises_for_a_destructive_call_is_importable_from_mesh_testing() -> None:
    import mesh.testing
    from tests.apps import tool_loop as loop_app

    model = TestModel({loop_app.Refunded: [calls(("refund", {"order_id": "o-1", "cents": 5})),
                                           {"order_id": "o-1", "cents": 5}]})
    waiting = TestContext(loop_app.app, loop_app.refunder, approve_calls=False, model=model, tools={"refund": {}})
    with pytest.raises(mesh.testing.CallNeedsApproval) as asked:  # a test's import, not the tool loop's module
        loop_app.refunder(waiting, loop_app.Order(order_id="o-1"))
    assert asked.value.call == {"tool": "refund", "args": {"order_id": "o-1", "cents": 5}}
    assert "CallNeedsApproval" in mesh.testing.__all__ and waiting.calls == []


kept = App("kept")


class Memo(BaseModel):
    text: str


@kept.tool(effect=False)
def remember(ctx: ToolContext, args: Memo) -> Memo:
    ctx.redis.set(f"{ctx.keys.prefix}:memo", args.text)
    return Memo(text=(ctx.redis.get(f"{ctx.keys.prefix}:memo") or b"").decode())


def test_a_real_tool_reaches_the_redis_the_settings_name_a_clusters_too(settings: MeshSettings, rclient) -> None:
    ctx = TestContext(kept, settings=settings)  # a cluster's URL was refused here (redis-py's URLs take none)
    assert ctx.call("remember", Memo(text="kept")) == Memo(text="kept")
    assert rclient.get(f"{Keys(settings.namespace, settings.shard).prefix}:memo") == b"kept"
