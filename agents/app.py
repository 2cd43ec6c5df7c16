"""``App``: how users put their own agents and tools on the mesh.

    from mesh import App, Context
    from pydantic import BaseModel

    app = App("support")

    class Ticket(BaseModel):
        text: str

    class Triage(BaseModel):
        queue: str
        confidence: float

    @app.agent(version=1, time_limit_s=60, max_attempts=4)  # queue "triage" by default
    def triage(ctx: Context, ticket: Ticket) -> Triage:      # models read from the signature
        ...

    @app.tool(dependency="tickets.internal:443", secrets=["TICKETS_TOKEN"], effect=True)
    def file_ticket(ctx: ToolContext, args: FileTicket) -> Receipt: ...

Workers load an app by import path (``mesh worker --app support.agents:app``). The built-in
planner, researcher and executor are declared the same way (:mod:`mesh.agents.builtin`); there is
no private path. A declared agent is still the plain function (callable in a unit test): ``@app.agent``
returns an :class:`Agent` that calls it and carries its spec, typed by the function's signature
(``Agent[Ticket, Triage]``), so ``client.send(triage, Ticket(...))``, ``ctx.call(file_ticket, ...)``
and ``record.output(triage)`` are checked by a type checker; ``@app.tool`` returns a :class:`Tool`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import re
import typing
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, cast, overload

from pydantic import BaseModel

from mesh.contracts import AgentRef, ConfigError
from mesh.contracts.flow import FlowLimits, flow_limits

from .credentials import Minter, check_minter
from .names import name_problem
from .tools.allow import parse_allowlist

if TYPE_CHECKING:
    from mesh.agents.pipelines import Pipeline, PipelineSpec
    from mesh.broker.settings import MeshSettings

    from .async_context import AsyncContext
    from .context import Context
    from .tools.base import ToolContext
    from .tools.mcp import McpServer

In = TypeVar("In", bound=BaseModel)
Out = TypeVar("Out", bound=BaseModel)
Args = TypeVar("Args", bound=BaseModel)
R = TypeVar("R")

#: A tool's ``allow=``: see :attr:`ToolSpec.allow`.
Allow = Iterable[str] | Callable[[frozenset[str]], Iterable[str]] | None
#: A queue's name (an agent's own name follows :data:`mesh.agents.names.NAME`, which has no ``-``).
NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
#: Names of the mesh's own keys (``broker/keys.py``): a queue of that name would share the key.
RESERVED = frozenset({"breakers", "routes", "running", "outcomes", "jobs", "dlq", "notes", "stats", "claim", "job",
                      "trace", "hist", "note", "breaker", "registry", "sweep", "fence", "ledger"})


@dataclass(frozen=True)
class AgentSpec:
    """A declared agent: its contract, its policy and its handler ``(ctx, input) -> output``."""

    name: str
    input: type[BaseModel]
    output: type[BaseModel]
    handler: Callable[..., Any]
    #: The contract version: a message sent for another version is dead-lettered, never run.
    version: int = 1
    queue: str = ""
    #: The handler's time limit (s); None: MESH_TIME_LIMIT_S. Always cut to the job's deadline.
    time_limit_s: float | None = None
    #: Retries of retryable failures (brownout, invalid output, unknown) after the first attempt;
    #: None: MESH_MAX_RETRIES. ``@app.agent(max_attempts=n)`` sets it to ``n - 1``.
    max_retries: int | None = None
    #: Retries of a timed-out attempt: 0 for agents with outside effects (the call may have acted).
    timeout_retries: int = 0
    #: Tools the handler may call through ``ctx.call``.
    tools: tuple[str, ...] = ()
    description: str = ""
    #: Fleet-wide rate and concurrency limits on its messages (``@app.agent(rate=..., concurrency=...)``);
    #: None: none. See docs/guides/limits.md.
    limits: FlowLimits | None = None

    def __post_init__(self) -> None:
        if not self.queue:
            object.__setattr__(self, "queue", self.name)

    @property
    def max_attempts(self) -> int | None:
        """All attempts of a retryable failure, the first included (as a step's
        ``retry_policy.max_attempts`` counts them); None: MESH_MAX_RETRIES + 1."""
        return None if self.max_retries is None else self.max_retries + 1


@dataclass(frozen=True)
class ToolSpec:
    """A declared tool: an args model, the dependency it calls, the secrets it needs."""

    name: str
    args: type[BaseModel]
    run: Callable[..., Any]
    #: The dependency a call reaches: the breaker's identity (e.g. ``host:port``), fixed or from the
    #: args; None: the mesh's own store, no breaker.
    dependency: str | Callable[[Any], str] | None = None
    #: Names of the secrets the tool reads (``ctx.secret(NAME)``): from the worker's environment or
    #: MESH_SECRETS_DIR, at run time; they reach this tool and no other code.
    secrets: tuple[str, ...] = ()
    #: Whether a call changes something outside the mesh: an attempt that made one is never re-run blindly.
    effect: bool = True
    description: str = ""
    #: An independent check that the call's effect happened, run after the tool says ok and on
    #: recovery from a crash between the call and its outcome: ``verify(ctx, args, result)`` with
    #: ``result`` None when no outcome was written; it returns True (verified) or what it found
    #: (verified, and the call's result), False (refuted) or None (cannot decide: ``unknown``);
    #: raising EffectRefuted refutes with its message, any other error is ``unknown``. None: the
    #: tool has no verifier and its calls show ``unverified`` (see docs/guides/effects.md).
    verify: Callable[..., Any] | None = None
    #: What the tool's HTTP may reach (``send_request``, ``ctx.http``): None for MESH_HTTP_ALLOW; a
    #: list of ``host:port`` for exactly those; a function of MESH_HTTP_ALLOW's entries (normal form)
    #: returning the tool's, to widen (``lambda base: base | {"api.example.com:443"}``) or narrow it.
    allow: Allow = None
    #: The declared tool that undoes a call of this one (called with the same args) when the job of
    #: the step that made the call halts or is cancelled: see docs/guides/compensation.md.
    compensate: str | None = None
    #: Mints a short-lived credential just before each call, ``mint(scope) -> Credential`` (or
    #: ``async def``); the tool reads it as ``ctx.credential`` (:mod:`mesh.agents.credentials`).
    mint: Minter | None = None
    #: A call the model asks for in a tool loop (``ctx.model.run``) waits for a person's approval of
    #: exactly that call (tool and args): see docs/guides/tool-loop.md.
    destructive: bool = False

    def allowlist(self, settings: MeshSettings) -> frozenset[str] | None:
        """The ``host:port`` entries (normal form) this tool may reach; None: MESH_HTTP_ALLOW's."""
        if self.allow is None:
            return None
        if callable(self.allow):
            base = parse_allowlist(settings.http_allowlist)
            return parse_allowlist(self.allow(base))
        return parse_allowlist(self.allow)

    def target(self, args: Any) -> str:
        """The dependency a call with ``args`` reaches ("?" when the args do not say)."""
        if self.dependency is None:
            return "mesh"
        if isinstance(self.dependency, str):
            return self.dependency
        try:
            return self.dependency(args)
        except ValueError:
            return "?"


