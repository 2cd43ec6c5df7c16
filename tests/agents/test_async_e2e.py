"""``async def`` agents and tools in a real worker on a real Redis: an async agent end to end (its
model awaited, an async effectful tool under ``ctx.call`` recorded once in the ledger across a
retry), the time limit stopping a handler that awaits forever (the step ends ``timeout``, as a sync
one does, and the thread's loop serves the next message), ``mesh cancel`` while a handler awaits,
two messages on one worker thread sharing its loop, and an async agent's model (the OpenAI wire
format, on a loopback server) answering 429: the message is deferred, not failed."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import wait_for
from pydantic import BaseModel

from mesh import App, AsyncContext, Context, ToolContext
from mesh.agents import event_loop
from mesh.broker import MeshClient, trace
from mesh.broker.keys import prefix
from mesh.broker.ledger import Ledger
from mesh.contracts import Receipt, State
from mesh.contracts.effects import Verdict
from tests.agents.openai_server import FakeOpenAI, completion
from tests.httpserver import RecordingServer

pytestmark = pytest.mark.slow  # every test here starts a worker

app = App("asyncs")


class Ticket(BaseModel):
    text: str


class Triage(BaseModel):
    queue: str
    loop: int = 0
    thread: int = 0


class Stamp(BaseModel):
    text: str


def _ns(ctx: Any) -> str:
    return str(ctx.settings.namespace if isinstance(ctx, ToolContext) else ctx.runtime.settings.namespace)


@app.tool
async def stamp(ctx: ToolContext, args: Stamp) -> Receipt:
    """Counts its calls per key (the effect), awaiting on the handler's loop."""
    await asyncio.sleep(0.01)
    ctx.redis.incr(f"{prefix(_ns(ctx))}:test.stamped:{ctx.key}")
    return Receipt(tool="stamp", effect_id=f"s-{args.text}", detail={"loop": id(asyncio.get_running_loop())})


@app.agent(tools=["stamp"], max_retries=1)
async def triage(ctx: AsyncContext, ticket: Ticket) -> Triage:
    """Asks the model, stamps the ticket; its first attempt fails after the stamp."""
    answer = await ctx.model.complete(f"Route: {ticket.text}", Triage)
    receipt = await ctx.call("stamp", {"text": ticket.text})
    if ticket.text == "retry" and ctx.attempt == 1:
        raise RuntimeError("fails after its effect: the retry must not stamp again")
    assert receipt.detail["loop"] == id(asyncio.get_running_loop())
    LOOPS.append(asyncio.get_running_loop())
    return Triage(queue=answer.queue, loop=id(asyncio.get_running_loop()), thread=threading.get_ident())


LOOPS: list[asyncio.AbstractEventLoop] = []  # the loops triage ran on, in this process


TOOL_LOOPS: list[asyncio.AbstractEventLoop] = []  # the loops the async tool ran on, called from sync code


@app.tool(effect=False)
async def where(ctx: ToolContext, args: Stamp) -> Receipt:
    TOOL_LOOPS.append(asyncio.get_running_loop())
    return Receipt(tool="where", effect_id=args.text)


@app.agent(tools=[where])
def sync_caller(ctx: Context, ticket: Ticket) -> Triage:
    """A sync handler calling an async tool: the tool runs on the worker thread's loop."""
    return Triage(queue=ctx.call(where, Stamp(text=ticket.text)).effect_id)


@app.agent(time_limit_s=1)
async def hang(ctx: AsyncContext, ticket: Ticket) -> Triage:
    """Awaits forever: only its time limit ends it."""
    await asyncio.Event().wait()
    return Triage(queue="never")


@app.tool
async def slow_book(ctx: ToolContext, args: Stamp) -> Receipt:
    """Books (the effect), then awaits forever: its caller's time limit stops it mid-call."""
    ctx.redis.incr(f"{prefix(_ns(ctx))}:test.booked:{ctx.key}")
    await asyncio.Event().wait()
    return Receipt(tool="slow_book", effect_id="never")


