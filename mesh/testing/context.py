"""``TestContext``: a :class:`~mesh.Context` for a handler called directly in a unit test.

    ctx = TestContext(app, "file", tools={"file_ticket": Receipt(tool="file_ticket", effect_id="TCK-1")})
    filed = file(ctx, filing)                   # the declared agent, called as the plain function
    assert ctx.calls[0].tool == "file_ticket"   # (tool, args, result) of every call

Its identity is fixed (``key``, ``job_id``, ``trace_id``, ``step_id``, ``attempt``, ``token``), its
deadline is read on a :class:`~mesh.testing.TestClock` (``ctx.advance(s)``), ``progress`` notes are
kept in ``progress_notes``, ``cancelled`` is settable and ``model`` is a :class:`~mesh.testing.TestModel`.
A tool is a fake the test gives (a function of the validated args, or the result itself) or the
app's declared tool, run in this process with the secrets the test gives; either way the call is
checked as a worker checks it (declared by the agent, its args validated) and recorded.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import httpx
import redis
from pydantic import BaseModel

from mesh.agents import credentials, tool_loop
from mesh.agents.app import Agent, AgentSpec, App, Tool, ToolSpec
from mesh.agents.context import Context, StepModel, _classified, validated_args
from mesh.agents.event_loop import resolve
from mesh.agents.providers import ModelProvider
from mesh.agents.tools.allow import Resolver, system_resolver
from mesh.agents.tools.base import ToolContext
from mesh.agents.tools.http import GuardedHttp
from mesh.broker.connection import connect
from mesh.broker.idempotency import Lease
from mesh.broker.keys import Keys
from mesh.broker.settings import MeshSettings
from mesh.contracts import ConfigError, Envelope, MeshError, ToolRefused

from .clock import TestClock
from .model import TestModel

if typing.TYPE_CHECKING:
    from mesh.agents.runtime import AgentRuntime

#: A tool as a test names it: its name, or the declared function (``@app.tool`` returns it).
ToolRef = str | Callable[..., Any]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


class ToolCall(NamedTuple):
    """One tool call a handler made: the tool's name, its args (validated when the tool is declared)
    and what it returned, or the exception it raised."""

    tool: str
    args: Any
    result: Any


class _NoRuntime:
    """What a TestContext has instead of a worker's runtime: anything reaching for it is told why."""

    def __getattr__(self, name: str) -> Any:
        raise MeshError(f"a TestContext has no worker runtime (asked for {name!r}): use TestMesh to run "
                        "agents on a worker")


