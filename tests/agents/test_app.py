"""Declaring agents and tools with ``App``: what a declaration reads, what it refuses, and that a
declared agent's policy (queue, retries, time limit, tools, secrets) is what its worker applies."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest
from conftest import wait_for
from pydantic import BaseModel, Field

from mesh import App, Context, ToolContext, load_app
from mesh.broker import trace
from mesh.broker.client import job_id_for
from mesh.broker.outbox import build_message, stage_all
from mesh.contracts import ConfigError, Envelope, JobRecord, State, StepRecord, new_trace_id
from mesh.dlq import DeadLetterStore
from mesh.ops.worker import start_worker


class Question(BaseModel):
    text: str = Field(min_length=1)


class Answer(BaseModel):
    text: str
    attempt: int


class Noted(BaseModel):
    saw_secret: bool


calls: dict[str, int] = {}
release = threading.Event()

app = App("testing")


@app.agent(queue="answers", max_retries=1)
def flaky(ctx: Context, q: Question) -> Answer:
    """Fails with an unknown error every time: retried once (its own budget), then dead-lettered."""
    calls[ctx.key] = calls.get(ctx.key, 0) + 1
    raise RuntimeError(f"flaky failed on attempt {ctx.attempt}")


@app.agent(time_limit_s=1)
def slow(ctx: Context, q: Question) -> Answer:
    """Runs past its own one-second time limit (bounded, so a broken limit cannot hang the suite)."""
    # Short waits: dramatiq's time limit lands between Python bytecodes, never inside one blocking
    # call, so a single 20 s wait would run to its end before the limit cut the handler.
    for _ in range(400):
        if release.wait(0.05):
            break
    return Answer(text="too late", attempt=ctx.attempt)


@app.agent
def echo(ctx: Context, q: Question) -> Answer:
    ctx.progress("echoing")
    return Answer(text=q.text.upper(), attempt=ctx.attempt)


class SecretArgs(BaseModel):
    name: str


@app.tool(secrets=["TEST_APP_SECRET"], effect=False)
def peek(ctx: ToolContext, args: SecretArgs) -> Noted:
    return Noted(saw_secret=bool(ctx.secret(args.name)))


@app.agent(tools=["peek"])
def peeker(ctx: Context, q: Question) -> Noted:
    result: Noted = ctx.call("peek", {"name": q.text})
    return result


@app.agent
def undeclared(ctx: Context, q: Question) -> Noted:
    result: Noted = ctx.call("peek", {"name": "TEST_APP_SECRET"})
    return result


def send(client: Any, spec_app: App, agent: str, payload: dict[str, Any]) -> str:
    """Record a one-step job and enqueue its message, as the client does for a built-in agent."""
    key = uuid.uuid4().hex
    now = time.time()
    spec = spec_app.agents[agent]
    env = Envelope(key=key, job_id=job_id_for(key), step_id=agent, agent=agent, trace_id=new_trace_id(),
                   deadline=now + 60, payload=payload, contract_version=spec.version)
    record = JobRecord(job_id=env.job_id, key=key, trace_id=env.trace_id,
                       steps={agent: StepRecord(step_id=agent, agent=agent, key=key, input=payload, sent_at=now)})
    message = build_message(env).copy(queue_name=spec.queue)
    pipe = client.redis.pipeline(transaction=True)
    client.jobs.stage_create(pipe, record)
    trace.stage(pipe, client.keys, trace.event("enqueued", message.args[0], queue=spec.queue))
    stage_all(pipe, client.keys, [message])
    pipe.execute()
    return env.job_id


def test_models_come_from_the_signature_and_the_policy_from_the_decorator() -> None:
    spec = app.agents["flaky"]
    assert (spec.input, spec.output, spec.queue, spec.max_retries, spec.version) == (
        Question, Answer, "answers", 1, 1)
    assert app.agents["echo"].queue == "echo" and app.agents["echo"].time_limit_s is None
    assert app.agents["slow"].time_limit_s == 1
    assert app.tools["peek"].secrets == ("TEST_APP_SECRET",) and app.tools["peek"].target(None) == "mesh"
    assert app.agents["flaky"].description.startswith("Fails with an unknown error")
    # Still the plain function: callable in a unit test.
    assert echo.__name__ == "echo"


def test_bad_declarations_are_refused_with_what_to_do() -> None:
    bad = App("bad")
    with pytest.raises(ConfigError, match="must be a pydantic model"):
        @bad.agent
        def untyped(ctx, q):  # type: ignore[no-untyped-def]
            return q
    with pytest.raises(ConfigError, match="must take"):
        @bad.agent
        def three(ctx: Context, q: Question, extra: int) -> Answer:
            raise AssertionError
    bad.agent(echo)
    with pytest.raises(ConfigError, match="twice"):
        bad.agent(echo)
    with pytest.raises(ConfigError, match="must be a lower-case name"):
        bad.agent(echo, name="Has Spaces")
    with pytest.raises(ConfigError, match="the mesh's own keys"):
        bad.agent(echo, name="stats")
    with pytest.raises(ConfigError, match="the mesh's own keys"):
        bad.agent(echo, name="fine", queue="jobs")
    bad.agent(echo, name="caller", tools=["nowhere"])
    with pytest.raises(ConfigError, match="undeclared tools"):
        bad.check()


def test_load_app_by_import_path() -> None:
    # (pytest imported this file under another module name: compare what was loaded, not identity)
    assert set(load_app("tests.agents.test_app").agents) == set(app.agents)
    assert load_app("tests.agents.test_app:app").name == "testing"
    assert load_app("mesh.agents.builtin").name == "mesh"
    with pytest.raises(ConfigError, match="cannot import"):
        load_app("no_such_module_here")
    with pytest.raises(ConfigError, match="is not a mesh App"):
        load_app("tests.agents.test_app:Question")


def test_load_app_given_a_file_name_says_to_give_the_import_path() -> None:
    with pytest.raises(ConfigError, match=r"an import path, not a file: tests\.agents\.test_app\)$"):
        load_app("tests/agents/test_app.py")


@pytest.fixture
def app_worker(settings: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("TEST_APP_SECRET", "s3cret-value-for-the-test")
    worker = start_worker(settings, None, 4, app=app)
    yield worker
    release.set()
    worker.stop(timeout=10_000)
    worker.broker.close()
    release.clear()


@pytest.mark.slow
def test_a_declared_agents_own_retry_budget_queue_and_time_limit_are_applied(client, app_worker) -> None:
    flaky_job = send(client, app, "flaky", {"text": "q"})
    slow_job = send(client, app, "slow", {"text": "q"})
    echo_job = send(client, app, "echo", {"text": "hi"})

    assert client.wait(echo_job, timeout_s=20).result == {"echo": {"text": "HI", "attempt": 1}}
    flaky_record = client.wait(flaky_job, timeout_s=20)
    assert flaky_record.state is State.DEAD_LETTERED
    assert "retries exhausted (1 of 1)" in (flaky_record.error or "")
    assert sum(calls.values()) == 2  # the first attempt and its one retry, MESH_MAX_RETRIES notwithstanding
    slow_record = client.wait(slow_job, timeout_s=20)  # cut at ~1-2 s by its own limit, not the 300 s default
    assert slow_record.state is State.DEAD_LETTERED and slow_record.failure_class == "timeout"
    entries = {e.job_id: e for e in DeadLetterStore(client.redis, client.keys).entries(
        __import__("mesh.dlq", fromlist=["Filter"]).Filter())}
    assert entries[flaky_job].queue == "answers"


@pytest.mark.slow
def test_a_tool_reads_only_the_secrets_it_declared_and_only_declared_tools_are_called(
        client, app_worker) -> None:
    ok = send(client, app, "peeker", {"text": "TEST_APP_SECRET"})
    refused = send(client, app, "peeker", {"text": "HOME"})
    not_declared = send(client, app, "undeclared", {"text": "x"})

    assert client.wait(ok, timeout_s=20).result == {"peeker": {"saw_secret": True}}
    refused_record = client.wait(refused, timeout_s=20)
    assert refused_record.state is State.DEAD_LETTERED and "was not declared by this tool" in refused_record.error
    undeclared_record = client.wait(not_declared, timeout_s=20)
    assert undeclared_record.state is State.DEAD_LETTERED
    assert "did not declare tool 'peek'" in (undeclared_record.error or "")
    wait_for(lambda: DeadLetterStore(client.redis, client.keys).count() == 2)


def test_async_handlers_are_refused_when_declared_not_on_every_attempt() -> None:
    # Called on a worker thread and never awaited, an async handler would fail every attempt.
    bad = App("async")
    with pytest.raises(ConfigError, match=r"^agent '.*answer' is an async function: async handlers are not "
                                          r"supported yet; write a sync function \(def, not async def\)$"):
        @bad.agent
        async def answer(ctx: Context, q: Question) -> Answer:
            return Answer(text=q.text, attempt=ctx.attempt)
    with pytest.raises(ConfigError, match=r"^tool '.*look_up' is an async function: async handlers are not supported"):
        @bad.tool(effect=False)
        async def look_up(ctx: ToolContext, args: SecretArgs) -> Noted:
            return Noted(saw_secret=False)

    async def check(ctx: Any, args: Any, result: Any) -> bool:
        return True

    with pytest.raises(ConfigError, match=r"^verifier '.*check' is an async function"):
        @bad.tool(verify=check)
        def book(ctx: ToolContext, args: SecretArgs) -> Noted:
            return Noted(saw_secret=False)
    assert not bad.agents and not bad.tools
