"""mesh.testing.run_pipeline and TestMesh: an app's pipeline on an in-process worker, on the real
Redis in a namespace of its own, approvals decided from the test and timers moved by its clock."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import BaseModel

from mesh import App, AsyncContext, ConfigError, Context, Credential, Pipeline, State, ToolContext
from mesh.broker.keys import Keys
from mesh.testing import TestMesh, TestModel, ToolCall, run_pipeline
from tests.conftest import redis_client

# each test starts an in-process worker, on the suite's Redis (MESH_REDIS_URL, as a user's test sets it)
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("redis_env")]

app = App("inprocess")


class Topic(BaseModel):
    topic: str


class Draft(BaseModel):
    text: str


class Posted(BaseModel):
    id: str


@app.tool(secrets=["BLOG_TOKEN"])
def post(ctx: ToolContext, args: Draft) -> Posted:
    return Posted(id=f"{ctx.secret('BLOG_TOKEN')[:4]}:{args.text}")


@app.agent
def write(ctx: Context, topic: Topic) -> Draft:
    return ctx.model.complete(f"write about {topic.topic}", Draft)


@app.agent(tools=["post"], max_retries=2)
def publish(ctx: Context, draft: Draft) -> Posted:
    posted: Posted = ctx.call("post", draft)
    return posted


class Batch(BaseModel):
    topics: list[Topic]


@app.agent
def tally(ctx: Context, batch: Batch) -> Posted:
    return Posted(id=",".join(t.topic for t in batch.topics))


@app.tool(effect=False)
async def shout(ctx: ToolContext, args: Draft) -> Posted:
    await asyncio.sleep(0)
    if args.text == "boom":
        raise RuntimeError("the shout failed")
    return Posted(id=args.text.upper())


@app.agent(tools=[shout], max_attempts=1)
async def shouts(ctx: AsyncContext, draft: Draft) -> Posted:
    return await ctx.call(shout, draft)


app.pipeline(Pipeline("blog").step("write").step("publish", depends_on=["write"], approval={"timeout": "1h"}))
DRAFTS = {Draft: [{"text": "otters"}]}


def test_an_approved_run_ends_with_the_fake_tools_answer_and_leaves_no_key() -> None:
    with TestMesh(app, model=TestModel(DRAFTS), tools={post: lambda d: Posted(id=f"P-{d.text}")}) as mesh:
        record = mesh.wait(mesh.run("blog", {"topic": "otters"}), approve={"publish": True})
        assert mesh.settings is not None
        namespace, url = mesh.settings.namespace, mesh.settings.redis_url
    assert record.state is State.SUCCEEDED and record.steps["publish"].result == {"id": "P-otters"}
    assert mesh.calls == [ToolCall("post", Draft(text="otters"), Posted(id="P-otters"))]
    assert mesh.model.prompts[0].prompt == "write about otters"
    assert [k for pattern in Keys(namespace).patterns for k in redis_client(url).scan_iter(match=pattern)] == []


def test_a_mesh_is_one_shard_whatever_mesh_shards_says_and_refuses_more(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its worker serves one shard: MESH_SHARDS in the environment is not its (its jobs would go to
    shards nothing consumes), and shards= above 1 is refused before anything starts."""
    monkeypatch.setenv("MESH_SHARDS", "3")
    with TestMesh(app, model=TestModel(DRAFTS), tools={post: lambda d: Posted(id=f"P-{d.text}")}) as mesh:
        record = mesh.wait(mesh.run("blog", {"topic": "otters"}), approve={"publish": True}, timeout_s=30)
        assert mesh.settings is not None and mesh.settings.shards == 1
    assert record.state is State.SUCCEEDED
    with pytest.raises(ConfigError, match="one shard"):
        TestMesh(app, shards=3).start()


def test_a_real_tool_reads_the_secret_the_test_gives() -> None:
    record = run_pipeline(app, "blog", {"topic": "otters"}, model=TestModel(DRAFTS),
                          secrets={"BLOG_TOKEN": "tok-for-the-test"}, approve={"publish": True})
    assert record.steps["publish"].result == {"id": "tok-:otters"}



def test_a_real_tools_secret_the_test_did_not_give_is_refused_saying_how_a_test_gives_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BLOG_TOKEN", raising=False)
    with pytest.raises(ConfigError) as refused:
        run_pipeline(app, "blog", {"topic": "otters"}, model=TestModel(DRAFTS), approve={"publish": True})
    assert str(refused.value) == (
        "agent 'publish' calls tool 'post': secret BLOG_TOKEN is not set (environment or MESH_SECRETS_DIR); "
        "a test gives it as secrets={'BLOG_TOKEN': ...} (run_pipeline, TestMesh) or fakes the tool with "
        "tools={'post': ...}")

def test_a_denied_step_halts_the_job_and_calls_nothing() -> None:
    with TestMesh(app, model=TestModel(DRAFTS), tools={post: Posted(id="never")}) as mesh:
        record = mesh.wait(mesh.run("blog", {"topic": "otters"}), approve={"publish": False})
    assert (record.state, record.steps["publish"].state) == (State.HALTED, State.HALTED)
    assert mesh.calls == []


def test_an_undecided_approval_returns_the_waiting_job_and_expires_when_the_clock_passes_it() -> None:
    with TestMesh(app, model=TestModel(DRAFTS), tools={post: Posted(id="never")}) as mesh:
        job = mesh.run("blog", {"topic": "otters"})
        assert mesh.wait(job).steps["publish"].state is State.AWAITING_APPROVAL
        left = mesh.expires_in_s(job, "publish")
        assert left is not None and 3590 < left <= 3600
        mesh.advance(left - 60)
        assert mesh.client.status(job.id).steps["publish"].state is State.AWAITING_APPROVAL
        mesh.advance(61)
        record = mesh.wait(job)
    assert record.steps["publish"].state is State.HALTED and "expired" in (record.steps["publish"].error or "")
    assert mesh.calls == []