class TestContext(Context):
    """A ``Context`` made by a test (see the module). ``app`` and ``agent`` (the declared function
    or its name) give the agent's declared tools; without an agent, any of the app's tools or of
    ``tools`` may be called. ``tools``: fakes by tool name or declared function, each a function of
    the args or the result itself; a declared tool without a fake runs for real, given ``secrets`` (a
    dict, never the environment), ``http`` (an ``httpx.Client``, e.g. over ``httpx.MockTransport``;
    ``ahttp``: the ``httpx.AsyncClient`` of ``ctx.ahttp`` and of an async handler's ``ctx.http``)
    and ``resolve``. ``deadline_s``: seconds until the deadline on ``clock``."""

    __test__ = False  # not a pytest test class
    _ledger = False  # no effect ledger: a tool loop's recorded call is replayed, not met again

    def __init__(self, app: App | None = None, agent: str | Callable[..., Any] | None = None, *,
                 model: TestModel | ModelProvider | None = None, tools: Mapping[ToolRef, Any] | None = None,
                 secrets: Mapping[str, str] | None = None, key: str = "test-key", job_id: str = "test-job",
                 trace_id: str = TRACE_ID, step_id: str | None = None, attempt: int = 1, token: int = 1,
                 deadline_s: float = 60.0, clock: TestClock | None = None, http: httpx.Client | None = None,
                 ahttp: httpx.AsyncClient | None = None, resolve: Resolver = system_resolver,
                 settings: MeshSettings | None = None, checkpoints: tool_loop.MemoryCheckpoints | None = None,
                 approve_calls: bool = True) -> None:
        self.app = app
        self.clock = clock or TestClock()
        spec = _agent(app, agent)
        self._agent_given = agent is not None
        self.runtime = typing.cast("AgentRuntime", _NoRuntime())
        self.spec = spec
        self.env = Envelope(key=key, job_id=job_id, step_id=step_id or spec.name, agent=spec.name, trace_id=trace_id,
                            deadline=self.clock.now_s() + deadline_s, attempt=attempt, payload={})
        self.lease = Lease(key=key, claim_key=f"claim:{key}", owner="test", token=token, envelope=self.env.model_dump())
        self._effects = None
        self._model: TestModel | ModelProvider = model or TestModel()
        if isinstance(self._model, TestModel):
            self._model.context = self  # its ``run`` is this context's tool loop
        self._fakes = {_tool_name(app, t): fake for t, fake in (tools or {}).items()}
        self._secrets = dict(secrets or {})
        self._settings = settings or MeshSettings(namespace="mesh-testing")
        #: The settings' Redis client, as a worker's (``connect``: a single server's, a cluster's, Sentinel's),
        #: made at the first tool call (a single server's connects only if a tool uses it).
        self._redis: redis.Redis | None = None
        self._http = http
        self._ahttp = ahttp
        self._resolve = resolve
        #: Every ``progress`` note, in order.
        self.progress_notes: list[str] = []
        #: Every tool call, in order: ``(tool, args, result)``; ``result`` is the exception when it raised.
        self.calls: list[ToolCall] = []
        #: A tool loop's turns and calls (``ctx.model.run``): shared with another TestContext, its loop
        #: resumes from them as a redelivered step's does.
        self.checkpoints = checkpoints if checkpoints is not None else tool_loop.MemoryCheckpoints()
        #: What a tool loop did without a call, in order: ``tool_replayed``, ``tool_refused``, ``approval``.
        self.loop_events: list[dict[str, Any]] = []
        #: Whether a tool loop's destructive calls are approved (False: CallNeedsApproval, as a step waits).
        self.approve_calls = approve_calls

    def __repr__(self) -> str:
        return f"TestContext(agent={self.spec.name!r}, key={self.key!r}, job_id={self.job_id!r})"

    @property
    def cancelled(self) -> bool:
        """The job was cancelled: set it (``ctx.cancelled = True``) to test how the handler stops."""
        return self.lease.cancelled

    @cancelled.setter
    def cancelled(self, value: bool) -> None:
        self.lease.cancelled = value

    @property
    def model(self) -> Any:
        """The test's model: its :class:`~mesh.testing.TestModel` itself, or the provider it gave
        (``LocalProvider()``, an ``OpenAIProvider`` on a loopback server) whose ``run`` (a tool loop)
        calls tools through this context's ``call``."""
        return self._model if isinstance(self._model, TestModel) else StepModel(self._model, None, self)

    def _loop_tools(self, tools: Sequence[Tool[Any, Any] | str] | None) -> list[ToolSpec]:
        if self.app is None:
            raise ConfigError("ctx.model.run offers the app's declared tools: TestContext(app, agent)")
        declared = list(self.spec.tools) if self._agent_given else list(self.app.tools)
        return [self.app.tools[name] for name in tool_loop.offered(declared, tools, self.spec.name)]

    def _describe(self, spec: ToolSpec) -> tuple[str, dict[str, Any] | None, bool]:
        """A faked tool is shown as declared: a faked MCP tool's server is never reached."""
        if spec.name in self._fakes:
            return spec.description, None, spec.destructive
        return super()._describe(spec)

    def _checkpoints(self) -> tool_loop.Checkpoints:
        """The tool loop's checkpoints, in :attr:`checkpoints` (give one to resume a loop)."""
        return self.checkpoints

    def _loop_event(self, kind: str, **fields: Any) -> None:
        self.loop_events.append({"event": kind, **fields})

    def _approve(self, spec: ToolSpec, args: BaseModel) -> None:
        """A destructive call of a tool loop: approved when ``approve_calls`` (recorded in
        ``loop_events`` as ``approval``), else CallNeedsApproval, as a worker parks the step."""
        call = {"tool": spec.name, "args": args.model_dump(mode="json", by_alias=True)}
        if not self.approve_calls:
            raise tool_loop.CallNeedsApproval(f"{spec.name} is destructive: its call waits for a person's approval",
                                              call=call, hash="")
        self.loop_events.append({"event": "approval", **call})

    @property
    def http(self) -> GuardedHttp:
        """HTTP with the mesh's guards (the allowlist, no redirects, a bounded body) through ``http``."""
        return GuardedHttp(self._tool_context(None), lambda method: None)

    def deadline_left_s(self) -> float:
        """Seconds until the deadline on the test's clock (``advance`` spends them)."""
        return self.env.remaining_s(self.clock.now_s())

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass on the test's clock."""
        self.clock.advance(seconds)

    def progress(self, note: str) -> None:
        self.progress_notes.append(note)

    def call(self, tool: ToolRef, args: BaseModel | dict[str, Any]) -> Any:
        """Call a tool as a worker would (refused unless the agent declared it, args validated), by
        name or by the declared function; recorded in ``calls``."""
        name = _tool_name(self.app, tool)
        if self._agent_given and name not in self.spec.tools:
            raise ToolRefused(f"agent {self.spec.name!r} did not declare tool {name!r}; it declared "
                              f"{list(self.spec.tools) or 'none'}", tool=name)
        return self._invoke(name, args)

    def undo(self, calls: list[dict[str, Any]]) -> dict[str, Any]:
        for undo in calls:
            self._invoke(str(undo.get("tool")), undo.get("args") or {})
        return {"undone": len(calls)}

    def _invoke(self, name: str, args: BaseModel | dict[str, Any]) -> Any:
        spec = self.app.tools.get(name) if self.app is not None else None
        if spec is None and name not in self._fakes:
            raise ToolRefused(f"no tool {name!r}: declare it on the app or give a fake (tools={{{name!r}: ...}})",
                              tool=name)
        typed: Any = args if spec is None else validated_args(spec, args)
        try:
            result = resolve(self._run(spec, typed) if name not in self._fakes else _fake(self._fakes[name], typed))
        except BaseException as exc:
            self.calls.append(ToolCall(name, typed, exc))
            raise
        self.calls.append(ToolCall(name, typed, result))
        if spec is not None and spec.effect and spec.compensate:
            self.lease.undo_calls.append({"tool": spec.compensate,
                                          "args": typed.model_dump(mode="json", by_alias=True)})
        return result

    def _run(self, spec: ToolSpec | None, args: BaseModel) -> Any:
        assert spec is not None
        dependency = spec.target(args) if spec.dependency is not None else None
        tool_ctx = self._tool_context(spec, dependency)
        if spec.mint is not None:  # minted for each call, as a worker does
            tool_ctx = dataclasses.replace(tool_ctx, minted=credentials.mint(spec, args, tool_ctx, self.env))
        if dependency is None:
            return spec.run(tool_ctx, args)
        return _classified(dependency, spec.run, tool_ctx, args)

    def _confirm(self, call: str, *, effect: bool) -> None:
        """No lease to confirm: the test holds the step."""

    def _redis_client(self) -> redis.Redis:
        if self._redis is None:
            self._redis = connect(self._settings)
        return self._redis

    def _tool_context(self, spec: ToolSpec | None, dependency: str | None = None) -> ToolContext:
        missing = [n for n in (spec.secrets if spec is not None else ()) if n not in self._secrets]
        if spec is not None and missing:
            raise ConfigError(f"tool {spec.name!r} reads secrets {missing}: give them to the TestContext "
                              f"(secrets={{{missing[0]!r}: ...}}) or fake the tool")
        if self._http is None:
            self._http = httpx.Client()
        settings = self._settings
        return ToolContext(key=self._call_key or self.key, job_id=self.job_id, trace_id=self.trace_id,
                           fencing_token=self.token,
                           settings=settings, redis=self._redis_client(),
                           keys=Keys(settings.namespace, settings.shard), client=self._http, deadline=self.deadline,
                           clock=self.clock.now_s, resolve=self._resolve, dependency=dependency,
                           allow=spec.allowlist(settings) if spec is not None else None, aclient=self._ahttp,
                           secrets={n: self._secrets[n] for n in spec.secrets} if spec is not None else {})