class Agent(AgentRef[In, Out]):
    """What ``@app.agent`` returns: still the function (``triage(ctx, ticket)`` runs it, as a unit test
    does), with its :class:`AgentSpec` (``.spec``). The client, job records and pipelines take it where
    they take the agent's name, typed by its models: ``client.send(triage, Ticket(...))`` returns a
    ``JobRef[Triage]``."""

    def __init__(self, fn: Callable[[Context, In], Out], spec: AgentSpec) -> None:
        super().__init__(spec.name, cast("type[In]", spec.input), cast("type[Out]", spec.output), queue=spec.queue,
                         version=spec.version)
        self.spec = spec
        self.fn = fn
        functools.update_wrapper(self, fn)

    def flow_key(self, payload: dict[str, Any]) -> str | None:
        """The flow key a message to this agent with ``payload`` carries (its limits' ``key`` rendered)."""
        if self.spec.limits is None or self.spec.limits.key is None:
            return None  # what render_flow_key answers, without its import on every send
        from .flow import render_flow_key

        return render_flow_key(self.spec.limits, payload, agent=self.name, input_model=self.spec.input)

    @overload
    def __call__(self, ctx: Context, input: In) -> Out: ...
    @overload
    def __call__(self, ctx: AsyncContext, input: In) -> Coroutine[Any, Any, Out]: ...

    def __call__(self, ctx: Any, input: In) -> Any:
        """The handler: ``triage(ctx, ticket)``; an ``async def`` one is given an ``AsyncContext``
        and awaited (``await answer(AsyncContext(ctx), question)`` in a unit test)."""
        from .async_context import AsyncContext

        if inspect.iscoroutinefunction(self.fn) and not isinstance(ctx, AsyncContext):
            # else its first ``await`` of a sync result fails far from the mistake ("object str can't
            # be used in 'await' expression")
            raise TypeError(f"agent {self.name!r} is an async def handler: give it an AsyncContext, as a worker "
                            f"does (in a unit test: await {self.name}(AsyncContext(ctx), input))")
        return self.fn(ctx, input)