app.pipeline(Pipeline("later").step("nap", sleep="1h").step("paid", wait_for={"event": "paid", "timeout": "2h"})
             .step("write", depends_on=["nap", "paid"], input={"topic": "paid.topic"}))


def test_a_sleep_ends_when_the_clock_passes_it_and_a_wait_for_when_its_event_comes() -> None:
    with TestMesh(app, model=TestModel(DRAFTS), tools={post: Posted(id="never")}) as mesh:
        job = mesh.run("later", {})
        record = mesh.wait(job)
        assert record.state is State.WAITING and record.steps["nap"].state is State.WAITING
        mesh.advance(3599)
        assert mesh.client.status(job.id).steps["nap"].state is State.WAITING
        mesh.advance(2)
        mesh.client.emit("paid", {"topic": "otters"})
        record = mesh.wait(job)
    assert record.state is State.SUCCEEDED and record.steps["paid"].result == {"topic": "otters"}


def test_approve_none_lets_the_approval_expire() -> None:
    record = run_pipeline(app, "blog", {"topic": "otters"}, model=TestModel(DRAFTS), tools={post: Posted(id="x")},
                          approve={"publish": None})
    assert record.state is State.HALTED


def test_a_model_brownout_is_retried_by_the_mesh_and_a_spent_budget_dead_letters_the_job() -> None:
    model = TestModel({Draft: [{"text": "otters"}]}, fail=["brownout"])
    record = run_pipeline(app, "blog", {"topic": "otters"}, model=model, tools={post: Posted(id="P")},
                          approve={"publish": True})
    assert record.state is State.SUCCEEDED and len(model.prompts) == 2
    long = TestModel({Draft: [{"text": " ".join(["word"] * 50)}]})
    record = run_pipeline(app, "blog", {"topic": "otters"}, model=long, tools={post: Posted(id="P")}, token_budget=10)
    assert (record.state, record.steps["write"].failure_class) == (State.DEAD_LETTERED, "budget_exceeded")


def test_a_message_sent_to_one_agent_runs_on_the_test_mesh() -> None:
    with TestMesh(app, model=TestModel(DRAFTS), tools={post: Posted(id="P")}) as mesh:
        record = mesh.wait(mesh.send("write", {"topic": "otters"}, key="one-draft"))
    assert record.state is State.SUCCEEDED and record.steps["write"].result == {"text": "otters"}
    assert record.key == "one-draft"


def test_send_and_run_take_the_declared_agent_and_input_models() -> None:
    with TestMesh(app, model=TestModel({Draft: [{"text": "sent"}]}), tools={post: Posted(id="never")}) as mesh:
        assert mesh.send(write, Topic(topic="otters")).result(timeout_s=20) == Draft(text="sent")
        batch = Batch(topics=[Topic(topic="a"), Topic(topic="b")])  # nested models: sent as JSON
        assert mesh.send(tally, batch).result(timeout_s=20) == Posted(id="a,b")
    record = run_pipeline(app, "blog", Topic(topic="otters"), model=TestModel(DRAFTS),
                          tools={post: lambda d: Posted(id=f"P-{d.text}")}, approve={"publish": True})
    assert record.pipeline_input == {"topic": "otters"}
    assert (record.output(write), record.output(publish)) == (Draft(text="otters"), Posted(id="P-otters"))


minting = App("inprocess-minting")


def no_token_server(scope: object) -> Credential:
    raise RuntimeError("no token server in a unit test")


@minting.tool(mint=no_token_server)
def charge(ctx: ToolContext, args: Draft) -> Posted:
    return Posted(id=ctx.credential.token)


@minting.agent(tools=[charge])
def pay(ctx: Context, draft: Draft) -> Posted:
    return ctx.call(charge, draft)


def test_a_faked_tool_mints_no_credential_and_a_real_one_is_refused_when_its_minter_fails() -> None:
    with TestMesh(minting, tools={charge: Posted(id="P-1")}) as mesh:
        assert mesh.wait(mesh.send(pay, Draft(text="tea"))).result == {"pay": {"id": "P-1"}}
    with TestMesh(minting) as mesh:
        record = mesh.wait(mesh.send(pay, Draft(text="tea")))
    assert record.state is State.DEAD_LETTERED
    assert "tool charge: its credential minter failed: RuntimeError: no token server" in str(record.error)


def test_an_async_tools_calls_are_recorded_with_what_it_returned_or_raised_as_a_sync_tools_are() -> None:
    with TestMesh(app, tools={post: Posted(id="never")}) as mesh:
        assert mesh.send(shouts, Draft(text="hey")).result(timeout_s=20) == Posted(id="HEY")
        assert mesh.wait(mesh.send(shouts, Draft(text="boom"))).state is State.DEAD_LETTERED
    assert mesh.calls[0] == ToolCall("shout", Draft(text="hey"), Posted(id="HEY"))
    assert len(mesh.calls) == 2 and isinstance(mesh.calls[1].result, RuntimeError)

    async def faked(args: Draft) -> Posted:  # an async fake: recorded with what it returns, too
        return Posted(id=f"F-{args.text}")

    with TestMesh(app, tools={post: Posted(id="never"), shout: faked}) as mesh:
        assert mesh.send(shouts, Draft(text="hey")).result(timeout_s=20) == Posted(id="F-hey")
    assert mesh.calls == [ToolCall("shout", Draft(text="hey"), Posted(id="F-hey"))]