def _agent(app: App | None, agent: str | Callable[..., Any] | None) -> AgentSpec:
    """The declared agent (by name or function), or one named ``test`` that declares nothing."""
    if agent is None:
        return AgentSpec(name="test", input=BaseModel, output=BaseModel, handler=lambda ctx, x: x)
    if app is None:
        raise ConfigError("TestContext(agent=...) needs the app that declares it: TestContext(app, agent)")
    name = agent if isinstance(agent, str) else agent.name if isinstance(agent, Agent) else next(
        (s.name for s in app.agents.values() if s.handler is agent), getattr(agent, "__name__", "?"))
    if name not in app.agents:
        raise ConfigError(f"app {app.name!r} declares no agent {name!r}; agents are {sorted(app.agents)}")
    return app.agents[name]


def _tool_name(app: App | None, tool: ToolRef) -> str:
    if isinstance(tool, str):
        return tool
    if isinstance(tool, Tool):
        return tool.name
    declared = (s.name for s in app.tools.values() if s.run is tool) if app is not None else iter(())
    return next(declared, getattr(tool, "__name__", repr(tool)))


def _fake(fake: Any, args: Any) -> Any:
    """A fake's answer: a function is called with the args, anything else is the result."""
    return fake(args) if callable(fake) and not isinstance(fake, BaseModel) else fake
