"""Flow limits are declared on an agent, a tool's dependency or a pipeline file, and a keyed limit's
key is rendered by the sender into the envelope (``flow_key``)."""

from __future__ import annotations

import orjson
import pytest
from pydantic import BaseModel

from mesh import App
from mesh.broker import MeshClient
from mesh.contracts import ConfigError, Envelope
from mesh.contracts.flow import FLOW_KEY_MAX, flow_key, parse_rate


class Ask(BaseModel):
    tenant: str
    text: str = ""


class Answer(BaseModel):
    text: str


def keyed_app() -> App:
    app = App("flow")

    @app.agent(rate={"requests": "600/min", "tokens": "90000/min"}, concurrency={"max": 4, "key": "input.tenant"})
    def answer(ctx: object, ask: Ask) -> Answer:
        return Answer(text=ask.text)

    @app.agent
    def relay(ctx: object, ask: Ask) -> Answer:
        return Answer(text=ask.text)

    return app


def test_rates_read_as_written() -> None:
    assert parse_rate("600/min") == (600, 60)
    assert parse_rate("50/s") == (50, 1)
    assert parse_rate("1000/10s") == (1000, 10)
    assert parse_rate(5) == (5, 1)
    for bad in ("600", "10/fortnight", "-1/s", "0/s", True):
        with pytest.raises(ValueError):
            parse_rate(bad)  # type: ignore[arg-type]


def test_an_agent_and_a_dependency_declare_limits() -> None:
    app = keyed_app()
    limits = app.agents["answer"].limits
    assert limits is not None and limits.key == "input.tenant"
    assert limits.concurrency is not None and limits.concurrency.max == 4
    assert app.agents["relay"].limits is None

    @app.tool(dependency="api.example.com:443", rate="50/s", concurrency=2)
    def lookup(ctx: object, ask: Ask) -> Answer:
        return Answer(text="")

    dep = app.dependencies["api.example.com:443"]
    assert dep.rate is not None and dep.rate.requests == "50/s" and dep.concurrency is not None


@pytest.mark.parametrize(("rate", "concurrency", "said"), [
    ({"requests": "fast"}, None, "600/min"),
    (None, {"max": 0}, "greater than or equal to 1"),
    (None, {"max": 2, "key": "env.tenant"}, "reads the message's input only"),
    ({"requests": "1/s", "key": "input.a"}, {"max": 1, "key": "input.b"}, "share their key"),
])
def test_a_bad_declaration_is_refused_when_declared(rate: object, concurrency: object, said: str) -> None:
    app = App("bad")

    def handler(ctx: object, ask: Ask) -> Answer:
        return Answer(text="")

    with pytest.raises(ConfigError, match=said):
        app.agent(rate=rate, concurrency=concurrency)(handler)


def test_a_dependency_limit_has_no_key_and_one_declaration() -> None:
    app = App("deps")
    app.dependency("a:1", rate="5/s")
    app.dependency("a:1", rate="5/s")  # the same again is fine
    with pytest.raises(ConfigError, match="two different limits"):
        app.dependency("a:1", rate="6/s")
    with pytest.raises(ConfigError, match="no key"):
        app.dependency("b:1", concurrency={"max": 1, "key": "input.x"})


def test_a_pipeline_file_declares_limits_of_its_agents(tmp_path: object) -> None:
    app = keyed_app()
    spec = app.pipeline("""
name: flowing
steps:
  - id: first
    agent: relay
limits:
  agents:
    relay: {concurrency: {max: 2, key: "input.tenant"}}
  dependencies:
    "api.example.com:443": {rate: {requests: 50/s}}
""")
    assert spec.limits is not None
    relay = app.agents["relay"].limits
    assert relay is not None and relay.concurrency is not None and relay.concurrency.max == 2
    assert app.flow_key("relay", {"tenant": "t1"}) == "t1"
    assert "api.example.com:443" in app.dependencies


def test_a_long_rendered_key_is_carried_as_its_hash() -> None:
    app = keyed_app()
    short = app.flow_key("answer", {"tenant": "acme"})
    long = app.flow_key("answer", {"tenant": "x" * 1000})
    assert short == "acme"
    assert long is not None and long.startswith("#") and len(long) <= FLOW_KEY_MAX
    assert app.flow_key("relay", {"tenant": "acme"}) is None