@app.agent(tools=["slow_book"], time_limit_s=1)
async def books(ctx: AsyncContext, ticket: Ticket) -> Triage:
    """Its call is in flight when its time limit stops it."""
    await ctx.call("slow_book", {"text": ticket.text})
    return Triage(queue="never")


@app.tool
async def held_book(ctx: ToolContext, args: Stamp) -> Receipt:
    """Says it is in flight, waits for ``{ns}:test.release``, then books (the effect)."""
    ns = _ns(ctx)
    ctx.redis.set(f"{prefix(ns)}:test.in_flight", 1)
    while not ctx.redis.exists(f"{prefix(ns)}:test.release"):
        await asyncio.sleep(0.02)
    ctx.redis.incr(f"{prefix(ns)}:test.booked:{ctx.key}")
    return Receipt(tool="held_book", effect_id=f"b-{args.text}")


@app.agent(tools=["held_book"])
async def books_then_waits(ctx: AsyncContext, ticket: Ticket) -> Triage:
    """Makes a call that is in flight when the job is cancelled; says when its task is cancelled."""
    try:
        await ctx.call("held_book", {"text": ticket.text})
    except asyncio.CancelledError:
        ctx.runtime.redis.set(f"{prefix(_ns(ctx))}:test.handler_cancelled", 1)
        raise
    return Triage(queue="booked")


class Post(BaseModel):
    url: str


@app.agent
async def poster(ctx: AsyncContext, post: Post) -> Triage:
    """POSTs through the awaited ctx.http."""
    response = await ctx.http.post(post.url, json={"from": ctx.step_id})
    return Triage(queue=str(response.json()["ok"]))


@app.agent
async def wait_cancel(ctx: AsyncContext, ticket: Ticket) -> Triage:
    """Says it started, then awaits (an hour) until the job is cancelled."""
    ctx.runtime.redis.set(f"{prefix(_ns(ctx))}:test.waiting", os.getpid())
    await asyncio.sleep(3600)
    return Triage(queue="never")


@pytest.fixture
def serve(make_settings: Callable[..., Any]) -> Iterator[Callable[..., MeshClient]]:
    """Start a one-thread worker for ``app``; the client that sends to it."""
    from mesh.ops.worker import start_worker

    workers = []

    def run(**overrides: Any) -> MeshClient:
        settings = make_settings(**overrides)
        workers.append(start_worker(settings, None, 1, app=app))
        return MeshClient(settings, app=app)

    yield run
    for worker in workers:
        worker.stop(timeout=10_000)
        worker.broker.close()


def test_an_async_agent_runs_end_to_end_and_its_async_effect_is_made_once_across_a_retry(serve: Any) -> None:
    client = serve(retry_min_backoff_ms=10, retry_max_backoff_ms=20)
    job = client.send("triage", {"text": "retry"}).id
    record = client.wait(job, timeout_s=30)

    assert record.state is State.SUCCEEDED, (record.state, record.error)
    step_id = next(iter(record.steps))
    assert record.steps[step_id].picked_up == 2
    key = record.steps[step_id].key
    assert client.redis.get(f"{prefix(client.settings.namespace)}:test.stamped:{key}") == b"1"  # not stamped again
    entries = Ledger(client.redis, client.keys, job, step_id, 60).entries()
    assert [(e.tool, e.verdict) for e in entries] == [("stamp", Verdict.UNVERIFIED)]
    assert entries[0].outcome["effect_id"] == "s-retry"
    assert record.result is not None and record.result["triage"]["queue"]  # the local model's answer


def test_two_messages_on_one_worker_thread_share_its_event_loop(serve: Any) -> None:
    client = serve()
    first = client.wait(client.send("triage", {"text": "one"}).id, timeout_s=30)
    second = client.wait(client.send("triage", {"text": "two"}).id, timeout_s=30)

    assert first.state is State.SUCCEEDED and second.state is State.SUCCEEDED
    one, two = first.result["triage"], second.result["triage"]  # type: ignore[index]
    assert one["thread"] == two["thread"]  # one worker thread
    assert one["loop"] == two["loop"]  # one loop, not one per message


