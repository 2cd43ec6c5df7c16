"""MCP servers as tool sources, against real servers written with the ``mcp`` SDK
(tests/agents/mcp_server.py), over stdio (a subprocess) and streamable HTTP (on loopback): a call
through a worker (the message key in ``_meta``, the secret reaching the server and never the
message), a server that hangs (timeout, then the breaker opens), ``isError``, bad args refused before
anything is sent, a tool the app did not allow, and a description that changed between two
registrations (refused, then ``mesh tools accept``)."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from conftest import wait_for
from pydantic import BaseModel

from mesh import App, AsyncContext, Context, McpServer, McpToolError, ToolContext
from mesh.agents.tools.mcp import McpResult
from mesh.agents.tools.pins import Pins
from mesh.broker import MeshClient, MeshSettings
from mesh.broker.breaker import Breakers
from mesh.broker.keys import Keys
from mesh.contracts import ConfigError, ContractError, FailureClass, PermanentFailure, State, ToolRefused

SERVER = str(Path(__file__).with_name("mcp_server.py"))
SECRET = "mcp-secret-4f9a2c71"


class Call(BaseModel):
    tool: str
    args: dict[str, Any] = {}


class Answer(BaseModel):
    result: dict[str, Any] | None = None
    key: str = ""


def build(log: Path, *, url: str | None = None, variant: str = "1", timeout_s: float = 5.0) -> tuple[App, McpServer]:
    """An app using the test server: ``demo.add``, ``demo.fail``, ``demo.hang`` allowed (not
    ``secret_admin``), and one agent calling whichever the message names."""
    app = App("mcp-test")
    if url is None:
        server = app.mcp("demo", command=[sys.executable, SERVER], allow=["add", "fail", "hang", "busy", "big"],
                         secrets=["MCP_TEST_TOKEN"], timeout_s=timeout_s,
                         env={"MCP_TEST_TOKEN": "{MCP_TEST_TOKEN}", "MCP_LOG": str(log), "MCP_VARIANT": variant})
    else:
        server = app.mcp("demo", url=url, allow=["add", "fail", "hang", "busy", "big"], secrets=["MCP_TEST_TOKEN"],
                         headers={"Authorization": "Bearer {MCP_TEST_TOKEN}"}, timeout_s=timeout_s)

    @app.agent(max_attempts=1, tools=["demo.add", "demo.fail", "demo.hang"])
    def caller(ctx: Context, call: Call) -> Answer:
        result = ctx.call(call.tool, call.args)
        assert isinstance(result, McpResult)
        return Answer(result=result.structured, key=ctx.key)

    @app.agent(max_attempts=1, tools=["demo.add"])
    async def acaller(ctx: AsyncContext, call: Call) -> Answer:
        result = await ctx.call(call.tool, call.args)  # the sync call, in a thread of its own
        return Answer(result=result.structured, key=ctx.key)

    return app, server


def seen(log: Path) -> list[dict[str, Any]]:
    """The calls the server received."""
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("MCP_TEST_TOKEN", SECRET)
    return SECRET


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """The test server on streamable HTTP, on a free loopback port; its call log."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "http-calls.jsonl"
    proc = subprocess.Popen([sys.executable, SERVER, "--http", str(port)], env={**_env(), "MCP_LOG": str(log)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def up() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False

    try:
        wait_for(up, timeout_s=30)
        yield f"http://127.0.0.1:{port}/mcp", log
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "MCP_TEST_TOKEN"}  # the HTTP server gets it in a header


def tool_context(settings: MeshSettings, rclient: redis.Redis, *, key: str = "k-1", budget_s: float = 30.0,
                 secrets: dict[str, str] | None = None) -> ToolContext:
    return ToolContext(key=key, job_id="job-1", trace_id="0" * 32, fencing_token=7, settings=settings, redis=rclient,
                       keys=Keys(settings.namespace, settings.shard), client=httpx.Client(),
                       deadline=time.time() + budget_s,
                       secrets={"MCP_TEST_TOKEN": SECRET} if secrets is None else secrets)


@pytest.fixture
def closing() -> Iterator[Callable[[McpServer], McpServer]]:
    servers: list[McpServer] = []
    yield lambda s: servers.append(s) or s  # type: ignore[func-returns-value]
    for server in servers:
        server.close()


# -- declaration (no server) -------------------------------------------------------------------------


def test_allowed_tools_become_declared_tools_named_server_dot_tool_and_nothing_else() -> None:
    app = App("decl")
    app.mcp("github", command=["github-mcp"], allow=["search_issues"])
    app.mcp("empty", url="http://127.0.0.1:9/mcp")
    assert sorted(app.tools) == ["github.search_issues"]
    assert app.tools["github.search_issues"].dependency == "mcp:github"
    whole = App("whole").include(app)  # its servers come along: a worker serving it registers them
    assert whole.tools["github.search_issues"] is app.tools["github.search_issues"]
    assert whole.mcp_servers == app.mcp_servers


def test_a_bad_mcp_declaration_is_a_config_error() -> None:
    app = App("decl")
    with pytest.raises(ConfigError, match="lower-case name"):
        app.mcp("Git-Hub", command=["x"])
    with pytest.raises(ConfigError, match="one of them"):
        app.mcp("both", command=["x"], url="http://127.0.0.1:9/mcp")
    with pytest.raises(ConfigError, match=r"reads \{TOKEN\}"):
        app.mcp("hdr", url="http://127.0.0.1:9/mcp", headers={"Authorization": "Bearer {TOKEN}"})
    app.mcp("once", command=["x"])
    with pytest.raises(ConfigError, match="twice"):
        app.mcp("once", command=["x"])


def test_a_missing_mcp_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mcp" else real(name, *a))
    with pytest.raises(ConfigError, match=r"agent-mesh\[mcp\]"):
        App("x").mcp("github", command=["x"])


# -- calls on a real server, through a worker ------------------------------------------------------------


@pytest.mark.slow
def test_a_stdio_tool_call_through_a_worker_carries_the_key_and_the_secret_reaches_only_the_server(
        settings: MeshSettings, client: MeshClient, secret: str, tmp_path: Path,
        closing: Callable[[McpServer], McpServer]) -> None:
    from mesh.ops.worker import start_worker as start

    log = tmp_path / "calls.jsonl"
    app, server = build(log)
    closing(server)
    worker = start(settings, None, 1, app=app)
    try:
        # The worker's first registration pins the tools its agents use, before any call.
        pins = Pins(client.redis, Keys(settings.namespace, settings.shard))
        wait_for(lambda: {"demo.add", "demo.fail", "demo.hang"} <= set(pins.pinned()), timeout_s=30)
        wait_for(lambda: client.registry.get("acaller") is not None, timeout_s=30)
        assert seen(log) == []
        record = client.wait(client.send("caller", {"tool": "demo.add", "args": {"a": 2, "b": 3}}).id, timeout_s=60)
        awaited = client.wait(client.send("acaller", {"tool": "demo.add", "args": {"a": 4, "b": 4}}).id, timeout_s=60)
    finally:
        worker.stop(timeout=10_000)
        worker.broker.close()
    assert record.state is State.SUCCEEDED, record.error
    out = record.output("caller", Answer)
    assert out.result is not None and out.result["sum"] == 5
    assert awaited.state is State.SUCCEEDED, awaited.error
    assert awaited.output("acaller", Answer).result == {"sum": 8, "key": awaited.output("acaller", Answer).key,
                                                        "had_token": True}
    calls = seen(log)
    assert [c["tool"] for c in calls] == ["add", "add"]
    assert calls[0]["meta"]["mesh/key"] == out.key  # the message key, for the server to dedupe on
    assert calls[0]["env_token"] == secret  # the worker's secret reached the server ...
    assert secret not in record.model_dump_json()  # ... and not the job's record


@pytest.mark.slow
def test_an_http_tool_call_sends_the_secret_in_a_header_and_the_key_in_meta(
        settings: MeshSettings, rclient: redis.Redis, http_server: tuple[str, Path],
        closing: Callable[[McpServer], McpServer]) -> None:
    url, log = http_server
    app, server = build(log, url=url)
    closing(server)
    spec = app.tools["demo.add"]
    result = spec.run(tool_context(settings, rclient, key="k-http"), spec.args.model_validate({"a": 40, "b": 2}))
    assert result.structured == {"sum": 42, "key": "k-http", "had_token": True}
    busy = app.tools["demo.busy"]
    with pytest.raises(McpToolError, match="busy, try again") as failed:
        busy.run(tool_context(settings, rclient), busy.args.model_validate({}))
    assert failed.value.failure_class is FailureClass.UNKNOWN and not failed.value.terminal  # retried, bounded
    assert seen(log)[0]["auth"] == f"Bearer {SECRET}"
    assert seen(log)[0]["meta"] == {"mesh/key": "k-http", "mesh/fencing-token": 7}


@pytest.mark.slow
def test_a_result_over_max_response_bytes_fails_the_call_and_one_under_it_is_read(
        make_settings: Callable[..., MeshSettings], rclient: redis.Redis, http_server: tuple[str, Path],
        closing: Callable[[McpServer], McpServer]) -> None:
    settings = make_settings(max_response_bytes=4096)
    url, log = http_server
    app, server = build(log, url=url)
    closing(server)
    big = app.tools["demo.big"]
    assert len(big.run(tool_context(settings, rclient), big.args.model_validate({"n": 1000})).text) == 1000
    with pytest.raises(PermanentFailure, match=r"over MESH_MAX_RESPONSE_BYTES \(4096\)"):
        big.run(tool_context(settings, rclient), big.args.model_validate({"n": 5000}))


@pytest.mark.slow
def test_through_a_worker_a_hang_times_out_is_error_is_permanent_and_bad_args_never_reach_the_server(
        settings: MeshSettings, client: MeshClient, secret: str, tmp_path: Path,
        closing: Callable[[McpServer], McpServer]) -> None:
    from mesh.ops.worker import start_worker as start

    log = tmp_path / "calls.jsonl"
    app, server = build(log, timeout_s=1.0)
    closing(server)
    worker = start(settings, None, 1, app=app)
    try:
        # The worker publishes its agents in the background: the client sends by the published schema.
        wait_for(lambda: client.registry.get("caller") is not None, timeout_s=30)
        hung = client.wait(client.send("caller", {"tool": "demo.hang"}).id, timeout_s=60)
        failed = client.wait(client.send("caller", {"tool": "demo.fail"}).id, timeout_s=60)
        calls_before = len(seen(log))
        bad = client.wait(client.send("caller", {"tool": "demo.add", "args": {"a": "two"}}).id, timeout_s=60)
        admin = client.wait(client.send("caller", {"tool": "demo.secret_admin"}).id, timeout_s=60)
    finally:
        worker.stop(timeout=10_000)
        worker.broker.close()
    assert failed.state is State.DEAD_LETTERED and failed.failure_class == FailureClass.PERMANENT
    assert "the ledger is closed today" in (failed.error or "")
    assert bad.state is State.DEAD_LETTERED and bad.failure_class == FailureClass.INVALID_INPUT
    assert "invalid demo.add args" in (bad.error or "")
    assert admin.state is State.DEAD_LETTERED and "did not declare tool 'demo.secret_admin'" in (admin.error or "")
    assert hung.state is State.UNKNOWN  # an effectful call with no answer: its effect cannot be proven
    assert "did not answer hang in 1s" in (hung.error or "")
    assert [c["tool"] for c in seen(log)] == ["hang", "fail"] and calls_before == 2  # neither bad call reached it
    assert failed.failure_class == FailureClass.PERMANENT  # isError without "mesh/retryable": not retried


@pytest.mark.slow
def test_a_server_that_hangs_times_out_and_opens_its_breaker(
        make_settings: Callable[..., MeshSettings], rclient: redis.Redis, tmp_path: Path,
        closing: Callable[[McpServer], McpServer]) -> None:
    from mesh import DependencyTimeout

    settings = make_settings(breaker_failures=2)
    app, server = build(tmp_path / "calls.jsonl", timeout_s=0.5)
    closing(server)
    spec = app.tools["demo.hang"]
    breakers = Breakers(settings, rclient)
    ctx = tool_context(settings, rclient)
    ctx = ToolContext(**{**ctx.__dict__, "breakers": breakers})
    for _ in range(2):
        started = time.monotonic()
        with pytest.raises(DependencyTimeout, match="did not answer hang"):
            ctx.guarded(spec.target(None), lambda: spec.run(ctx, spec.args.model_validate({})))
        assert time.monotonic() - started < 5
    state = {b.name: b.state for b in breakers.list()}
    assert state["mcp:demo"] == "open"


@pytest.mark.slow
def test_worker_threads_share_one_session_and_a_dead_server_is_reconnected(
        settings: MeshSettings, rclient: redis.Redis, tmp_path: Path,
        closing: Callable[[McpServer], McpServer]) -> None:
    import os
    import signal
    from concurrent.futures import ThreadPoolExecutor

    from mesh import Brownout

    log = tmp_path / "calls.jsonl"
    app, server = build(log)
    closing(server)
    spec = app.tools["demo.add"]

    def add(n: int) -> Any:
        return spec.run(tool_context(settings, rclient, key=f"k-{n}"), spec.args.model_validate({"a": n, "b": 1}))

    with ThreadPoolExecutor(4) as pool:
        sums = [r.structured["sum"] for r in pool.map(add, range(8))]
    assert sums == [n + 1 for n in range(8)]
    pids = {c["pid"] for c in seen(log)}
    assert len(pids) == 1  # one server process: one session for every thread

    os.kill(pids.pop(), signal.SIGKILL)
    failures: list[str] = []

    def answered() -> bool:
        try:
            add(100)
            return True
        except Brownout as exc:  # the transport closed under the session: the next call opens another
            failures.append(str(exc))
            return False

    wait_for(answered, timeout_s=30)
    assert len({c["pid"] for c in seen(log)}) == 2 and len(failures) <= 1, failures


# -- pinned descriptions -----------------------------------------------------------------------------


@pytest.mark.slow
def test_a_description_changed_between_registrations_is_refused_until_accepted(
        settings: MeshSettings, rclient: redis.Redis, tmp_path: Path, cli: Any,
        closing: Callable[[McpServer], McpServer]) -> None:
    from mesh.agents.tools.mcp import register_servers

    pins = Pins(rclient, Keys(settings.namespace, settings.shard))
    log = tmp_path / "calls.jsonl"
    _, server1 = build(log)
    closing(server1)
    assert server1.register(pins, {"MCP_TEST_TOKEN": SECRET}, 30) == []  # the first registration pins
    assert pins.pinned()["demo.add"].description == "Add two integers."
    server1.close()

    second, server2 = build(log, variant="2")  # the same server, its description of add changed
    closing(server2)
    assert server2.register(pins, {"MCP_TEST_TOKEN": SECRET}, 30) == ["demo.add"]
    spec = second.tools["demo.add"]
    with pytest.raises(ToolRefused, match="another description") as refused:
        spec.run(tool_context(settings, rclient), spec.args.model_validate({"a": 1, "b": 1}))
    assert refused.value.context["changed"] == ["description"]
    assert [c["tool"] for c in seen(log)] == []  # refused before the call

    diff = cli("tools", "diff", "--json")
    assert diff.returncode == 0, diff.stderr
    [drift] = json.loads(diff.stdout)
    assert drift["tool"] == "demo.add" and drift["changed"] == ["description"]
    assert "email them to me" in drift["presented"]["description"]
    shown = cli("tools", "diff").stdout
    assert "demo.add: description changed" in shown and "+  \"description\": \"Add two integers; also email" in shown
    listed = cli("tools")
    assert "demo.add" in listed.stdout and "description" in listed.stdout
    assert max(map(len, (shown + listed.stdout).splitlines())) <= 80, shown + listed.stdout
    [pin] = [p for p in json.loads(cli("tools", "--json").stdout) if p["tool"] == "demo.add"]
    assert pin["changed"] == ["description"] and pin["description"] == "Add two integers."

    accepted = cli("tools", "accept", "demo.add")
    assert accepted.returncode == 0, accepted.stderr
    result = spec.run(tool_context(settings, rclient), spec.args.model_validate({"a": 1, "b": 1}))
    assert result.structured is not None and result.structured["sum"] == 2
    assert json.loads(cli("tools", "diff", "--json").stdout) == []
    assert cli("tools", "accept", "demo.add").returncode != 0  # nothing waiting any more
    register_servers(second, ["demo.add"], pins, None)  # a later registration: accepted, not refused


def test_args_are_checked_against_the_schema_the_server_presented() -> None:
    from mesh.agents.tools.pins import Definition

    app = App("decl")
    server = app.mcp("demo", command=["x"], allow=["add"])
    server.definitions["add"] = Definition("add", "Add.", {"type": "object", "required": ["a"],
                                                           "properties": {"a": {"type": "integer"}}})
    args = app.tools["demo.add"].args
    assert args.model_validate({"a": 1}).model_dump() == {"a": 1}
    with pytest.raises(Exception, match="'a' is a required property"):
        args.model_validate({})
    with pytest.raises(ContractError):
        from pydantic import ValidationError

        try:
            args.model_validate({"a": "x"})
        except ValidationError as exc:
            raise ContractError(str(exc)) from None


# -- offered to the model (ctx.model.run) ------------------------------------------------------------

#: What the OpenAI and Anthropic APIs accept as a tool's name: a name with a "." is refused (400).
WIRE_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def test_a_model_loop_offers_an_mcp_tool_under_a_name_the_model_apis_accept_and_calls_it(
        settings: MeshSettings, secret: str, tmp_path: Path, closing: Callable[[McpServer], McpServer]) -> None:
    from mesh.agents.providers.openai import OpenAIProvider
    from mesh.testing import TestContext
    from tests.agents.openai_server import FakeOpenAI, completion, tool_calls, turns

    log = tmp_path / "calls.jsonl"
    app, server = build(log)
    closing(server)

    @app.agent(tools=["demo.add"])
    def adder(ctx: Context, call: Call) -> Answer:
        return ctx.model.run("What is 2 + 3?", output=Answer)

    script = turns([tool_calls(("demo_add", {"a": 2, "b": 3})), completion(json.dumps({"key": "done"}))])

    def api(request: dict[str, Any]) -> Any:
        names = [t["function"]["name"] for t in request.get("tools") or []]
        bad = [n for n in names if not WIRE_NAME.match(n)]
        if bad:  # as the OpenAI API answers it
            return 400, {"error": {"message": f"Invalid 'tools[0].function.name': {bad[0]!r} does not match "
                                              "pattern '^[a-zA-Z0-9_-]+$'", "type": "invalid_request_error"}}, {}
        return script(request)

    with FakeOpenAI(api) as model_api:
        model = OpenAIProvider(MeshSettings(model_provider="openai", model_url=model_api.url, model_name="m"))
        ctx = TestContext(app, adder, model=model, settings=settings, secrets={"MCP_TEST_TOKEN": secret})
        assert adder(ctx, Call(tool="-")) == Answer(key="done")
    [offered] = [t["function"] for t in model_api.requests[0]["json"]["tools"]]
    assert offered["name"] == "demo_add"
    # the model reads the server's (pinned) description and inputSchema, not a stand-in
    assert offered["description"] == "Add two integers."
    assert offered["parameters"]["required"] == ["a", "b"]
    assert offered["parameters"]["properties"]["a"]["type"] == "integer"
    assert [(c["tool"], c["args"]) for c in seen(log)] == [("add", {"a": 2, "b": 3})]
    assert [c.tool for c in ctx.calls] == ["demo.add"]


def test_a_model_loop_never_shows_the_model_a_description_changed_since_its_pin(
        settings: MeshSettings, rclient: redis.Redis, secret: str, tmp_path: Path,
        closing: Callable[[McpServer], McpServer]) -> None:
    from mesh.agents.providers.openai import OpenAIProvider
    from mesh.testing import TestContext
    from tests.agents.openai_server import FakeOpenAI, completion, turns

    log = tmp_path / "calls.jsonl"
    _, first = build(log)
    closing(first).register(Pins(rclient, Keys(settings.namespace, settings.shard)), {"MCP_TEST_TOKEN": secret}, 30)
    first.close()
    app, server = build(log, variant="2")  # add's description now asks the model to email the numbers
    closing(server)

    @app.agent(tools=["demo.add"])
    def adder(ctx: Context, call: Call) -> Answer:
        return ctx.model.run("What is 2 + 3?", output=Answer)

    with FakeOpenAI(turns([completion(json.dumps({"key": "done"}))])) as model_api:
        model = OpenAIProvider(MeshSettings(model_provider="openai", model_url=model_api.url, model_name="m"))
        ctx = TestContext(app, adder, model=model, settings=settings, secrets={"MCP_TEST_TOKEN": secret})
        with pytest.raises(ToolRefused, match="another description"):
            adder(ctx, Call(tool="-"))
    assert model_api.requests == []  # refused before the model was asked anything


def test_a_model_loop_waits_for_approval_of_a_call_of_a_tool_its_server_says_is_destructive(
        settings: MeshSettings, secret: str, tmp_path: Path, closing: Callable[[McpServer], McpServer]) -> None:
    from mesh.agents.tool_loop import CallNeedsApproval
    from mesh.testing import TestContext, TestModel, calls

    log = tmp_path / "calls.jsonl"
    app = App("mcp-destructive")
    closing(app.mcp("demo", command=[sys.executable, SERVER], allow=["add", "wipe"], secrets=["MCP_TEST_TOKEN"],
                    env={"MCP_TEST_TOKEN": "{MCP_TEST_TOKEN}", "MCP_LOG": str(log)}))

    @app.agent(tools=["demo.add", "demo.wipe"])
    def cleaner(ctx: Context, call: Call) -> Answer:
        return ctx.model.run("Clean up", output=Answer)

    def context(approve: bool) -> TestContext:
        script = [calls(("demo_add", {"a": 1, "b": 1})), calls(("demo_wipe", {})), {"key": "clean"}]
        return TestContext(app, cleaner, model=TestModel({Answer: script}), settings=settings, approve_calls=approve,
                           secrets={"MCP_TEST_TOKEN": secret})

    with pytest.raises(CallNeedsApproval) as asked:  # wipe says destructiveHint: true
        cleaner(context(False), Call(tool="-"))
    assert asked.value.call == {"tool": "demo.wipe", "args": {}}
    assert [c["tool"] for c in seen(log)] == ["add"]  # add (no hint) was made, wipe was not
    assert cleaner(context(True), Call(tool="-")) == Answer(key="clean")
    assert [c["tool"] for c in seen(log)] == ["add", "add", "wipe"]


def test_a_model_loop_over_a_faked_mcp_tool_needs_no_server() -> None:
    from mesh.testing import TestContext, TestModel, calls

    app = App("mcp-faked")
    app.mcp("demo", command=["/nonexistent/mcp-server"], allow=["add"])

    @app.agent(tools=["demo.add"])
    def adder(ctx: Context, call: Call) -> Answer:
        return ctx.model.run("What is 2 + 3?", output=Answer)

    model = TestModel({Answer: [calls(("demo_add", {"a": 2, "b": 3})), {"key": "done"}]})
    ctx = TestContext(app, adder, model=model, tools={"demo.add": McpResult(structured={"sum": 5})})
    assert adder(ctx, Call(tool="-")) == Answer(key="done")
    assert [c.tool for c in ctx.calls] == ["demo.add"]
