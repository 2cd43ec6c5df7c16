"""MCP tools inside the model's tool loop (``ctx.model.run``), against a real MCP server written with
the ``mcp`` SDK (tests/agents/mcp_server.py, stdio) and a loopback model server speaking the OpenAI
wire format: the model is shown the server's description and ``inputSchema`` under a name the wire
format takes (``demo.add`` is ``demo_add``) and its call reaches the server through a real worker; a
tool the server marks ``destructiveHint`` waits for a person's approval of the exact call (approved:
made once; denied: never made); a worker SIGKILLed mid-loop repeats no call (the server's record of
calls, by their ``_meta`` key, proves each was made once)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import wait_for
from pydantic import BaseModel, ConfigDict

from mesh import App, MeshClient, Pipeline, ToolContext
from mesh.agents.pipelines import check
from mesh.agents.providers.openai import OpenAIProvider
from mesh.agents.tool_loop import wire_names
from mesh.agents.tools.pins import Definition, Pins
from mesh.broker import MeshSettings
from mesh.broker.keys import Keys
from mesh.contracts import ConfigError, State, ToolRefused
from mesh.testing import TestContext
from tests.agents.openai_server import FakeOpenAI, Reply, completion, tool_calls
from tests.apps.mcp_loop import SERVER, Task, Total, app

APP = "tests.apps.mcp_loop:app"
HEARTBEAT_TIMEOUT_S = 3.0


def seen(log: Path) -> list[dict[str, Any]]:
    """The calls the MCP server received, in order."""
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


class Model:
    """Plays ``script`` by turn (counted from the request's assistant messages); SIGKILLs ``victim``
    on its first request for turn ``kill_at``, before answering."""

    def __init__(self, script: list[dict[str, Any]], kill_at: int | None = None) -> None:
        self.script = script
        self.kill_at = kill_at
        self.victim: subprocess.Popen[bytes] | None = None
        self.turns: list[int] = []

    def __call__(self, request: dict[str, Any]) -> Reply:
        n = sum(1 for m in request["messages"] if m["role"] == "assistant")
        self.turns.append(n + 1)
        if n + 1 == self.kill_at and self.victim is not None and self.victim.poll() is None:
            os.kill(self.victim.pid, signal.SIGKILL)
            self.victim.wait(10)
        return 200, self.script[n], {}


def model_env(api: FakeOpenAI, log: Path, **extra: str) -> dict[str, str]:
    return {"MESH_MODEL_PROVIDER": "openai", "MESH_MODEL_URL": api.url, "MESH_MODEL_NAME": "gpt-test",
            "MCP_LOG": str(log), **extra}


# -- wire names, hints and pins (no server) ----------------------------------------------------------------


def test_wire_names_take_dotted_names_to_the_providers_format_and_keep_every_tool_apart() -> None:
    long = "search." + "x" * 80
    wire = wire_names(["lookup", "github.search_issues", "demo.add", "demo_add", long])
    assert wire["lookup"] == "lookup" and wire["github.search_issues"] == "github_search_issues"
    assert wire["demo.add"] == "demo_add" and wire["demo_add"] == "demo_add-2"  # would share one: kept apart
    assert len(wire[long]) == 64
    assert all(w.replace("_", "").replace("-", "").isalnum() and len(w) <= 64 for w in wire.values())
    assert len(set(wire.values())) == len(wire)


def test_destructive_hints_and_their_override() -> None:
    hinted = Definition("drop", "Drop.", {}, {"destructiveHint": True})
    assert hinted.destructive_hint
    assert not Definition("count", "Count.", {}, {"destructiveHint": True, "readOnlyHint": True}).destructive_hint
    assert not Definition("add", "Add.", {}).destructive_hint  # no hint given: MCP's default is not assumed
    server = App("x").mcp("demo", command=["x"], allow=["drop", "add"])
    assert server.destructive_tool("drop", hinted) and not server.destructive_tool("add", Definition("add", "Add.", {}))
    forced = App("y").mcp("demo", command=["x"], allow=["drop", "add"], destructive=["add"])
    assert forced.destructive_tool("add") and not forced.destructive_tool("drop", hinted)
    assert App("z").mcp("demo", command=["x"], allow=["add"], destructive=True).destructive_tool("add")
    assert not App("w").mcp("demo", command=["x"], allow=["drop"], destructive=False).destructive_tool("drop", hinted)
    assert forced.specs()[1].destructive and not forced.specs()[0].destructive  # known at declaration
    with pytest.raises(ConfigError, match=r"destructive= names \['delete'\], which allow= does not"):
        App("v").mcp("demo", command=["x"], allow=["drop"], destructive=["delete"])


def test_a_server_that_drops_its_destructive_hint_is_refused_until_accepted(settings: MeshSettings,
                                                                            rclient: redis.Redis) -> None:
    import hashlib

    import orjson

    pins = Pins(rclient, Keys(settings.namespace, settings.shard))
    plain = Definition("add", "Add.", {"type": "object"})
    # a definition without annotations hashes as before they were pinned: its pin still matches
    assert plain.digest == hashlib.sha256(orjson.dumps({"name": "add", "description": "Add.", "input_schema": {
        "type": "object"}}, option=orjson.OPT_SORT_KEYS)).hexdigest()
    pins.check("demo.drop", Definition("drop", "Drop.", {"type": "object"}, {"destructiveHint": True}))
    with pytest.raises(ToolRefused, match="another annotations") as refused:
        pins.check("demo.drop", Definition("drop", "Drop.", {"type": "object"}, {"destructiveHint": False}))
    assert refused.value.context["changed"] == ["annotations"]
    assert pins.accept("demo.drop") is not None
    assert pins.pinned()["demo.drop"].annotations == {"destructiveHint": False}


# -- the loop's wire names, on a loopback model server (no MCP server) -----------------------------------


class Charge(BaseModel):
    order_id: str


class Charged(BaseModel):
    order_id: str


def test_a_dotted_tool_name_goes_out_as_a_wire_name_and_the_models_call_comes_back_to_it(
        make_settings: Any) -> None:
    loop_app = App("wire")

    @loop_app.tool(name="billing.charge", effect=False)
    def charge(ctx: ToolContext, args: Charge) -> dict[str, str]:
        """Charge an order."""
        return {"charged": args.order_id}

    script = [tool_calls(("billing_charge", {"order_id": "o-1"})), completion(json.dumps({"order_id": "o-1"}))]
    with FakeOpenAI(Model(script)) as api:
        provider = OpenAIProvider(make_settings(model_provider="openai", model_url=api.url))
        ctx = TestContext(loop_app, model=provider)
        answer = ctx.model.run("charge o-1", tools=["billing.charge"], output=Charged)
    assert answer == Charged(order_id="o-1")
    assert [(c.tool, c.result) for c in ctx.calls] == [("billing.charge", {"charged": "o-1"})]
    [offered] = api.requests[0]["json"]["tools"]
    assert offered["function"]["name"] == "billing_charge" and offered["function"]["description"] == "Charge an order."
    assert offered["function"]["parameters"]["required"] == ["order_id"]


class Anything(BaseModel):
    model_config = ConfigDict(extra="allow")


class Done(BaseModel):
    done: bool


def test_the_local_provider_makes_args_from_the_schema_a_tool_source_presented() -> None:
    from mesh.agents.app import ToolSpec
    from mesh.agents.providers.local import LocalProvider

    schema = {"type": "object", "required": ["table", "rows"],
              "properties": {"table": {"type": "string"}, "rows": {"type": "integer", "minimum": 1}}}
    source = App("source")
    source.add_tool(ToolSpec(name="db.trim", args=Anything, effect=False, description="trim of MCP server db",
                             run=lambda ctx, args: {"trimmed": args.model_dump()}))

    class Described(TestContext):  # a source presenting the tool as an MCP server does
        def _describe(self, spec: Any) -> tuple[str, dict[str, Any] | None, bool]:
            return "Trim a table to its first rows.", schema, False

    ctx = Described(source, model=LocalProvider())
    assert ctx.model.run("trim orders", tools=["db.trim"], output=Done) == Done(done=True)
    # the local provider made the args from the presented schema, not from the generic args model
    [call] = ctx.calls
    assert call.tool == "db.trim" and set(call.result["trimmed"]) == {"table", "rows"}


def test_a_faked_mcp_tool_is_offered_without_asking_its_server() -> None:
    from mesh.testing import TestModel, calls

    faked = App("faked")
    faked.mcp("demo", command=["/nonexistent/mcp-server"], allow=["add"])

    @faked.agent(tools=["demo.add"], input=Task, output=Total)
    def adder(ctx: Any, task: Task) -> Total:
        return ctx.model.run(task.text, output=Total)

    model = TestModel({Total: [calls(("demo_add", {"a": 2, "b": 3})), {"total": 5}]})
    ctx = TestContext(faked, adder, model=model, tools={"demo.add": lambda args: {"sum": 5}})
    assert adder(ctx, Task(text="add 2 and 3")) == Total(total=5)
    assert [(c.tool, c.result) for c in ctx.calls] == [("demo.add", {"sum": 5})]


# -- a real MCP server ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_tool_whose_definition_changed_is_refused_before_the_model_is_shown_it(
        make_settings: Any, rclient: redis.Redis, tmp_path: Path) -> None:
    settings = make_settings(model_provider="openai")
    drifted = App("drifted")
    server = drifted.mcp("demo", command=[sys.executable, SERVER], allow=["add"],
                         env={"MCP_LOG": str(tmp_path / "calls.jsonl"), "MCP_VARIANT": "2"})
    Pins(rclient, Keys(settings.namespace, settings.shard)).check("demo.add", Definition("add", "Add two integers.", {
        "type": "object"}))  # what an earlier registration pinned

    @drifted.agent(tools=["demo.add"], input=Task, output=Total)
    def adder(ctx: Any, task: Task) -> Total:
        return ctx.model.run(task.text, output=Total)

    try:
        with FakeOpenAI(Model([completion(json.dumps({"total": 0}))])) as api:
            provider = OpenAIProvider(settings.model_copy(update={"model_url": api.url}))
            with pytest.raises(ToolRefused, match="another description and input_schema"):
                adder(TestContext(drifted, adder, model=provider, settings=settings), Task(text="add 2 and 3"))
    finally:
        server.close()
    assert api.requests == []  # the model never saw the changed description
    assert "email them to me" in Pins(rclient, Keys(settings.namespace)).drifts()[0].presented.description


# -- a real MCP server, a real worker --------------------------------------------------------------------


@pytest.mark.slow
def test_the_model_calls_an_mcp_tool_shown_as_its_server_presents_it_through_a_worker(
        make_settings: Any, rclient: redis.Redis, worker_process: Any, tmp_path: Path) -> None:
    log = tmp_path / "calls.jsonl"
    script = [tool_calls(("demo_add", {"a": 2, "b": 3})), completion(json.dumps({"total": 5}))]
    with FakeOpenAI(Model(script)) as api:
        mesh = MeshClient(make_settings(), client=rclient, app=app)
        worker_process("--app", APP, **model_env(api, log))
        record = mesh.wait(mesh.send("adder", {"text": "add 2 and 3"}).id, timeout_s=90)
        awaited = mesh.wait(mesh.send("aadder", {"text": "add 2 and 3"}).id, timeout_s=90)

    assert record.state is State.SUCCEEDED, record.error
    assert awaited.state is State.SUCCEEDED, awaited.error
    assert awaited.result["aadder"] == {"total": 5}
    assert api.requests[2]["json"]["tools"] == api.requests[0]["json"]["tools"]  # the async loop shows the same
    assert record.result["adder"] == {"total": 5}
    # the model was shown the server's own description and inputSchema, under a name OpenAI takes
    [offered] = api.requests[0]["json"]["tools"]
    assert offered["function"]["name"] == "demo_add"
    assert offered["function"]["description"] == "Add two integers."
    pinned = Pins(rclient, mesh.keys).pinned()["demo.add"]  # what the server listed, pinned when first seen
    assert offered["function"]["parameters"] == pinned.input_schema
    assert sorted(pinned.input_schema["properties"]) == ["a", "b"]
    # its call reached the server once, under the call's own key; its result went back to the model
    call, acall = seen(log)
    assert call["tool"] == "add" and call["args"] == {"a": 2, "b": 3}
    assert call["meta"]["mesh/key"] == f"{record.steps['adder'].key}/turn-1/call-1"
    assert acall["meta"]["mesh/key"] == f"{awaited.steps['aadder'].key}/turn-1/call-1"
    result = api.requests[1]["json"]["messages"][-1]
    assert result["role"] == "tool" and '"sum":5' in result["content"]


def parked(make_settings: Any, rclient: redis.Redis, worker_process: Any, api: FakeOpenAI,
           log: Path) -> tuple[MeshClient, str]:
    mesh = MeshClient(make_settings(), client=rclient, app=app)
    worker_process("--app", APP, **model_env(api, log))
    flow = check(Pipeline("drops").step("drop", agent="dropper").build(), app)
    job_id = mesh.run(flow, {"text": "drop the table t-1"}).id
    wait_for(lambda: mesh.status(job_id).state is State.AWAITING_APPROVAL, timeout_s=90)
    return mesh, job_id


DROP = [tool_calls(("demo_count", {"table": "t-1"}), turn=1), tool_calls(("demo_drop", {"table": "t-1"}), turn=2),
        completion(json.dumps({"table": "t-1"}))]


@pytest.mark.slow
def test_an_mcp_tool_its_server_marks_destructive_waits_for_approval_then_is_called_once(
        make_settings: Any, rclient: redis.Redis, worker_process: Any, tmp_path: Path) -> None:
    log = tmp_path / "calls.jsonl"
    model = Model(DROP)
    with FakeOpenAI(model) as api:
        mesh, job_id = parked(make_settings, rclient, worker_process, api, log)
        step = mesh.status(job_id).steps["drop"]
        assert step.approval is not None and step.approval.model_extra["call"] == {
            "tool": "demo.drop", "args": {"table": "t-1"}}
        # count is marked destructive and read-only: read-only wins, it did not wait
        assert [c["tool"] for c in seen(log)] == ["count"]
        mesh.approve(job_id, "drop", by="ana")
        record = mesh.wait(job_id, timeout_s=90)

    assert record.state is State.SUCCEEDED, record.error
    assert record.result["drop"] == {"table": "t-1"}
    drops = [c for c in seen(log) if c["tool"] == "drop"]
    assert len(drops) == 1 and drops[0]["meta"]["mesh/key"] == f"{record.steps['drop'].key}/turn-2/call-1"
    assert [c["tool"] for c in seen(log)] == ["count", "drop"]  # count replayed, not called again
    assert model.turns == [1, 2, 3]


@pytest.mark.slow
def test_a_denied_destructive_mcp_call_never_reaches_the_server(
        make_settings: Any, rclient: redis.Redis, worker_process: Any, tmp_path: Path) -> None:
    log = tmp_path / "calls.jsonl"
    with FakeOpenAI(Model(DROP)) as api:
        mesh, job_id = parked(make_settings, rclient, worker_process, api, log)
        mesh.deny(job_id, "drop", reason="not this table", by="ana")
        record = mesh.wait(job_id, timeout_s=60)
    assert record.state is not State.SUCCEEDED
    assert "approval denied by ana: not this table" in (record.steps["drop"].error or "")
    assert [c["tool"] for c in seen(log)] == ["count"]


@pytest.mark.slow
def test_a_worker_killed_mid_loop_repeats_no_mcp_call(make_settings: Any, rclient: redis.Redis,
                                                      worker_process: Any, tmp_path: Path) -> None:
    log = tmp_path / "calls.jsonl"
    script = [*(tool_calls(("demo_add", {"a": n, "b": 100}), turn=n) for n in range(1, 6)),
              completion(json.dumps({"total": 515}))]
    model = Model(script, kill_at=4)  # killed when asked turn 4: after the third call returned
    with FakeOpenAI(model) as api:
        settings = make_settings(heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S)
        mesh = MeshClient(settings, client=rclient, app=app)
        env = model_env(api, log, MESH_HEARTBEAT_TIMEOUT_S=str(HEARTBEAT_TIMEOUT_S))
        model.victim = worker_process("--app", APP, **env)
        ref = mesh.send("adder", {"text": "add 1..5 to 100 each"}, key="add-five")
        assert model.victim.wait(90) == -signal.SIGKILL  # killed by the model server, mid-loop
        worker_process("--app", APP, **env)  # the survivor takes the message over
        record = mesh.wait(ref.id, timeout_s=HEARTBEAT_TIMEOUT_S + 90)

    assert record.state is State.SUCCEEDED, record.error
    calls = seen(log)
    keys = [c["meta"]["mesh/key"] for c in calls]
    # each call reached the server once, by its _meta key: none repeated by the resumed loop
    assert keys == [f"{record.steps['adder'].key}/turn-{n}/call-1" for n in range(1, 6)]
    assert [c["args"]["a"] for c in calls] == [1, 2, 3, 4, 5]
    assert len({c["pid"] for c in calls}) == 2  # two server processes: one per worker
    assert model.turns == [1, 2, 3, 4, 4, 5, 6]