class Tool(Generic[Args, R]):
    """What ``@app.tool`` returns: still the function (``post_hook(tool_ctx, args)`` runs it), with its
    :class:`ToolSpec` (``.spec``); ``ctx.call(post_hook, Hook(...))`` is typed by it (returns ``R``)."""

    def __init__(self, fn: Callable[[ToolContext, Args], R], spec: ToolSpec) -> None:
        self.spec = spec
        self.name = spec.name
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __call__(self, ctx: ToolContext, args: Args) -> R:
        return self.fn(ctx, args)

    def __repr__(self) -> str:
        return f"<tool {self.name} ({self.spec.args.__name__})>"


class DeclareAgent(Protocol):
    """What ``@app.agent(...)`` with options returns: the decorator, typed as ``@app.agent`` is."""

    @overload
    def __call__(self, fn: Callable[[Context, In], Out], /) -> Agent[In, Out]: ...
    @overload
    def __call__(self, fn: Callable[[AsyncContext, In], Coroutine[Any, Any, Out]], /) -> Agent[In, Out]: ...
    @overload
    def __call__(self, fn: Callable[..., Any], /) -> Agent[Any, Any]: ...


class DeclareTool(Protocol):
    """What ``@app.tool(...)`` with options returns: the decorator, typed as ``@app.tool`` is."""

    @overload
    def __call__(self, fn: Callable[[ToolContext, Args], R], /) -> Tool[Args, R]: ...
    @overload
    def __call__(self, fn: Callable[..., Any], /) -> Tool[Any, Any]: ...


def _named(given: str | Tool[Any, Any]) -> str:
    return given if isinstance(given, str) else given.name