def test_a_worker_thread_closes_its_loop_as_it_stops(make_settings: Callable[..., Any]) -> None:
    from mesh.ops.worker import start_worker

    settings = make_settings()
    worker = start_worker(settings, ["triage"], 1, app=app)
    try:
        client = MeshClient(settings, app=app)
        assert client.wait(client.send("triage", {"text": "one"}).id, timeout_s=30).state is State.SUCCEEDED
        loop = LOOPS[-1]
        assert not loop.is_closed()
    finally:
        worker.stop(timeout=10_000)
        worker.broker.close()
    assert loop.is_closed()


def test_a_worker_thread_closes_the_loop_a_sync_agents_async_tool_made_as_it_stops(
        make_settings: Callable[..., Any]) -> None:
    from mesh.ops.worker import start_worker

    settings = make_settings()
    worker = start_worker(settings, ["sync_caller"], 1, app=app)  # no async agent among those served
    try:
        client = MeshClient(settings, app=app)
        assert client.send(sync_caller, Ticket(text="q")).result(timeout_s=30) == Triage(queue="q")
        loop = TOOL_LOOPS[-1]
        assert not loop.is_closed()
    finally:
        worker.stop(timeout=10_000)
        worker.broker.close()
    assert loop.is_closed()


def test_the_time_limit_stops_an_async_handler_awaiting_forever_as_a_sync_one_and_the_loop_serves_the_next(
        serve: Any) -> None:
    client = serve()
    stuck = client.send("hang", {"text": "x"}).id
    record = client.wait(stuck, timeout_s=30)

    assert record.state is State.DEAD_LETTERED and record.failure_class == "timeout", (record.state, record.error)
    assert "TimeLimitExceeded: stopped at 1 s" in (record.error or "")
    after = client.wait(client.send("triage", {"text": "next"}).id, timeout_s=30)  # the same thread, its loop
    assert after.state is State.SUCCEEDED, (after.state, after.error)


def test_the_time_limit_stopping_an_async_tool_mid_call_leaves_its_effect_unknown_as_in_a_sync_handler(
        serve: Any) -> None:
    client = serve()
    job = client.send("books", {"text": "x"}).id
    record = client.wait(job, timeout_s=30)

    step_id, step = next(iter(record.steps.items()))
    assert record.state is State.UNKNOWN and step.state is State.UNKNOWN, (record.state, record.error)
    assert step.failure_class == "timeout"
    assert "slow_book hit its time limit; its effect is unknown" in (step.error or "")
    assert client.redis.get(f"{prefix(client.settings.namespace)}:test.booked:{step.key}") == b"1"
    entries = Ledger(client.redis, client.keys, job, step_id, 60).entries()
    assert [(e.tool, e.verdict) for e in entries] == [("slow_book", Verdict.UNKNOWN)]


def test_mesh_cancel_while_an_async_handler_awaits_cancels_its_task_and_ends_the_step_cancelled(
        serve: Any) -> None:
    client = serve(lease_s=3)
    job = client.send("wait_cancel", {"text": "x"}).id
    wait_for(lambda: client.redis.get(f"{prefix(client.settings.namespace)}:test.waiting"), timeout_s=30)

    client.cancel(job, reason="not needed")
    # Within a lease renewal (1 s), not the hour it awaits.
    wait_for(lambda: next(iter(client.status(job).steps.values())).state is not State.RUNNING, timeout_s=15)

    record = client.status(job)
    assert record.state is State.CANCELLED, (record.state, record.error)
    step = next(iter(record.steps.values()))
    assert step.state is State.CANCELLED, (step.state, step.error)
    assert "stopped: the job was cancelled (mesh cancel) while its handler awaited" in (step.error or "")
    assert event_loop.TICK_S < 1  # the cancel is seen on the loop's next wake


