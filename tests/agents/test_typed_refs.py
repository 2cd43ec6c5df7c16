"""Typed at the call site: the declared agent and tool objects are sent, called, built into pipelines
and read back by; models are accepted where dicts are, and a model of the wrong class is refused
before anything is written. (Type checking of the same forms: test_typed_refs_types.py.)"""

from __future__ import annotations

from typing import Any

import pytest
from dramatiq.message import Message
from pydantic import BaseModel, ConfigDict, Field

from mesh import (
    App,
    ConfigError,
    Context,
    JobRecord,
    MeshClient,
    NoOutput,
    PermanentFailure,
    Pipeline,
    State,
    StepRecord,
    ToolContext,
)
from mesh.broker import JobRef, WaitTimeout
from mesh.contracts import ContractError, Envelope
from mesh.ops.worker import start_worker
from mesh.testing import TestContext

app = App("typed")


class Incoming(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    text: str
    sender: str = Field(default="anon", alias="from")  # its wire name differs: sent by alias


class Classified(BaseModel):
    label: str
    length: int


class Hook(BaseModel):
    url: str
    label: str


class Posted(BaseModel):
    echoed: str


class Sent(BaseModel):
    via: str


class Other(BaseModel):
    text: str


@app.tool(effect=False)
def post_hook(ctx: ToolContext, args: Hook) -> Posted:
    return Posted(echoed=f"{args.url}#{args.label}")


@app.agent(queue="typed-classify")
def classify(ctx: Context, msg: Incoming) -> Classified:
    if msg.text == "fail":
        raise PermanentFailure("cannot classify 'fail'")
    return Classified(label=f"{msg.sender}:{msg.text}", length=len(msg.text))


@app.agent(tools=[post_hook])
def notify(ctx: Context, c: Classified) -> Sent:
    posted = ctx.call(post_hook, Hook(url="https://hooks.example", label=c.label))
    return Sent(via=posted.echoed)


def queued(client: MeshClient, queue: str) -> list[Envelope]:
    return [Envelope.model_validate(Message.decode(raw).args[0])
            for raw in client.redis.hvals(client.keys.messages(queue))]


def nothing_in_redis(client: MeshClient) -> bool:
    return not list(client.redis.scan_iter(match=f"{client.keys.prefix}:*"))


def test_a_declared_agent_is_still_its_function_and_carries_its_spec() -> None:
    assert classify(TestContext(app, classify), Incoming(text="hi")) == Classified(label="anon:hi", length=2)
    assert classify.spec is app.agents["classify"] and classify.name == "classify"
    assert (classify.input, classify.output, classify.queue) == (Incoming, Classified, "typed-classify")
    assert classify.__name__ == "classify" and classify.__wrapped__ is app.agents["classify"].handler
    assert post_hook.spec is app.tools["post_hook"] and app.agents["notify"].tools == ("post_hook",)
    assert post_hook(None, Hook(url="u", label="l")) == Posted(echoed="u#l")
    # A TestContext takes the declared objects for the agent and for a tool's fake.
    ctx = TestContext(app, notify, tools={post_hook: Posted(echoed="faked")})
    assert notify(ctx, Classified(label="x", length=1)) == Sent(via="faked") and ctx.calls[0].tool == "post_hook"


def test_send_takes_the_declared_agent_and_its_model_and_queues_the_payload_by_wire_names(settings, rclient) -> None:
    client = MeshClient(settings, client=rclient)  # no app: the agent object says where and what
    ref = client.send(classify, Incoming(text="hi", sender="ann"), key="k-1")
    [env] = queued(client, "typed-classify")
    assert env.payload == {"text": "hi", "from": "ann"} and env.agent == "classify" and env.contract_version == 1
    assert env.job_id == ref.id and client.status(ref.id).steps["classify"].input == env.payload


def test_send_by_name_takes_a_model_and_still_takes_a_dict(settings, rclient) -> None:
    client = MeshClient(settings, client=rclient, app=app)
    client.send("classify", Incoming(text="a"), key="model")
    client.send("classify", {"text": "b", "from": "bob"}, key="dict")
    assert sorted(e.payload["text"] for e in queued(client, "typed-classify")) == ["a", "b"]
    assert {e.payload["from"] for e in queued(client, "typed-classify")} == {"anon", "bob"}


def test_send_many_takes_models_and_dicts(settings, rclient) -> None:
    client = MeshClient(settings, client=rclient)
    refs = client.send_many(classify, [(Incoming(text="a"), "a"), ({"text": "b"}, "b")])
    assert [r.key for r in refs] == ["a", "b"]
    assert sorted(e.payload["text"] for e in queued(client, "typed-classify")) == ["a", "b"]


def test_a_model_of_another_class_is_refused_naming_both_and_nothing_is_written(settings, rclient) -> None:
    client = MeshClient(settings, client=rclient, app=app)
    with pytest.raises(ContractError, match="agent 'classify' takes a Incoming, not a Other; nothing was sent"):
        client.send(classify, Other(text="x"))
    with pytest.raises(ContractError, match="takes a Incoming, not a Other"):
        client.send("classify", Other(text="x"))
    with pytest.raises(ContractError, match=r"^item 1: agent 'classify' takes a Incoming") as caught:
        client.send_many(classify, [(Incoming(text="a"), "a"), (Other(text="b"), "b")])
    assert caught.value.context["index"] == 1
    assert nothing_in_redis(client)


def test_another_apps_agent_of_a_name_the_clients_app_declares_otherwise_is_refused(settings, rclient) -> None:
    other = App("other")

    @other.agent(name="classify", queue="typed-classify")
    def impostor(ctx: Context, o: Other) -> Classified:
        return Classified(label=o.text, length=0)

    client = MeshClient(settings, client=rclient, app=app)  # its classify takes an Incoming
    with pytest.raises(ContractError, match=r"agent 'classify' of the client's app takes a Incoming .*another's, "
                                            r"taking a Other .*nothing was sent"):
        client.send(impostor, Other(text="x"))
    with pytest.raises(ContractError, match="nothing was sent"):
        client.send_many(impostor, [(Other(text="x"), None)])
    assert nothing_in_redis(client)
    MeshClient(settings, client=rclient).send(impostor, Other(text="x"))  # a client without an app sends it as declared


def test_run_takes_its_input_as_a_model(settings, rclient) -> None:
    spec = Pipeline("typed-run").step(classify).step(notify, depends_on=[classify]).build()
    client = MeshClient(settings, client=rclient, app=app)
    ref = client.run(spec, Incoming(text="hi", sender="ann"))
    record = client.status(ref.id)
    assert record.pipeline_input == {"text": "hi", "from": "ann"}
    [env] = queued(client, "typed-classify")
    assert env.payload == {"text": "hi", "from": "ann"}


def test_the_builder_takes_declared_agents_for_steps_and_dependencies() -> None:
    spec = (Pipeline("typed").step(classify).step(notify, depends_on=[classify])
            .step(notify, id="again", depends_on=["notify"]).build())
    steps = {s.id: (s.agent_name, s.depends_on) for s in spec.steps}
    assert steps == {"classify": ("classify", ()), "notify": ("notify", ("classify",)),
                     "again": ("notify", ("notify",))}
    # depends_on=[agent] names the step the builder added for it, whatever its id.
    spec = (Pipeline("typed").step(classify, id="first")
            .step(notify, depends_on=[classify], compensate={"agent": classify, "input": {"text": "key"}}).build())
    assert spec.steps[1].depends_on == ("first",)
    assert spec.steps[1].compensate is not None and spec.steps[1].compensate.agent == "classify"
    assert app.pipeline(spec).name == "typed"  # the same spec YAML loads to, checked against the app


def test_a_bad_builder_keyword_names_the_step_and_the_keys_it_takes() -> None:
    with pytest.raises(ConfigError) as caught:
        Pipeline("typed").step(classify).step(notify, dependson=[classify]).build()
    message = str(caught.value)
    assert "step 'notify': unknown key 'dependson'; allowed: id, agent, " in message
    assert "depends_on" in message.split("allowed:")[1]
    with pytest.raises(ConfigError, match=r"step 'classify': unknown key 'max_attemps' in retry_policy; "
                                          r"allowed: max_attempts, backoff"):
        Pipeline("typed").step(classify, retry_policy={"max_attemps": 2}).build()


def record_of(**steps: StepRecord) -> JobRecord:
    return JobRecord(job_id="job-1", key="k", trace_id="0" * 32, steps=steps)


def step(step_id: str, agent: str, state: State, result: dict[str, Any] | None = None,
         error: str | None = None) -> StepRecord:
    return StepRecord(step_id=step_id, agent=agent, key=f"k/{step_id}", state=state, result=result, error=error)


def test_record_output_reads_a_step_typed_by_agent_or_by_id_and_model() -> None:
    record = record_of(classify=step("classify", "classify", State.SUCCEEDED, {"label": "x", "length": 1}),
                       second=step("second", "notify", State.SUCCEEDED, {"via": "v"}))
    assert record.output(classify) == Classified(label="x", length=1)
    assert record.output("classify") == {"label": "x", "length": 1}
    assert record.output("second", Sent) == Sent(via="v")
    assert record.output(notify) == Sent(via="v")  # the one step that runs notify, under its own id


def test_record_output_of_a_step_that_did_not_succeed_names_its_state_and_error() -> None:
    record = record_of(classify=step("classify", "classify", State.DEAD_LETTERED, error="boom"),
                       a=step("a", "notify", State.SUCCEEDED, {"via": "1"}),
                       b=step("b", "notify", State.SUCCEEDED, {"via": "2"}))
    with pytest.raises(NoOutput, match="step 'classify' of job job-1 has no output: it is dead_lettered: boom"
                       ) as caught:
        record.output(classify)
    assert (caught.value.state, caught.value.error, caught.value.step_id) == ("dead_lettered", "boom", "classify")
    with pytest.raises(LookupError, match="job job-1 has no step 'nope'; its steps are classify, a, b"):
        record.output("nope")
    with pytest.raises(LookupError, match=r"several steps running agent 'notify' \(a, b\); name one by its id"):
        record.output(notify)


def test_result_of_a_job_not_ended_in_time_raises_wait_timeout_with_its_record(settings, rclient) -> None:
    ref = MeshClient(settings, client=rclient).send(classify, Incoming(text="hi"))
    with pytest.raises(WaitTimeout) as caught:
        ref.result(timeout_s=0.05)
    assert caught.value.record.state is State.QUEUED
    with pytest.raises(ConfigError, match="this JobRef knows no client"):
        JobRef(id=ref.id, key=ref.key, trace_id=ref.trace_id).result()  # built by hand: it cannot wait
    assert JobRef(id=ref.id, key=ref.key, trace_id=ref.trace_id) == ref  # equal by id, key and trace


@pytest.mark.slow
def test_result_and_record_output_round_trip_typed_through_a_worker(settings, rclient) -> None:
    worker = start_worker(settings, None, 2, app=app)
    try:
        client = MeshClient(settings, client=rclient, app=app)
        done = client.send(classify, Incoming(text="hi", sender="ann"))
        failed = client.send(classify, Incoming(text="fail"))
        run = client.run(Pipeline("typed-rt").step(classify).step(notify, depends_on=[classify]).build(),
                         Incoming(text="yo"))
        assert done.result(timeout_s=20) == Classified(label="ann:hi", length=2)
        with pytest.raises(NoOutput, match=f"job {failed.id} has no output: it is dead_lettered: .*cannot classify"):
            failed.result(timeout_s=20)
        record = run.result(timeout_s=20)
        assert record.output(classify) == Classified(label="anon:yo", length=2)
        assert record.output(notify) == Sent(via="https://hooks.example#anon:yo")  # ctx.call(post_hook, ...)
    finally:
        worker.stop(timeout=10_000)
        worker.broker.close()


aliased = App("typed-alias")


class Stamp(BaseModel):
    kind: str = Field(alias="type")  # no populate_by_name: only the wire name validates


class Signed(BaseModel):
    sender: str = Field(alias="from")
    stamp: Stamp


@aliased.agent
def sign(ctx: Context, msg: Incoming) -> Signed:
    return Signed.model_validate({"from": msg.sender, "stamp": {"type": msg.text}})


@aliased.agent
def countersign(ctx: Context, signed: Signed) -> Sent:
    return Sent(via=f"{signed.sender}/{signed.stamp.kind}")


@pytest.mark.slow
def test_an_output_model_with_aliases_round_trips_by_its_wire_names_to_result_and_the_next_step(
        settings, rclient) -> None:
    worker = start_worker(settings, None, 2, app=aliased)
    try:
        client = MeshClient(settings, client=rclient, app=aliased)
        done = client.send(sign, Incoming(text="urgent", sender="ann"))
        run = client.run(Pipeline("typed-alias").step(sign).step(countersign, depends_on=[sign]).build(),
                         Incoming(text="late", sender="bob"))
        assert done.result(timeout_s=20) == Signed.model_validate({"from": "ann", "stamp": {"type": "urgent"}})
        record = run.result(timeout_s=20)
        assert record.steps["sign"].result == {"from": "bob", "stamp": {"type": "late"}}  # stored by wire names
        assert record.output(countersign) == Sent(via="bob/late")
    finally:
        worker.stop(timeout=10_000)
        worker.broker.close()