class App:
    """The agents, tools and pipelines of one application."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.agents: dict[str, AgentSpec] = {}
        self.tools: dict[str, ToolSpec] = {}
        self.pipelines: dict[str, PipelineSpec] = {}
        self.mcp_servers: dict[str, McpServer] = {}
        #: The declared limits of dependencies (``@app.tool(dependency=..., rate=...)``, :meth:`dependency`).
        self.dependencies: dict[str, FlowLimits] = {}

    @overload
    def agent(self, fn: Callable[[Context, In], Out], /) -> Agent[In, Out]: ...
    @overload
    def agent(self, fn: Callable[[AsyncContext, In], Coroutine[Any, Any, Out]], /) -> Agent[In, Out]: ...
    @overload
    def agent(self, fn: Callable[..., Any], /) -> Agent[Any, Any]: ...
    @overload
    def agent(self, fn: None = None, /, *, name: str | None = None, input: type[BaseModel] | None = None,
              output: type[BaseModel] | None = None, version: int = 1, queue: str | None = None,
              time_limit_s: float | None = None, max_attempts: int | None = None, max_retries: int | None = None,
              timeout_retries: int = 0, tools: Iterable[str | Tool[Any, Any]] = (), rate: Any = None,
              concurrency: Any = None) -> DeclareAgent: ...

    def agent(self, fn: Callable[..., Any] | None = None, /, *, name: str | None = None,
              input: type[BaseModel] | None = None, output: type[BaseModel] | None = None,
              version: int = 1, queue: str | None = None, time_limit_s: float | None = None,
              max_attempts: int | None = None, max_retries: int | None = None, timeout_retries: int = 0,
              tools: Iterable[str | Tool[Any, Any]] = (), rate: Any = None, concurrency: Any = None) -> Any:
        """Declare ``fn(ctx, input) -> output`` as an agent; the models default to its annotations.
        Returns an :class:`Agent`: the function still, typed by its models. ``tools``: the tools its
        handler may call, by name or as declared (``tools=[file_ticket]``). ``max_attempts`` counts
        every attempt of a retryable failure, the first included, as a pipeline step's
        ``retry_policy.max_attempts`` does; ``max_retries``, its older spelling, counts the retries
        after the first (``max_attempts - 1``). Give one of the two. ``rate`` (``{"requests": "600/min",
        "tokens": "90000/min"}``, or ``"600/min"`` for requests) and ``concurrency`` (``{"max": 4, "key":
        "input.tenant"}``, or ``4``): fleet-wide limits on its messages (docs/guides/limits.md)."""

        def declare(fn: Callable[..., Any]) -> Agent[Any, Any]:
            _not_generator(fn, "agent")
            agent_name = name or fn.__name__
            retries = _retries(agent_name, max_attempts, max_retries)
            limits = _limits(f"agent {agent_name!r}", rate, concurrency)
            in_model, out_model = _models(fn, input, output)
            spec = AgentSpec(
                name=agent_name, input=in_model, output=out_model, handler=fn, version=version,
                queue=queue or agent_name, time_limit_s=time_limit_s, max_retries=retries,
                timeout_retries=timeout_retries, tools=tuple(map(_named, tools)), description=_doc(fn),
                limits=limits)
            self.add_agent(spec)
            return Agent(fn, spec)

        return declare(fn) if fn is not None else declare

    @overload
    def tool(self, fn: Callable[[ToolContext, Args], R], /, *, name: str | None = None,
             args: type[BaseModel] | None = None, dependency: str | Callable[[Any], str] | None = None,
             secrets: Iterable[str] = (), effect: bool = True, allow: Allow = None,
             compensate: str | Tool[Any, Any] | None = None,
             verify: Callable[..., Any] | None = None, mint: Minter | None = None,
             destructive: bool = False, rate: Any = None, concurrency: Any = None) -> Tool[Args, R]: ...
    @overload
    def tool(self, fn: Callable[..., Any], /, *, name: str | None = None,
             args: type[BaseModel] | None = None, dependency: str | Callable[[Any], str] | None = None,
             secrets: Iterable[str] = (), effect: bool = True, allow: Allow = None,
             compensate: str | Tool[Any, Any] | None = None,
             verify: Callable[..., Any] | None = None, mint: Minter | None = None,
             destructive: bool = False, rate: Any = None, concurrency: Any = None) -> Tool[Any, Any]: ...
    @overload
    def tool(self, fn: None = None, /, *, name: str | None = None,
             args: type[BaseModel] | None = None, dependency: str | Callable[[Any], str] | None = None,
             secrets: Iterable[str] = (), effect: bool = True, allow: Allow = None,
             compensate: str | Tool[Any, Any] | None = None,
             verify: Callable[..., Any] | None = None, mint: Minter | None = None,
             destructive: bool = False, rate: Any = None, concurrency: Any = None) -> DeclareTool: ...

    def tool(self, fn: Callable[[ToolContext, Args], R] | None = None, /, *, name: str | None = None,
             args: type[BaseModel] | None = None, dependency: str | Callable[[Any], str] | None = None,
             secrets: Iterable[str] = (), effect: bool = True, allow: Allow = None,
             compensate: str | Tool[Any, Any] | None = None, verify: Callable[..., Any] | None = None,
             mint: Minter | None = None, destructive: bool = False, rate: Any = None,
             concurrency: Any = None) -> Any:
        """Declare ``fn(ctx, args) -> result`` as a tool agents may call; returns a :class:`Tool`, the
        function still, typed by its args and result. ``allow``: the ``host:port``
        its HTTP may reach, or a function of MESH_HTTP_ALLOW's entries (see :attr:`ToolSpec.allow`).
        ``compensate``: the declared tool that undoes a call of this one, given the same args (run,
        last call first, when the job of the step that made the calls halts or is cancelled).
        ``verify``: a check that the call's effect happened (see :attr:`ToolSpec.verify`).
        ``mint``: mints the call's short-lived credential, ``ctx.credential`` (see :attr:`ToolSpec.mint`).
        ``destructive``: each call the model asks for waits for a person's approval (:attr:`ToolSpec.destructive`).
        ``rate`` / ``concurrency``: the limits of its ``dependency`` (a fixed one), as :meth:`dependency` declares."""
        undo = None if compensate is None else _named(compensate)
        if rate is not None or concurrency is not None:
            if not isinstance(dependency, str):
                raise ConfigError(f"tool {name or getattr(fn, '__name__', '?')!r}: rate= and concurrency= limit its "
                                  "dependency: declare dependency= as a fixed name (\"api.example.com:443\")")
            self.dependency(dependency, rate=rate, concurrency=concurrency)
        for option, given in (("compensate", undo), ("verify", verify)):
            if given is not None and not effect:
                raise ConfigError(f"tool {name or getattr(fn, '__name__', '?')!r}: {option}= concerns an effect; "
                                  "a tool declared effect=False has none")
        fixed = tuple(allow) if allow is not None and not callable(allow) else allow
        if fixed is not None and not callable(fixed):
            parse_allowlist(fixed)  # a bad entry fails the declaration, not the first call

        def declare(fn: Callable[[ToolContext, Args], R]) -> Tool[Args, R]:
            _not_generator(fn, "tool")
            if verify is not None:
                _not_generator(verify, "verifier")
            if mint is not None:
                check_minter(name or fn.__name__, mint)
            args_model = args or _models(fn, None, None, need_output=False)[0]
            spec = ToolSpec(name=name or fn.__name__, args=args_model, run=fn, dependency=dependency,
                            secrets=tuple(secrets), effect=effect, description=_doc(fn), allow=fixed,
                            compensate=undo, verify=verify, mint=mint, destructive=destructive)
            self.add_tool(spec)
            return Tool(fn, spec)

        return declare(fn) if fn is not None else declare

    def dependency(self, name: str, *, rate: Any = None, concurrency: Any = None) -> FlowLimits:
        """Declare the fleet-wide limits of dependency ``name`` (a tool's ``dependency=``): ``rate``
        (``{"requests": "50/s"}``) and ``concurrency`` (``{"max": 4}``), taken by each call of a tool
        that reaches it (docs/guides/limits.md). A dependency has one limit for all: no ``key``."""
        limits = _limits(f"dependency {name!r}", rate, concurrency)
        if limits is None:
            raise ConfigError(f"dependency {name!r}: declare rate=, concurrency= or both")
        if limits.key is not None:
            raise ConfigError(f"dependency {name!r}: a dependency's limit has no key (one limit for all its calls); "
                              "declare a keyed limit on the agent")
        known = self.dependencies.get(name)
        if known is not None and known != limits:
            raise ConfigError(f"dependency {name!r} is declared with two different limits: {known.model_dump()} "
                              f"and {limits.model_dump()}")
        self.dependencies[name] = limits
        return limits

    def _take_limits(self, spec: PipelineSpec) -> None:
        """The agents' and dependencies' limits pipeline ``spec`` declares (``limits:``), made the app's."""
        from .flow import check_limits

        assert spec.limits is not None
        for agent, limits in spec.limits.agents.items():
            own = self.agents.get(agent)
            if own is None:
                raise ConfigError(f"pipeline {spec.name!r} declares limits of agent {agent!r}, which the app does "
                                  f"not declare; agents are {sorted(self.agents)}")
            if own.limits is not None and own.limits != limits:
                theirs, mine = limits.model_dump(exclude_none=True), own.limits.model_dump(exclude_none=True)
                raise ConfigError(f"pipeline {spec.name!r} declares limits of agent {agent!r} other than its own: "
                                  f"{theirs} and {mine}")
            check_limits(f"pipeline {spec.name!r}, agent {agent!r}", limits)
            self.agents[agent] = dataclasses.replace(own, limits=limits)
        for name, limits in spec.limits.dependencies.items():
            self.dependency(name, **limits.model_dump(exclude_none=True))

    def flow_key(self, agent: str, payload: dict[str, Any]) -> str | None:
        """The flow key a message to ``agent`` with ``payload`` carries (None: the agent has no keyed limit)."""
        spec = self.agents.get(agent)
        if spec is None or spec.limits is None or spec.limits.key is None:
            return None  # what render_flow_key answers, without its import on every send
        from .flow import render_flow_key

        return render_flow_key(spec.limits, payload, agent=agent, input_model=spec.input)

    def mcp(self, name: str, *, command: Iterable[str] = (), url: str | None = None, allow: Iterable[str] = (),
            secrets: Iterable[str] = (), env: Mapping[str, str] | None = None,
            headers: Mapping[str, str] | None = None, effect: bool = True,
            timeout_s: float | None = None, destructive: bool | Iterable[str] | None = None) -> McpServer:
        """Use MCP server ``name`` (``command=[...]``: stdio; ``url=``: streamable HTTP) as a tool source:
        each of its tools named in ``allow`` becomes the declared tool ``<name>.<tool>`` (none by
        default). ``secrets``: read by the worker (environment or MESH_SECRETS_DIR), given to a stdio
        server in its environment (``env``: templates such as ``{"GH_TOKEN": "{GITHUB_TOKEN}"}``; by
        default each under its own name) and to an HTTP one in ``headers``. ``destructive``: which tools'
        calls the model asks for in a tool loop wait for a person's approval (None: those the server
        marks ``destructiveHint``; True or False: all or none; a list of its tool names: exactly those).
        See docs/guides/mcp.md."""
        from .tools.mcp import declare

        if name in self.mcp_servers:
            raise ConfigError(f"app {self.name!r} declares MCP server {name!r} twice")
        server = self.mcp_servers[name] = declare(self, name, command=command, url=url, allow=allow, secrets=secrets,
                                                  env=env, headers=headers, effect=effect, timeout_s=timeout_s,
                                                  destructive=destructive)
        return server

    def stored_pipeline(self, data: Mapping[str, Any]) -> PipelineSpec:
        """A registered pipeline's stored JSON back as its spec (how a client that knows this app runs
        a pipeline by name: the broker stores specs as JSON and never imports the spec model)."""
        from mesh.agents.pipelines.engine import spec_from_json

        return spec_from_json(data)

    def pipeline(self, source: str | Path | PipelineSpec | Pipeline) -> PipelineSpec:
        """Register a pipeline: a YAML file (or text), a :class:`PipelineSpec` or a builder. It is
        checked against this app's agents now; declare the agents first."""
        from mesh.agents.pipelines import Pipeline, PipelineSpec, check, load_pipeline

        if isinstance(source, Pipeline):
            source = source.build()
        spec = check(source, self) if isinstance(source, PipelineSpec) else load_pipeline(source, self)
        if spec.name in self.pipelines:
            raise ConfigError(f"app {self.name!r} declares pipeline {spec.name!r} twice")
        if spec.limits is not None:
            self._take_limits(spec)
        self.pipelines[spec.name] = spec
        return spec

    def add_agent(self, spec: AgentSpec) -> None:
        problem = name_problem("agent name", spec.name)
        if problem and "-" in spec.name:  # a name older versions took: its queued messages keep it
            problem += (f". Messages already sent to {spec.name!r} (on its queue, in the dead-letter queue) name it "
                        "and are served only by workers that declare it: drain them with the version that does "
                        "(mesh queues, mesh dlq list) before renaming the agent")
        if problem:
            raise ConfigError(problem)
        if not NAME.match(spec.queue):
            raise ConfigError(f"queue name {spec.queue!r} of agent {spec.name!r} must match {NAME.pattern}")
        clash = {spec.name, spec.queue} & RESERVED
        if clash:
            raise ConfigError(f"agent {spec.name!r}: {sorted(clash)} name the mesh's own keys; choose another name"
                              " (or queue=)")
        if spec.name in self.agents:
            raise ConfigError(f"app {self.name!r} declares agent {spec.name!r} twice")
        self.agents[spec.name] = spec

    def add_tool(self, spec: ToolSpec) -> None:
        if spec.name in self.tools:
            raise ConfigError(f"app {self.name!r} declares tool {spec.name!r} twice")
        self.tools[spec.name] = spec

    def include(self, other: App) -> App:
        """Add ``other``'s agents, tools and MCP servers (e.g. the built-in ones) to this app."""
        for tool in other.tools.values():
            self.add_tool(tool)
        self.mcp_servers.update(other.mcp_servers)  # their tools were added above: a clash was refused there
        for dep, limits in other.dependencies.items():
            self.dependency(dep, **limits.model_dump(exclude_none=True))
        for spec in other.agents.values():
            self.add_agent(spec)
        return self

    @property
    def contracts(self) -> Mapping[str, tuple[type[BaseModel], type[BaseModel]]]:
        """Agent name -> (input model, output model): what clients validate against."""
        return {name: (spec.input, spec.output) for name, spec in self.agents.items()}

    def check(self) -> None:
        """Every tool an agent names, and every tool named to undo a tool's calls (``compensate=``),
        is declared: a worker refuses to start otherwise."""
        for spec in self.agents.values():
            missing = [t for t in spec.tools if t not in self.tools]
            if missing:
                raise ConfigError(f"agent {spec.name!r} names undeclared tools {missing}; "
                                  f"tools are {sorted(self.tools) or 'none'}")
        for tool in self.tools.values():
            if tool.compensate is not None and tool.compensate not in self.tools:
                raise ConfigError(f"tool {tool.name!r} names undeclared tool {tool.compensate!r} as compensate=; "
                                  f"tools are {sorted(self.tools)}")

    def tools_of(self, agents: Iterable[str]) -> dict[str, str]:
        """The tools ``agents`` may call (those they name, and the tools that undo those), each with
        the first of ``agents`` that reaches it: what a worker serving them runs. Call after :meth:`check`."""
        reached: dict[str, str] = {}
        for agent in agents:
            for name in self.agents[agent].tools:
                undo = self.tools[name].compensate
                for tool in (name, undo) if undo is not None else (name,):
                    reached.setdefault(tool, agent)
        return reached


def load_app(path: str) -> App:
    """The ``App`` at ``module[:attribute]`` (as ``uvicorn pkg.module:app`` and ``celery -A`` do).
    Without an attribute: the module's ``app``, or its one ``App``."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = f" (an import path, not a file: {module_name.removesuffix('.py').replace('/', '.')})" \
            if module_name.endswith(".py") else ""
        raise ConfigError(f"cannot import app module {module_name!r}: {exc}{hint}") from None
    if attr:
        found = getattr(module, attr, None)
        if not isinstance(found, App):
            raise ConfigError(f"{module_name}:{attr} is not a mesh App (found {type(found).__name__})")
        return found
    if isinstance(getattr(module, "app", None), App):
        return typing.cast(App, module.app)
    apps = [v for v in vars(module).values() if isinstance(v, App)]
    if len(apps) != 1:
        raise ConfigError(f"module {module_name!r} holds {len(apps)} mesh Apps; name one: {module_name}:ATTR")
    return apps[0]


def _models(fn: Callable[..., Any], input: type[BaseModel] | None, output: type[BaseModel] | None,
            *, need_output: bool = True) -> tuple[type[BaseModel], type[BaseModel]]:
    try:
        hints = typing.get_type_hints(fn)
    except Exception as exc:  # an annotation that does not resolve
        raise ConfigError(f"cannot read the annotations of {fn.__qualname__}: {exc}") from None
    params = list(inspect.signature(fn).parameters)
    if len(params) != 2:
        raise ConfigError(f"{fn.__qualname__} must take (ctx, input); it takes {params}")
    in_model = input or hints.get(params[1])
    out_model = output or hints.get("return")
    if not (isinstance(in_model, type) and issubclass(in_model, BaseModel)):
        raise ConfigError(f"{fn.__qualname__}: the input must be a pydantic model (annotate it or pass input=)")
    if need_output and not (isinstance(out_model, type) and issubclass(out_model, BaseModel)):
        raise ConfigError(f"{fn.__qualname__}: the output must be a pydantic model (annotate it or pass output=)")
    return in_model, typing.cast(type[BaseModel], out_model or BaseModel)


def _retries(agent: str, max_attempts: int | None, max_retries: int | None) -> int | None:
    """The retries after the first attempt that ``max_attempts`` or ``max_retries`` says (one of them)."""
    if max_attempts is not None and max_retries is not None:
        raise ConfigError(f"agent {agent!r}: give max_attempts={max_attempts} or max_retries={max_retries}, not both: "
                          "max_attempts counts every attempt, the first included (as a pipeline step's "
                          "retry_policy.max_attempts does); max_retries, its older spelling, counts the retries "
                          f"after the first (max_attempts={max_retries + 1} is max_retries={max_retries})")
    for name, value in (("max_attempts", max_attempts), ("max_retries", max_retries)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise ConfigError(f"agent {agent!r}: {name}={value!r} is a count: a whole number")
    if max_attempts is not None:
        if max_attempts < 1:
            raise ConfigError(f"agent {agent!r}: max_attempts={max_attempts} counts the first attempt too: it is at "
                              "least 1 (1 never retries)")
        return max_attempts - 1
    if max_retries is not None and max_retries < 0:
        raise ConfigError(f"agent {agent!r}: max_retries={max_retries} counts the retries after the first attempt: "
                          "it is at least 0 (0 never retries)")
    return max_retries


def _limits(owner: str, rate: Any, concurrency: Any) -> FlowLimits | None:
    """The limits ``rate=`` and ``concurrency=`` declare for ``owner``; ConfigError naming it otherwise."""
    from pydantic import ValidationError

    from .flow import check_limits

    try:
        limits = flow_limits(rate, concurrency)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{owner}: limits{' ' + where if where else ''}: {first['msg']}") from None
    check_limits(owner, limits)
    return limits


def _not_generator(fn: Callable[..., Any], what: str) -> None:
    """Refuse an ``async def`` generator when it is declared (a plain ``async def`` runs on the worker
    thread's event loop, see :mod:`mesh.agents.event_loop`): it returns no output, it yields many."""
    if inspect.isasyncgenfunction(fn):
        raise ConfigError(f"{what} {getattr(fn, '__qualname__', repr(fn))!r} is an async generator: a handler "
                          "returns its output (async def with return, not yield)")


def _doc(fn: Callable[..., Any]) -> str:
    return (inspect.getdoc(fn) or "").split("\n\n")[0].strip()