def queued_envelopes(client: MeshClient, queue: str) -> list[dict[str, object]]:
    raw = client.redis.hvals(client.keys.messages(queue))
    return [orjson.loads(r)["args"][0] for r in raw]


def test_a_sent_message_carries_its_rendered_flow_key(client: MeshClient, settings: object) -> None:
    app = keyed_app()
    sender = MeshClient(client.settings, client=client.redis, app=app)
    sender.send("answer", {"tenant": "acme", "text": "hi"})
    sender.send("relay", {"tenant": "acme", "text": "hi"})
    (answer,) = queued_envelopes(client, "answer")
    (relay,) = queued_envelopes(client, "relay")
    assert flow_key(answer) == "acme" and Envelope.model_validate(answer).flow_key == "acme"
    assert flow_key(relay) is None and "flow_key" not in relay  # as written before the field existed


def test_a_pipeline_step_message_carries_its_rendered_flow_key(client: MeshClient) -> None:
    app = keyed_app()
    app.pipeline("""
name: asks
steps:
  - id: first
    agent: answer
""")
    sender = MeshClient(client.settings, client=client.redis, app=app)
    sender.run("asks", {"tenant": "globex", "text": "hi"})
    (env,) = queued_envelopes(client, "answer")
    assert env["flow_key"] == "globex"


def test_the_engine_renders_a_next_steps_flow_key_from_its_built_input() -> None:
    from mesh.agents.pipelines.engine import Routes, Run, advance, begin
    from mesh.contracts import JobRecord, State, transition

    app = keyed_app()
    spec = app.pipeline("""
name: relayed
steps:
  - id: relay
    agent: relay
  - id: answer
    agent: answer
    depends_on: [relay]
    input:
      tenant: relay.text
      text: input.text
""")
    routes = Routes(flow_key=app.flow_key)
    run = Run(trace_id="0" * 31 + "1", deadline=2e9)
    record = JobRecord(job_id="j", key="k", trace_id=run.trace_id, pipeline="relayed", pipeline_digest=spec.digest(),
                       pipeline_input={"tenant": "t0", "text": "hi"})
    record, messages, _ = begin(spec, record, run, routes, now=1.0)
    assert messages[0].args[0].get("flow_key") is None  # relay declares no limit
    step = transition(transition(record.steps["relay"], State.RUNNING, now=1.0), State.SUCCEEDED, now=1.0,
                      result={"text": "initech"})
    record, messages = advance(spec, record.with_step(step), run, routes, [], now=2.0)
    assert [m.args[0]["flow_key"] for m in messages] == ["initech"]


class Plan(BaseModel):
    n: int
    tenant: str = "default"


def test_a_key_reads_the_input_as_the_agent_sees_it_with_the_defaults_its_sender_left_out() -> None:
    """``{"n": 1}`` is a valid input whose tenant is "default": the key renders it so, whether the
    sender wrote a dict without the field, a dict with it, or the model (it failed to render)."""
    app = App("flow")

    @app.agent(concurrency={"max": 2, "key": "input.tenant"})
    def plan(ctx: object, job: Plan) -> Plan:
        return job

    assert plan.flow_key({"n": 1}) == "default"
    assert app.flow_key("plan", {"n": 1}) == "default"
    assert app.flow_key("plan", {"n": 1, "tenant": "acme"}) == "acme"
    assert app.flow_key("plan", Plan(n=1).model_dump()) == "default"


def test_a_key_rendered_as_a_map_or_list_is_one_key_however_its_fields_are_ordered() -> None:
    """A key expression giving a map: the same map with its fields in another order is the same
    tenant, so the same limit (its text was Python's ``str``, which keeps the order given)."""
    from mesh.contracts.flow import flow_key_of

    assert flow_key_of({"org": "acme", "team": 7}) == flow_key_of({"team": 7, "org": "acme"})
    assert flow_key_of({"org": "acme"}) == '{"org":"acme"}'
    assert flow_key_of([1, "a"]) == '[1,"a"]'
    assert flow_key_of(True) == "true" and flow_key_of(20) == "20"
