"""MCP servers as tool sources: ``app.mcp("github", command=[...], allow=["search_issues"])``.

Each tool named in ``allow=`` becomes a declared tool named ``<server>.<tool>`` (``github.search_issues``):
agents list it in ``tools=[...]`` and call it with ``ctx.call("github.search_issues", {...})``, through
the same guards as any declared tool (lease confirmed, ledger for effects, breaker, trace). The server
name follows the agent-name rule (:mod:`mesh.agents.names`: it has no ``.``), so the first ``.``
splits a declared name into server and tool, whatever characters the server's tool name uses.
A tool the server offers and ``allow=`` does not name is not reachable: nothing is allowed by default.

In a tool loop (``ctx.model.run(tools=["github.search_issues"])``) the model is shown the server's own
description and ``inputSchema`` of the tool (:meth:`McpServer.definition`, checked against its pin when
the loop starts), under its wire name (``github_search_issues``: :func:`mesh.agents.tool_loop.wire_names`).
A tool the server marks ``destructiveHint`` (and not ``readOnlyHint``) is destructive: each call the
model asks for waits for a person's approval of exactly it; ``destructive=`` overrides the hints
(True: every allowed tool; a list: exactly those; False: none).

A call: the server's definition of the tool is checked against its pin (:mod:`.pins`), the args
against its ``inputSchema`` (ContractError before anything is sent), then ``tools/call`` goes out with
the message key and fencing token in ``_meta`` (``mesh/key``, ``mesh/fencing-token``) so the server can
dedupe, cut to the deadline. Failures: no connection, a closed transport → Brownout (the breaker of
``mcp:<server>`` counts it); no answer in time → DependencyTimeout (the effect is unknown); a
JSON-RPC error → PermanentFailure; a result with ``isError`` → :class:`McpToolError`, permanent unless
the result's ``_meta`` says ``"mesh/retryable": true``. A result over MESH_MAX_RESPONSE_BYTES (its
JSON) fails the call (permanent).

Sessions: one event loop thread per process holds one session per server (the ``mcp`` client is
async, on anyio). Worker threads hand it their calls and wait, polling, so a time limit raised into
the waiting thread lands and cancels the call. The worker threads' own loops
(:mod:`mesh.agents.event_loop`) cannot hold a session: every task left on them is cancelled when
a message ends, and a session is a task that outlives its calls. One session serves every thread
(MCP multiplexes requests by id); a session whose transport failed is dropped and the next call
opens another. Secrets (``secrets=``) are read from the worker's environment or MESH_SECRETS_DIR
when a session opens, never from a message: a stdio server gets them in its environment, an HTTP
server in headers (``env=``, ``headers=``: templates such as ``"Bearer {GITHUB_TOKEN}"``).
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import logging
import string
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator

from mesh.contracts import (
    Brownout,
    ConfigError,
    DependencyTimeout,
    FailureClass,
    MeshError,
    PermanentFailure,
    dumps,
)

from ..names import name_problem
from .base import ToolContext
from .mcp_sessions import LOOP, Session, describe
from .pins import Definition, Pins

if TYPE_CHECKING:
    from mesh.agents.app import App, ToolSpec

logger = logging.getLogger(__name__)

#: The ``_meta`` keys a call carries: the message key (the server dedupes on it) and the fencing token.
META_KEY = "mesh/key"
META_TOKEN = "mesh/fencing-token"
#: The ``_meta`` key of an ``isError`` result that says a retry may succeed.
META_RETRYABLE = "mesh/retryable"
#: How long opening a session may take (s; a stdio server starts a process), cut to the deadline.
OPEN_TIMEOUT_S = 30.0


class McpToolError(MeshError):
    """An MCP tool answered ``isError``: permanent, unless the result's ``_meta`` says
    ``"mesh/retryable": true`` (then ``unknown``: bounded retries with backoff)."""

    failure_class = FailureClass.PERMANENT
    terminal = True

    def __init__(self, message: str, *, retryable: bool = False, **context: Any) -> None:
        super().__init__(message, retryable=retryable, **context)
        if retryable:
            self.failure_class = FailureClass.UNKNOWN
            self.terminal = False


class McpResult(BaseModel):
    """What a call of an MCP tool returns: its content blocks as JSON, and its structured content."""

    model_config = ConfigDict(frozen=True)

    content: list[dict[str, Any]] = []
    structured: dict[str, Any] | None = None

    @property
    def text(self) -> str:
        """The text blocks of the content, joined by newlines."""
        return "\n".join(str(b.get("text", "")) for b in self.content if b.get("type") == "text")


class McpArgs(BaseModel):
    """The args of an MCP tool: any JSON object, checked against the server's ``inputSchema`` (when
    this process has seen it: before the ledger and the call; else just before the call)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    server: ClassVar[McpServer | None] = None
    tool: ClassVar[str] = ""

    @model_validator(mode="before")
    @classmethod
    def _schema(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise ValueError("MCP tool args are a JSON object")
        known = cls.server.definitions.get(cls.tool) if cls.server is not None else None
        if known is not None:
            problems = schema_problems(known.input_schema, data)
            if problems:
                raise ValueError("; ".join(problems))
        return data


def schema_problems(schema: dict[str, Any], args: dict[str, Any]) -> list[str]:
    """What in ``args`` breaks ``schema`` (a tool's ``inputSchema``), one line per error."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    try:
        errors = sorted(Draft202012Validator(schema).iter_errors(args), key=lambda e: [str(p) for p in e.path])
    except SchemaError as exc:
        return [f"the server's inputSchema is invalid: {exc.message}"]
    return [f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in errors]


@dataclass(eq=False)
class McpServer:
    """An MCP server an app uses: how to reach it (``command`` for stdio, ``url`` for streamable
    HTTP), which of its tools the app may call (``allow``), the secrets it is given."""

    name: str
    command: tuple[str, ...] = ()
    url: str | None = None
    allow: tuple[str, ...] = ()
    secrets: tuple[str, ...] = ()
    #: A stdio server's environment (besides PATH, HOME and the like): templates of the secrets;
    #: None: each secret under its own name.
    env: Mapping[str, str] | None = None
    #: An HTTP server's request headers: templates of the secrets (``"Bearer {TOKEN}"``).
    headers: Mapping[str, str] = field(default_factory=dict)
    #: Whether its tools change something outside the mesh (their calls go through the ledger).
    effect: bool = True
    #: Seconds a call may take (cut to the deadline); None: MESH_HTTP_TIMEOUT_S.
    timeout_s: float | None = None
    #: Which tools' calls the model asks for wait for an approval: None: those the server marks
    #: ``destructiveHint``; True/False: all/none; a tuple of the server's tool names: exactly those.
    destructive: bool | tuple[str, ...] | None = None
    #: The definitions this process last listed, by the server's tool name.
    definitions: dict[str, Definition] = field(default_factory=dict, init=False, repr=False)
    _session: Session | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        problem = name_problem("MCP server name", self.name)
        if problem:
            raise ConfigError(problem)
        if bool(self.command) == bool(self.url):
            raise ConfigError(f"MCP server {self.name!r}: give command=[...] (stdio) or url= (streamable HTTP), "
                              "one of them")
        if importlib.util.find_spec("mcp") is None:
            raise ConfigError(f"MCP server {self.name!r} needs the mcp package: pip install 'agent-mesh[mcp]'")
        stray = sorted(set(self.destructive) - set(self.allow)) if isinstance(self.destructive, tuple) else []
        if stray:
            raise ConfigError(f"MCP server {self.name!r}: destructive= names {stray}, which allow= does not "
                              f"({list(self.allow)})")
        templates = {**(self.env or {}), **self.headers}
        for where, template in templates.items():
            for _, field_name, _, _ in string.Formatter().parse(template):
                if field_name is not None and field_name not in self.secrets:
                    raise ConfigError(f"MCP server {self.name!r}: {where} reads {{{field_name}}}, which is not "
                                      f"one of its secrets= {list(self.secrets)}")

    @property
    def dependency(self) -> str:
        """The breaker's identity for this server."""
        return f"mcp:{self.name}"

    def declared(self, tool: str) -> str:
        """The declared name of the server's ``tool``."""
        return f"{self.name}.{tool}"

    def specs(self) -> list[ToolSpec]:
        """A declared tool for each allowed tool."""
        from mesh.agents.app import ToolSpec

        specs = []
        for tool in self.allow:
            args = type(f"McpArgs_{self.name}_{tool}", (McpArgs,), {"server": self, "tool": tool,
                                                                     "__module__": __name__})

            def run(ctx: ToolContext, args: McpArgs, _tool: str = tool) -> McpResult:
                return self.call(ctx, _tool, args.model_dump(mode="json"))

            specs.append(ToolSpec(name=self.declared(tool), args=args, run=run, dependency=self.dependency,
                                  secrets=self.secrets, effect=self.effect, destructive=self.destructive_tool(tool),
                                  description=f"{tool} of MCP server {self.name}"))
        return specs

    def destructive_tool(self, tool: str, definition: Definition | None = None) -> bool:
        """Whether the model's calls of ``tool`` wait for an approval: ``destructive=`` says, else
        (None) the server's ``destructiveHint`` in ``definition`` (False without one)."""
        if self.destructive is None:
            return definition is not None and definition.destructive_hint
        return self.destructive if isinstance(self.destructive, bool) else tool in self.destructive

    # -- calls -----------------------------------------------------------------------------------

    def call(self, ctx: ToolContext, tool: str, args: dict[str, Any]) -> McpResult:
        """Call ``tool`` with ``args`` for the message ``ctx`` serves: see the module docstring."""
        session = self.session(ctx.secrets, ctx.timeout_s(OPEN_TIMEOUT_S))
        definition = self.presented(session, tool)
        Pins(ctx.redis, ctx.keys).check(self.declared(tool), definition)
        problems = schema_problems(definition.input_schema, args)
        if problems:
            from mesh.contracts import ContractError

            raise ContractError(f"invalid {self.declared(tool)} args: {'; '.join(problems)}", tool=self.declared(tool))
        meta = {META_KEY: ctx.key, META_TOKEN: ctx.fencing_token}
        timeout = ctx.timeout_s(self.timeout_s or ctx.settings.http_timeout_s)
        try:
            result = LOOP.run(session.call(tool, args, meta, timeout), timeout + 1.0)
        except (TimeoutError, concurrent.futures.TimeoutError):
            raise DependencyTimeout(f"MCP server {self.name} did not answer {tool} in {timeout:g}s; its effect is "
                                    "unknown", dependency=self.dependency, tool=self.declared(tool),
                                    effect_unknown=self.effect) from None
        except Exception as exc:
            raise self._failure(session, tool, exc) from exc
        return self._answer(ctx, tool, result)

    def definition(self, ctx: ToolContext, tool: str) -> tuple[Definition, bool]:
        """``tool`` as its server presents it (a session opened when there is none), checked against
        its pin (ToolRefused, naming what changed, when it is not the pinned one), and whether a call
        the model asks for waits for an approval (:meth:`destructive_tool`: ``destructive=``, else the
        server's pinned ``destructiveHint``)."""
        session = self.session(ctx.secrets, ctx.timeout_s(OPEN_TIMEOUT_S))
        definition = self.presented(session, tool)
        Pins(ctx.redis, ctx.keys).check(self.declared(tool), definition)
        return definition, self.destructive_tool(tool, definition)

    def session(self, secrets: Mapping[str, str], timeout_s: float) -> Session:
        """The open session for these secrets, opened now when there is none (or it failed). One
        thread opens it; the others wait for that (within ``timeout_s``) and share it."""
        config = self._config(secrets)
        if not self._lock.acquire(timeout=max(0.0, timeout_s)):
            raise Brownout(f"MCP server {self.name}: its session did not open in {timeout_s:g}s",
                           dependency=self.dependency)
        try:
            held = self._session
            if held is not None and held.alive and held.config == config:
                return held
            if held is not None:
                LOOP.spawn(held.close())
            self._session = held = Session(self.name, config)
            try:
                LOOP.run(held.open(), timeout_s)
            except (TimeoutError, concurrent.futures.TimeoutError):
                LOOP.spawn(held.close())
                raise Brownout(f"MCP server {self.name} did not open a session in {timeout_s:g}s",
                               dependency=self.dependency) from None
            except Exception as exc:
                raise Brownout(f"MCP server {self.name} unreachable: {describe(exc)}",
                               dependency=self.dependency) from exc
            self.definitions = dict(held.tools)
            return held
        finally:
            self._lock.release()

    def presented(self, session: Session, tool: str) -> Definition:
        definition = session.tools.get(tool)
        if definition is None:
            raise PermanentFailure(f"MCP server {self.name} offers no tool {tool!r} (it offers "
                                   f"{sorted(session.tools) or 'none'})", dependency=self.dependency,
                                   tool=self.declared(tool))
        return definition

    def register(self, pins: Pins, secrets: Mapping[str, str], timeout_s: float) -> list[str]:
        """Open a session, list the server's tools and check each allowed one against its pin (the first
        registration pins it). Returns the declared names refused (their definition changed)."""
        session = self.session(secrets, timeout_s)
        refused = []
        for tool in self.allow:
            try:
                pins.check(self.declared(tool), self.presented(session, tool))
            except PermanentFailure as exc:
                logger.warning("MCP tool refused", extra={"tool": self.declared(tool), "error": str(exc)})
                refused.append(self.declared(tool))
        return refused

    def close(self) -> None:
        """Close the session (a stdio server's process ends with it)."""
        with self._lock:
            held, self._session = self._session, None
        if held is not None:
            LOOP.run(held.close(), 10.0)

    def _config(self, secrets: Mapping[str, str]) -> dict[str, Any]:
        missing = [s for s in self.secrets if s not in secrets]
        if missing:
            raise ConfigError(f"MCP server {self.name}: secrets {missing} were not read")
        if self.url is not None:
            return {"url": self.url, "headers": {k: v.format_map(secrets) for k, v in self.headers.items()}}
        env = {s: secrets[s] for s in self.secrets} if self.env is None else \
            {k: v.format_map(secrets) for k, v in self.env.items()}
        return {"command": list(self.command), "env": env}

    def _failure(self, session: Session, tool: str, exc: Exception) -> MeshError:
        from mcp import MCPError
        from mcp_types import CONNECTION_CLOSED, REQUEST_TIMEOUT

        name = self.declared(tool)
        if isinstance(exc, MCPError) and exc.code == REQUEST_TIMEOUT:
            return DependencyTimeout(f"MCP server {self.name} timed out on {tool}: {exc.message}",
                                     dependency=self.dependency, tool=name, effect_unknown=self.effect)
        if isinstance(exc, MCPError) and exc.code != CONNECTION_CLOSED:
            return PermanentFailure(f"MCP server {self.name} refused {tool}: {exc.message} (code {exc.code})",
                                    dependency=self.dependency, tool=name, code=exc.code)
        session.alive = False  # the transport failed: the next call opens another session
        return Brownout(f"MCP server {self.name} failed during {tool}: {describe(exc)}", dependency=self.dependency,
                        tool=name)

    def _answer(self, ctx: ToolContext, tool: str, result: Any) -> McpResult:
        name = self.declared(tool)
        content = [block.model_dump(mode="json", by_alias=True, exclude_none=True) for block in result.content]
        answer = McpResult(content=content, structured=result.structured_content)
        size = len(dumps(answer))
        limit = ctx.settings.max_response_bytes
        if size > limit:
            raise PermanentFailure(f"MCP server {self.name} answered {tool} with {size} bytes, over "
                                   f"MESH_MAX_RESPONSE_BYTES ({limit}): not read", dependency=self.dependency,
                                   tool=name)
        if result.is_error:
            meta = result.meta if isinstance(result.meta, dict) else {}
            retryable = bool(meta.get(META_RETRYABLE))
            raise McpToolError(f"{name} failed: {answer.text[:500] or 'isError, no text'}", tool=name,
                               retryable=retryable, dependency=self.dependency)
        return answer


def declare(app: App, name: str, *, command: Iterable[str] = (), url: str | None = None,
            allow: Iterable[str] = (), secrets: Iterable[str] = (), env: Mapping[str, str] | None = None,
            headers: Mapping[str, str] | None = None, effect: bool = True,
            timeout_s: float | None = None, destructive: bool | Iterable[str] | None = None) -> McpServer:
    """Declare MCP server ``name`` on ``app`` and its allowed tools as declared tools (``App.mcp``)."""
    marked = destructive if destructive is None or isinstance(destructive, bool) else tuple(destructive)
    server = McpServer(name=name, command=tuple(command), url=url, allow=tuple(allow), secrets=tuple(secrets),
                       env=env, headers=dict(headers or {}), effect=effect, timeout_s=timeout_s, destructive=marked)
    for spec in server.specs():
        app.add_tool(spec)
    return server


def register_servers(app: App, tools: Iterable[str], pins: Pins, secrets_dir: str | None,
                     timeout_s: float = OPEN_TIMEOUT_S) -> None:
    """The first registration of a worker: each MCP server whose tools it may call (``tools``) is
    connected and its allowed tools checked against their pins (pinned the first time). A server
    not reachable now is logged, not fatal: its first call connects (and pins) again."""
    from mesh.agents.context import read_secret

    wanted = {t.split(".", 1)[0] for t in tools if "." in t}
    for server in getattr(app, "mcp_servers", {}).values():
        if server.name not in wanted:
            continue
        try:
            secrets = {s: read_secret(s, secrets_dir) for s in server.secrets}
            server.register(pins, secrets, timeout_s)
        except MeshError as exc:
            logger.warning("MCP server not registered", extra={"server": server.name, "error": str(exc)})