def test_an_async_agents_model_429_defers_the_message_and_its_tokens_are_metered(
        make_settings: Callable[..., Any]) -> None:
    from mesh.ops.worker import start_worker

    replies: list[Any] = [
        (429, {"error": {"message": "slow down"}}, {"Retry-After": "1"}),
        (200, completion(json.dumps({"queue": "billing"}), usage=(10, 5)), {}),
    ]
    with FakeOpenAI(lambda request: replies.pop(0) if len(replies) > 1 else replies[0]) as api:
        settings = make_settings(model_provider="openai", model_url=api.url, model_name="gpt-test",
                                 model_timeout_s=10)
        worker = start_worker(settings, ["triage"], 1, app=app)
        try:
            client = MeshClient(settings, app=app)
            job = client.send("triage", {"text": "invoice"}).id
            record = client.wait(job, timeout_s=30)
        finally:
            worker.stop(timeout=10_000)
            worker.broker.close()

    assert record.state is State.SUCCEEDED, (record.state, record.error)
    assert record.result is not None and record.result["triage"]["queue"] == "billing"
    assert len(api.requests) == 2
    step = next(iter(record.steps.values()))
    assert (step.tokens_in, step.tokens_out) == (10, 5) and step.picked_up == 2
    events = trace.read(client.redis, client.keys, job)
    deferred = [e for e in events if e["event"] == "deferred"]
    assert [e["failure_class"] for e in deferred] == ["rate_limited"]
    model_calls = [e for e in events if e["event"] == "model_call"]
    assert [e["outcome"] for e in model_calls] == ["rate_limited", "ok"]


def test_mesh_cancel_lets_an_async_tool_call_in_flight_finish_so_its_effect_is_in_the_ledger(serve: Any) -> None:
    client = serve(lease_s=3)
    ns = client.settings.namespace
    job = client.send("books_then_waits", {"text": "x"}).id
    wait_for(lambda: client.redis.get(f"{prefix(ns)}:test.in_flight"), timeout_s=30)

    client.cancel(job, reason="changed plans")
    # The handler's task is cancelled within a lease renewal; the call goes on until it is released.
    wait_for(lambda: client.redis.get(f"{prefix(ns)}:test.handler_cancelled"), timeout_s=15)
    assert not client.redis.get(f"{prefix(ns)}:test.booked:{client.status(job).steps['books_then_waits'].key}")
    client.redis.set(f"{prefix(ns)}:test.release", 1)
    wait_for(lambda: next(iter(client.status(job).steps.values())).state is not State.RUNNING, timeout_s=15)

    record = client.status(job)
    step_id, step = next(iter(record.steps.items()))
    assert step.state is State.CANCELLED, (step.state, step.error)
    assert client.redis.get(f"{prefix(ns)}:test.booked:{step.key}") == b"1"  # the call finished: its effect happened
    entries = Ledger(client.redis, client.keys, job, step_id, 60).entries()
    assert [(e.tool, e.verdict) for e in entries] == [("held_book", Verdict.UNVERIFIED)]
    assert entries[0].outcome["effect_id"] == "b-x"



def test_an_async_handlers_http_is_guarded_and_carries_the_key_and_token(serve: Any) -> None:
    with RecordingServer() as server:
        client = serve(http_allow=server.host_port)
        allowed = client.wait(client.send("poster", {"url": server.url("/hook")}).id, timeout_s=30)
        refused = client.wait(client.send("poster", {"url": "http://127.0.0.1:1/hook"}).id, timeout_s=30)

    assert allowed.state is State.SUCCEEDED and allowed.result == {"poster": {"queue": "True", "loop": 0, "thread": 0}}
    step = allowed.steps["poster"]
    (request,) = server.requests
    assert request["json"] == {"from": "poster"}
    assert request["headers"]["idempotency-key"] == step.key
    assert request["headers"]["x-mesh-fencing-token"] == str(step.token)
    assert refused.state is State.DEAD_LETTERED and "not in MESH_HTTP_ALLOW" in (refused.error or "")
